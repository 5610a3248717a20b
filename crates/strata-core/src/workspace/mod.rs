//! Snapshots and branches of an overlay's writable state.

pub mod ids;
pub mod state;
