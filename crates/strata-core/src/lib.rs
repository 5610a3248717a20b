//! strata's core: everything that decides what the mounted namespace contains,
//! with no knowledge of FUSE. The FUSE adapter (`strata-fuse`) drives a
//! [`Filesystem`] implementation; tests drive it directly, without mounting.
//!
//! See docs/ARCHITECTURE.md for the model: layers, the inode table, and how
//! union, images, upper, snapshots and views plug in.

#![deny(unsafe_code)]

pub mod control;
pub mod errno;
pub mod fs;
pub mod host;
pub mod inode;
pub mod layer;
pub mod listing;
pub mod options;
pub mod overlay;
pub mod single;
pub mod source;
pub mod stack;
pub mod union;
pub mod workspace;
pub mod xattr;

pub use errno::{Errno, Result};
pub use fs::*;
