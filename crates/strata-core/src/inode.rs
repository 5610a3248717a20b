//! The inode table: node ids the kernel knows, with their lookup counts.
//!
//! A node lives while the kernel holds lookup references to it (or while the
//! core pins it, like the root). Ids are chosen by the caller from a stable key
//! (for host files: device and inode number), so the same object gets the same id
//! again after it was forgotten: inode numbers stay stable for the life of the mount.
//!
//! A key that comes to name another object while the kernel still holds the
//! old one's node (a host inode number reused after a removal) gets a node
//! of its own: the kernel would otherwise take the new object for the old,
//! dead one (its directory alias, its type), and answer ESTALE, ELOOP or EIO.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::fs::ROOT_ID;

/// Lookup count that forget can never bring to zero.
const PINNED: u64 = u64::MAX / 2;

/// First id handed out when a preferred id is taken by another key.
pub const FALLBACK_BASE: u64 = 0xC000_0000_0000_0000;

struct Slot<K, T> {
    key: K,
    nlookup: u64,
    data: Arc<T>,
    /// Its key names another node now: found by id only, until forgotten.
    detached: bool,
}

struct Inner<K, T> {
    nodes: HashMap<u64, Slot<K, T>>,
    /// Keys not found at their derived id: fallback ids, rekeyed nodes, and
    /// every key of a table without derived ids.
    by_key: HashMap<K, u64>,
    next_fallback: u64,
}

/// The id a key gets unless another key holds it.
pub type IdOf<K> = Box<dyn Fn(&K) -> u64 + Send + Sync>;

pub struct InodeTable<K, T> {
    inner: Mutex<Inner<K, T>>,
    /// With derived ids, a key is first looked for at its id, so most keys
    /// need no `by_key` entry (a second map as large as the table).
    id_of: Option<IdOf<K>>,
}

impl<K: Clone + Eq + Hash, T> InodeTable<K, T> {
    /// A table holding only the root, which is pinned; callers choose each
    /// node's preferred id.
    pub fn new(root_key: K, root: Arc<T>) -> Self {
        Self::build(root_key, root, None)
    }

    /// A table whose preferred ids are `id_of(key)`.
    pub fn with_derived_ids(root_key: K, root: Arc<T>, id_of: IdOf<K>) -> Self {
        Self::build(root_key, root, Some(id_of))
    }

    /// Hands out fallback ids from `base` on (tables whose ids must not
    /// meet another table's).
    pub fn with_fallback_base(mut self, base: u64) -> Self {
        self.inner.get_mut().next_fallback = base;
        self
    }

    fn build(root_key: K, root: Arc<T>, id_of: Option<IdOf<K>>) -> Self {
        let mut t = InodeTable {
            inner: Mutex::new(Inner {
                nodes: HashMap::new(),
                by_key: HashMap::new(),
                next_fallback: FALLBACK_BASE,
            }),
            id_of,
        };
        let inner = t.inner.get_mut();
        if t.id_of.as_ref().is_none_or(|f| f(&root_key) != ROOT_ID) {
            inner.by_key.insert(root_key.clone(), ROOT_ID);
        }
        inner.nodes.insert(
            ROOT_ID,
            Slot {
                key: root_key,
                nlookup: PINNED,
                data: root,
                detached: false,
            },
        );
        t
    }

    /// The id of the node holding `key`.
    fn find(&self, inner: &Inner<K, T>, key: &K) -> Option<u64> {
        if let Some(f) = &self.id_of {
            let id = f(key);
            if inner
                .nodes
                .get(&id)
                .is_some_and(|s| s.key == *key && !s.detached)
            {
                return Some(id);
            }
        }
        inner.by_key.get(key).copied()
    }

    fn at_derived_id(&self, key: &K, id: u64) -> bool {
        self.id_of.as_ref().is_some_and(|f| f(key) == id)
    }

    pub fn get(&self, id: u64) -> Option<Arc<T>> {
        self.inner.lock().nodes.get(&id).map(|s| s.data.clone())
    }

    /// Every node id the kernel knows, the root included.
    pub fn ids(&self) -> Vec<u64> {
        self.inner.lock().nodes.keys().copied().collect()
    }

