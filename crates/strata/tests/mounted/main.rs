//! Mounted tests: the real `strata` binary on real mounts, one module per
//! area, in one test binary (one link, one harness). `scale.rs` stays a
//! binary of its own: it is the slow group.

#[path = "../common/mod.rs"]
mod common;

mod archive;
mod cache;
mod churn;
mod cli_errors;
mod differential;
mod image_cli;
mod image_mount;
mod lifecycle;
mod mount_helper;
mod ops;
mod overlay;
mod remote;
mod transport;
mod union;
mod union_options;
mod view;
mod workspace;
