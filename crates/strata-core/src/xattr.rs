//! Extended-attribute answers shared by every layer.

use std::ffi::OsStr;

use crate::Errno;

/// The LSM label xattr. When an LSM such as SELinux is active the kernel
/// answers it for FUSE mounts itself and never asks the daemon.
const SELINUX: &str = "security.selinux";

/// Maps a host "no such attribute" to what the mount reports.
///
/// A `security.selinux` request reaches the daemon only when no LSM labels
/// this mount, so an absent label is reported as "not supported" rather than
/// ENODATA. That is what a label-less filesystem says, and it lets
/// `ls -l` (coreutils caches ENOTSUP per device) stop asking once instead of
/// costing a round trip per file. Labels stored on the host are still served.
pub fn absent(name: &OsStr, e: Errno) -> Errno {
    if e == Errno::ENODATA && name == SELINUX {
        Errno::ENOTSUP
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_selinux_label_becomes_unsupported() {
        let sel = OsStr::new("security.selinux");
        assert_eq!(absent(sel, Errno::ENODATA), Errno::ENOTSUP);
        assert_eq!(absent(sel, Errno::EACCES), Errno::EACCES);
        let user = OsStr::new("user.x");
        assert_eq!(absent(user, Errno::ENODATA), Errno::ENODATA);
        let cap = OsStr::new("security.capability");
        assert_eq!(absent(cap, Errno::ENODATA), Errno::ENODATA);
    }
}