    /// Calls `f` on every node, under the table's lock: one pass, no
    /// lookups (a caller taking node locks in `f` must never hold one of
    /// them while it asks the table).
    pub fn for_each(&self, mut f: impl FnMut(&T)) {
        for slot in self.inner.lock().nodes.values() {
            f(&slot.data);
        }
    }

    /// The node for `key` if the kernel knows it, without taking a reference.
    pub fn get_by_key(&self, key: &K) -> Option<(u64, Arc<T>)> {
        let inner = self.inner.lock();
        let id = self.find(&inner, key)?;
        Some((id, inner.nodes[&id].data.clone()))
    }

    /// Takes one lookup reference on the node for `key`.
    ///
    /// A known node is returned with its id, unless `replace(old, fresh)`
    /// says `fresh` is another object (the host gave the key to a new file):
    /// then the old node is detached (the kernel's references to it stay
    /// valid until forgotten, but the key no longer finds it) and `fresh`
    /// becomes a new node. An unknown key is inserted with `fresh` under the
    /// id `preferred`, or a fallback id if another node holds that one;
    /// without `fresh` it returns `None` and the caller builds the node and
    /// tries again.
    pub fn lookup(
        &self,
        key: K,
        preferred: u64,
        fresh: Option<T>,
        replace: impl FnOnce(&T, &T) -> bool,
    ) -> Option<(u64, Arc<T>)> {
        let mut inner = self.inner.lock();
        if let Some(id) = self.find(&inner, &key) {
            let slot = inner.nodes.get_mut(&id).expect("by_key and nodes agree");
            if !fresh.as_ref().is_some_and(|new| replace(&slot.data, new)) {
                slot.nlookup = slot.nlookup.saturating_add(1);
                return Some((id, slot.data.clone()));
            }
            slot.detached = true;
            if inner.by_key.get(&key) == Some(&id) {
                inner.by_key.remove(&key);
            }
        }
        let data = Arc::new(fresh?);
        let mut id = preferred;
        if id == 0 || inner.nodes.contains_key(&id) {
            loop {
                id = inner.next_fallback;
                inner.next_fallback += 1;
                if !inner.nodes.contains_key(&id) {
                    break;
                }
            }
        }
        if !self.at_derived_id(&key, id) {
            inner.by_key.insert(key.clone(), id);
        }
        inner.nodes.insert(
            id,
            Slot {
                key,
                nlookup: 1,
                data: data.clone(),
                detached: false,
            },
        );
        Some((id, data))
    }

    /// Drops `n` lookup references; removes the node at zero. Returns whether it was removed.
    pub fn forget(&self, id: u64, n: u64) -> bool {
        let mut inner = self.inner.lock();
        let Some(slot) = inner.nodes.get_mut(&id) else {
            return false;
        };
        slot.nlookup = slot.nlookup.saturating_sub(n);
        if slot.nlookup > 0 {
            return false;
        }
        let slot = inner.nodes.remove(&id).expect("present");
        if inner.by_key.get(&slot.key) == Some(&id) {
            inner.by_key.remove(&slot.key);
        }
        true
    }

    /// Detaches node `id` from its key: it stays for the kernel's references
    /// until forgotten, but the key no longer finds it (the kernel holds it
    /// as removed, so the object found next under the key is a new node).
    pub fn detach(&self, id: u64) {
        let mut inner = self.inner.lock();
        let Some(slot) = inner.nodes.get_mut(&id) else {
            return;
        };
        if id == ROOT_ID {
            return;
        }
        slot.detached = true;
        let key = slot.key.clone();
        if inner.by_key.get(&key) == Some(&id) {
            inner.by_key.remove(&key);
        }
    }

    /// The key of node `id`.
    pub fn key_of(&self, id: u64) -> Option<K> {
        self.inner.lock().nodes.get(&id).map(|s| s.key.clone())
    }

    /// Gives a known node a new key (its object changed identity, e.g. was
    /// copied up); its id and lookup count stay.
    pub fn rekey(&self, id: u64, key: K) {
        let mut inner = self.inner.lock();
        let Some(slot) = inner.nodes.get_mut(&id) else {
            return;
        };
        let old = std::mem::replace(&mut slot.key, key.clone());
        slot.detached = false;
        if inner.by_key.get(&old) == Some(&id) {
            inner.by_key.remove(&old);
        }
        if !self.at_derived_id(&key, id) {
            inner.by_key.insert(key, id);
        }
    }

