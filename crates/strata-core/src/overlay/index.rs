//! An index of a directory's frozen lowers: which of them hold each name.
//! A branch that has been snapshotted many times keeps a directory it
//! touched each time in as many frozen layers; resolving a name there would
//! probe every one of them. Frozen layers never change, so a directory node
//! lists them once and then probes only the layers that have the name, and
//! lists itself without reading them again.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::Arc;

use smallvec::SmallVec;

use super::format::{self, Listed};
use super::{LRef, Overlay};
use crate::Result;
use crate::fs::FileKind;

/// Frozen lowers a directory needs before it is indexed: below that, the
/// probes cost less than the listing.
const MIN_FROZEN: usize = 4;

/// One frozen layer's entry for a name.
#[derive(Clone, Copy)]
pub(super) struct Held {
    /// Position among the directory's lowers.
    pub pos: u16,
    pub kind: FileKind,
    pub key: (u64, u64),
    pub whiteout: bool,
}

pub(super) struct FrozenIndex {
    /// The layers covered: the first lowers of the directory, in order.
    layers: Vec<u32>,
    pub names: HashMap<CString, SmallVec<[Held; 1]>>,
}

impl FrozenIndex {
    /// How many of the directory's first lowers it covers.
    pub fn covered(&self) -> usize {
        self.layers.len()
    }

    /// Positions (among the covered lowers) holding `name`.
    pub fn positions(&self, name: &std::ffi::CStr) -> SmallVec<[u16; 2]> {
        self.names
            .get(name)
            .map(|v| v.iter().map(|h| h.pos).collect())
            .unwrap_or_default()
    }

    fn matches(&self, lowers: &[LRef]) -> bool {
        lowers.len() >= self.layers.len()
            && self.layers.iter().zip(lowers).all(|(l, r)| *l == r.layer)
    }
}

impl Overlay {
    /// The index of directory `node`'s frozen lowers (`lowers`, its current
    /// list), made on first use; `None` where it has few.
    pub(super) fn frozen_index(
        &self,
        slot: &parking_lot::Mutex<Option<Arc<FrozenIndex>>>,
        lowers: &[LRef],
    ) -> Result<Option<Arc<FrozenIndex>>> {
        let frozen = lowers
            .iter()
            .take_while(|r| self.layers.is_frozen(r.layer))
            .count();
        if frozen < MIN_FROZEN {
            return Ok(None);
        }
        if let Some(ix) = slot.lock().as_ref()
            && ix.matches(lowers)
            && ix.covered() == frozen
        {
            return Ok(Some(ix.clone()));
        }
        let mut names: HashMap<CString, SmallVec<[Held; 1]>> = HashMap::new();
        let mut listed: Vec<Listed> = Vec::new();
        for (pos, r) in lowers[..frozen].iter().enumerate() {
            format::list_layer(self.layer(r), &r.obj, &mut listed)?;
            for l in listed.drain(..) {
                names.entry(l.name).or_default().push(Held {
                    pos: pos as u16,
                    kind: l.kind,
                    key: l.key,
                    whiteout: l.whiteout,
                });
            }
        }
        let ix = Arc::new(FrozenIndex {
            layers: lowers[..frozen].iter().map(|r| r.layer).collect(),
            names,
        });
        *slot.lock() = Some(ix.clone());
        Ok(Some(ix))
    }
}
