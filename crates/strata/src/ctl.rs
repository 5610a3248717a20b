//! `strata ctl`: a mount's runtime keys (the union's settings among them)
//! without knowing xattrs. It reads and writes the `user.strata.*` xattrs of
//! `MOUNTPOINT/.strata`, and checks values first with the daemon's own
//! parser so errors say why.

use std::path::{Path, PathBuf};

use strata_core::control::NAME as CONTROL_NAME;
use strata_core::source::check_apart;
use strata_core::union::Settings;
use strata_core::union::control::edit_branches;

use crate::commands::{Failure, failure, usage};
use crate::output::outln;

pub const PREFIX: &str = "user.strata.";

/// The control file of the strata mount at `mountpoint`.
pub fn control_file(mountpoint: &Path) -> Result<PathBuf, Failure> {
    let control = mountpoint.join(CONTROL_NAME);
    match std::fs::symlink_metadata(&control) {
        Ok(_) => Ok(control),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(usage(format!(
            "{}: not a strata mount (no {CONTROL_NAME})",
            mountpoint.display()
        ))),
        Err(e) => Err(failure(format!("{}: {e}", mountpoint.display()))),
    }
}

/// Key `key` of the control file `control`; `None`: the mount has no such key.
pub fn read_key(control: &Path, key: &str) -> Result<Option<String>, Failure> {
    let name = format!("{PREFIX}{key}");
    let mut buf = vec![0u8; 64 * 1024];
    match rustix::fs::getxattr(control, name.as_str(), &mut buf) {
        Ok(n) => Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned())),
        Err(rustix::io::Errno::NODATA) => Ok(None),
        Err(e) => Err(failure(format!("{}: {key}: {e}", control.display()))),
    }
}

/// Key `key`, which the mount must have.
pub fn get(control: &Path, key: &str) -> Result<String, Failure> {
    read_key(control, key)?.ok_or_else(|| usage(format!("unknown key '{key}'")))
}

fn keys(control: &Path) -> Result<Vec<String>, Failure> {
    let mut buf = vec![0u8; 64 * 1024];
    let n = rustix::fs::listxattr(control, &mut buf)
        .map_err(|e| failure(format!("{}: {e}", control.display())))?;
    Ok(buf[..n]
        .split(|b| *b == 0)
        .filter_map(|k| std::str::from_utf8(k).ok()?.strip_prefix(PREFIX))
        .map(str::to_string)
        .collect())
}

fn set(control: &Path, mountpoint: &Path, key: &str, value: &str) -> Result<(), Failure> {
    // Same checks as the daemon, so a refusal comes with its reason.
    if key == "branches" {
        let current = strata_core::source::parse_branches(&get(control, "branches")?)
            .map_err(|e| failure(format!("daemon reported bad branches: {e}")))?;
        let next = edit_branches(&current, value).map_err(|e| usage(format!("branches: {e}")))?;
        for b in next.iter().filter(|b| !current.contains(b)) {
            check_apart(mountpoint, "branch", &b.path)
                .map_err(|e| usage(format!("branches: {e}")))?;
        }
    } else if Settings::default().get(key).is_some() {
        Settings::default()
            .set(key, value)
            .map_err(|e| usage(format!("{key}: {e}")))?;
    }
    let name = format!("{PREFIX}{key}");
    rustix::fs::setxattr(
        control,
        name.as_str(),
        value.as_bytes(),
        rustix::fs::XattrFlags::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::NODATA => usage(format!("unknown key '{key}'")),
        rustix::io::Errno::INVAL => usage(format!(
            "{key}={value} refused (read-only key, or see the daemon log)"
        )),
        rustix::io::Errno::PERM => failure(format!("{key}: only root may change settings")),
        e => failure(format!("{}: {key}: {e}", control.display())),
    })
}

pub fn run(mountpoint: &Path, action: &str, args: &[String]) -> Result<(), Failure> {
    let control = control_file(mountpoint)?;
    // Resolved from outside the mount, as the daemon did when it mounted.
    let mountpoint = &std::fs::canonicalize(mountpoint)
        .map_err(|e| failure(format!("{}: {e}", mountpoint.display())))?;
    match (action, args) {
        ("list", []) => {
            for k in keys(&control)? {
                outln!("{k}={}", get(&control, &k)?)?;
            }
        }
        ("get", [key]) => outln!("{}", get(&control, key)?)?,
        ("set", pairs) if !pairs.is_empty() => {
            for pair in pairs {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| usage(format!("'{pair}': expected KEY=VALUE")))?;
                set(&control, mountpoint, k, v)?;
            }
        }
        _ => {
            return Err(usage(
                "usage: strata ctl MOUNTPOINT list | get KEY | set KEY=VALUE...",
            ));
        }
    }
    Ok(())
}