    /// The lookup count of a node (0 if unknown).
    pub fn lookup_count(&self, id: u64) -> u64 {
        self.inner.lock().nodes.get(&id).map_or(0, |s| s.nlookup)
    }

    /// Number of nodes, the root included.
    pub fn len(&self) -> usize {
        self.inner.lock().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.lock().nodes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> InodeTable<u32, &'static str> {
        InodeTable::new(0, Arc::new("root"))
    }

    #[test]
    fn lookup_counts_and_forget_drop_at_zero() {
        let t = table();
        let (id, _) = t.lookup(7, 70, Some("seven"), |_, _| false).unwrap();
        assert_eq!(id, 70);
        t.lookup(7, 70, None, |_, _| false).unwrap();
        assert_eq!(t.lookup_count(70), 2);
        assert!(!t.forget(70, 1));
        assert_eq!(t.len(), 2);
        assert!(t.forget(70, 1));
        assert_eq!(t.len(), 1);
        assert!(t.get(70).is_none());
        assert!(t.get_by_key(&7).is_none());
    }

    #[test]
    fn same_key_gets_same_id_after_forget() {
        let t = table();
        let (a, _) = t.lookup(5, 50, Some("five"), |_, _| false).unwrap();
        t.forget(a, 1);
        let (b, _) = t.lookup(5, 50, Some("five again"), |_, _| false).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn taken_preferred_id_falls_back_to_a_fresh_one() {
        let t = table();
        let (a, _) = t.lookup(1, 100, Some("one"), |_, _| false).unwrap();
        let (b, _) = t.lookup(2, 100, Some("two"), |_, _| false).unwrap();
        assert_eq!(a, 100);
        assert_ne!(b, 100);
        assert!(b >= FALLBACK_BASE);
        assert_eq!(*t.get(b).unwrap(), "two");
        // the root id is never handed out again
        let (c, _) = t.lookup(3, ROOT_ID, Some("three"), |_, _| false).unwrap();
        assert_ne!(c, ROOT_ID);
    }

    #[test]
    fn root_is_pinned() {
        let t = table();
        assert!(!t.forget(ROOT_ID, u64::MAX / 4));
        assert!(t.get(ROOT_ID).is_some());
    }

    #[test]
    fn a_key_given_to_another_object_gets_a_new_node() {
        let t = table();
        t.lookup(9, 90, Some("old"), |_, _| false).unwrap();
        // Same object: the known node, one more reference.
        let (id, data) = t.lookup(9, 90, Some("old"), |o, n| o != n).unwrap();
        assert_eq!((id, *data, t.lookup_count(90)), (90, "old", 2));
        // Another object under the key: a node of its own; the old one
        // stays for the kernel's references but the key no longer finds it.
        let (new, data) = t.lookup(9, 90, Some("new"), |o, n| o != n).unwrap();
        assert_ne!(new, 90);
        assert_eq!((*data, t.lookup_count(new)), ("new", 1));
        assert_eq!(*t.get(90).unwrap(), "old");
        assert_eq!(t.get_by_key(&9).map(|(id, _)| id), Some(new));
        // Forgetting the old node leaves the new one findable, and the other
        // way round nothing is left.
        assert!(t.forget(90, 2));
        assert_eq!(t.get_by_key(&9).map(|(id, _)| id), Some(new));
        assert!(t.forget(new, 1));
        assert!(t.get_by_key(&9).is_none());
        assert_eq!(t.len(), 1);
        // Only the root's entry is left.
        assert_eq!(t.inner.lock().by_key.len(), 1);
    }

    #[test]
    fn a_node_detached_by_hand_keeps_its_id_until_forgotten() {
        let t = table();
        let (id, _) = t.lookup(3, 30, Some("dir"), |_, _| false).unwrap();
        t.detach(id);
        assert!(t.get_by_key(&3).is_none());
        assert_eq!(*t.get(id).unwrap(), "dir");
        let (again, _) = t.lookup(3, 30, Some("new dir"), |_, _| false).unwrap();
        assert_ne!(again, id);
        assert!(t.forget(id, 1));
        assert_eq!(t.get_by_key(&3).map(|(id, _)| id), Some(again));
        t.detach(ROOT_ID);
        assert!(t.get(ROOT_ID).is_some() && t.get_by_key(&0).is_some());
    }

    #[test]
    fn a_detached_node_on_its_derived_id_is_not_found_by_key() {
        let t = derived();
        t.lookup(7, 70, Some("old"), |_, _| false).unwrap();
        let (new, _) = t.lookup(7, 70, Some("new"), |_, _| true).unwrap();
        assert!(new >= FALLBACK_BASE);
        assert_eq!(t.get_by_key(&7).map(|(id, d)| (id, *d)), Some((new, "new")));
        assert!(t.forget(new, 1));
        assert!(t.get_by_key(&7).is_none());
        // Once the old node goes too, the key is at its own id again.
        assert!(t.forget(70, 1));
        let (again, _) = t.lookup(7, 70, Some("again"), |_, _| false).unwrap();
        assert_eq!(again, 70);
    }

    #[test]
    fn unknown_key_without_data_is_not_inserted() {
        let t = table();
        assert!(t.lookup(4, 40, None, |_, _| false).is_none());
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn forget_of_unknown_node_is_harmless() {
        let t = table();
        assert!(!t.forget(12345, 1));
        assert_eq!(t.len(), 1);
    }

    /// A table whose ids derive from keys (key * 10), as the single directory's
    /// and the overlay's do.
    fn derived() -> InodeTable<u32, &'static str> {
        InodeTable::with_derived_ids(0, Arc::new("root"), Box::new(|k| *k as u64 * 10))
    }

    #[test]
    fn derived_ids_find_keys_at_their_id_and_elsewhere() {
        let t = derived();
        let (a, _) = t.lookup(7, 70, Some("seven"), |_, _| false).unwrap();
        assert_eq!(a, 70);
        // 7's id holds another key: 8 gets a fallback id and is still found.
        t.rekey(70, 8);
        assert_eq!(t.get_by_key(&8).map(|(id, _)| id), Some(70));
        assert!(t.get_by_key(&7).is_none());
        let (b, _) = t.lookup(7, 70, Some("seven again"), |_, _| false).unwrap();
        assert!(b >= FALLBACK_BASE);
        assert_eq!(
            t.get_by_key(&7).map(|(id, d)| (id, *d)),
            Some((b, "seven again"))
        );
        // A rekey onto the key's own id needs no second entry, and forgets
        // leave nothing behind.
        let (c, _) = t.lookup(2, 20, Some("two"), |_, _| false).unwrap();
        t.rekey(c, 3);
        t.rekey(c, 2);
        assert_eq!(t.get_by_key(&2).map(|(id, _)| id), Some(20));
        for id in [70, b, c] {
            assert!(t.forget(id, 1));
        }
        assert_eq!(t.len(), 1);
        // Only the root's entry is left (its id, 1, is not its key's).
        assert_eq!(t.inner.lock().by_key.len(), 1);
        assert_eq!(t.get_by_key(&0).map(|(id, _)| id), Some(ROOT_ID));
    }

    #[test]
    fn derived_ids_keep_no_second_map() {
        let t = derived();
        for k in 1..=1000u32 {
            t.lookup(k, k as u64 * 10, Some("x"), |_, _| false).unwrap();
        }
        assert_eq!(t.len(), 1001);
        // Only the root, whose id (1) is not its key's (0).
        assert_eq!(t.inner.lock().by_key.len(), 1);
        assert_eq!(t.get_by_key(&500).map(|(id, _)| id), Some(5000));
    }

    #[test]
    fn table_returns_to_baseline_after_many_lookups_and_forgets() {
        let t = table();
        for i in 1..=100_000u32 {
            let (id, _) = t.lookup(i, i as u64 + 1, Some("x"), |_, _| false).unwrap();
            t.forget(id, 1);
        }
        assert_eq!(t.len(), 1);
    }
}
