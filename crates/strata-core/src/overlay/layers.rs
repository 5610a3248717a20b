//! The overlay's lower layers: the mount's own first (fixed), then the
//! frozen layers that snapshots add while mounted. Append-only, so a
//! layer's index (part of node keys) never changes, and reading one takes
//! no lock.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::layer::Layer;

/// Frozen layers one daemon can add over its lifetime; a remount starts
/// again from the workspace's chains.
pub const MAX_FROZEN: usize = 4096;

pub struct LayerSet {
    slots: Box<[OnceLock<Box<dyn Layer>>]>,
    len: AtomicUsize,
    base: usize,
    push: Mutex<()>,
}

impl LayerSet {
    /// The mount's own lowers, topmost first.
    pub fn new(base: Vec<Box<dyn Layer>>) -> LayerSet {
        let n = base.len();
        let slots: Box<[OnceLock<Box<dyn Layer>>]> =
            (0..n + MAX_FROZEN).map(|_| OnceLock::new()).collect();
        for (slot, l) in slots.iter().zip(base) {
            let _ = slot.set(l);
        }
        LayerSet {
            slots,
            len: AtomicUsize::new(n),
            base: n,
            push: Mutex::new(()),
        }
    }

    pub fn get(&self, i: u32) -> &dyn Layer {
        &**self.slots[i as usize]
            .get()
            .expect("layer indices come from this set")
    }

    /// How many of the mount's own lowers there are (indices `0..base`).
    pub fn base_len(&self) -> usize {
        self.base
    }

    /// The mount's own lowers with their indices.
    pub fn base(&self) -> impl Iterator<Item = (u32, &dyn Layer)> {
        (0..self.base as u32).map(|i| (i, self.get(i)))
    }

    /// Every layer added so far.
    pub fn all(&self) -> impl Iterator<Item = &dyn Layer> {
        let n = self.len.load(Ordering::Acquire);
        (0..n as u32).map(|i| self.get(i))
    }

    /// Whether layer `i` is a frozen layer of the workspace (an earlier
    /// upper): its objects are keyed like upper objects.
    pub fn is_frozen(&self, i: u32) -> bool {
        i as usize >= self.base
    }

    /// Adds a frozen layer; its index.
    pub fn push(&self, layer: Box<dyn Layer>) -> Result<u32, String> {
        let _g = self.push.lock();
        let i = self.len.load(Ordering::Acquire);
        let slot = self.slots.get(i).ok_or_else(|| {
            format!("this daemon has added {MAX_FROZEN} snapshot layers; remount to add more")
        })?;
        let _ = slot.set(layer);
        self.len.store(i + 1, Ordering::Release);
        Ok(i as u32)
    }
}
