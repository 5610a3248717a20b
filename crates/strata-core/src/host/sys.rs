//! The only `unsafe` in strata-core: syscalls that `rustix` does not wrap.
//!
//! Each function is a direct, commented wrapper around one syscall, with the
//! buffers sized and owned on the Rust side.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::{Errno, Result};

/// Largest handle the kernel hands out (`MAX_HANDLE_SZ`).
const MAX_HANDLE_SZ: usize = 128;

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct RawHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// A persistent reference to a host inode (`name_to_handle_at`), small enough
/// to keep for every inode the kernel knows, unlike an open fd.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FileHandle {
    handle_type: i32,
    bytes: HandleBytes,
}

/// Handles of up to this many bytes (tmpfs 12, ext4 8, xfs 8 to 12) are kept
/// inline: no second allocation per node.
const INLINE_HANDLE: usize = 14;

// A thin pointer (a boxed slice is two words) keeps the enum at 16 bytes.
#[allow(clippy::box_collection)]
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum HandleBytes {
    /// Zero-filled past `len`, so equal handles compare equal.
    Inline {
        len: u8,
        buf: [u8; INLINE_HANDLE],
    },
    Heap(Box<Vec<u8>>),
}

impl FileHandle {
    pub fn new(handle_type: i32, bytes: &[u8]) -> FileHandle {
        let bytes = if bytes.len() <= INLINE_HANDLE {
            let mut buf = [0; INLINE_HANDLE];
            buf[..bytes.len()].copy_from_slice(bytes);
            HandleBytes::Inline {
                len: bytes.len() as u8,
                buf,
            }
        } else {
            HandleBytes::Heap(Box::new(bytes.to_vec()))
        };
        FileHandle { handle_type, bytes }
    }

    fn bytes(&self) -> &[u8] {
        match &self.bytes {
            HandleBytes::Inline { len, buf } => &buf[..*len as usize],
            HandleBytes::Heap(v) => v,
        }
    }
}

/// `name_to_handle_at(dirfd, name, flags)`: returns the handle and the mount id.
/// `flags` may hold `AT_EMPTY_PATH`; symlinks are never followed.
pub fn name_to_handle_at(
    dirfd: BorrowedFd<'_>,
    name: &CStr,
    flags: i32,
) -> Result<(FileHandle, i32)> {
    let mut raw = RawHandle {
        handle_bytes: MAX_HANDLE_SZ as u32,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `raw` is a valid `struct file_handle` whose `handle_bytes` states
    // the capacity of `f_handle`; `name` is NUL-terminated; the kernel writes at
    // most `handle_bytes` bytes and one int to `mount_id`.
    let rc = unsafe {
        libc::name_to_handle_at(
            dirfd.as_raw_fd(),
            name.as_ptr(),
            (&mut raw as *mut RawHandle).cast::<libc::file_handle>(),
            &mut mount_id,
            flags,
        )
    };
    if rc != 0 {
        return Err(Errno::last());
    }
    let len = (raw.handle_bytes as usize).min(MAX_HANDLE_SZ);
    Ok((
        FileHandle::new(raw.handle_type, &raw.f_handle[..len]),
        mount_id,
    ))
}

/// `open_by_handle_at(mount_fd, handle, flags)`. Needs CAP_DAC_READ_SEARCH.
pub fn open_by_handle_at(
    mount_fd: BorrowedFd<'_>,
    handle: &FileHandle,
    flags: i32,
) -> Result<OwnedFd> {
    let mut raw = RawHandle {
        handle_bytes: handle.bytes().len() as u32,
        handle_type: handle.handle_type,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    raw.f_handle[..handle.bytes().len()].copy_from_slice(handle.bytes());
    // SAFETY: `raw` is a valid `struct file_handle` filled from a handle the
    // kernel gave us; the kernel only reads it. On success the returned fd is
    // new and owned by nobody else.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            (&mut raw as *mut RawHandle).cast::<libc::file_handle>(),
            flags | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `fd` is a freshly opened descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `mallopt(M_ARENA_MAX, max)`: at most `max` malloc arenas (glibc). Call
/// it before starting threads; a no-op with other C libraries.
pub fn limit_malloc_arenas(max: i32) {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a glibc tunable; it takes no pointers.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, max);
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = max;
}

/// `fanotify_init(flags, event_f_flags)`: a new notification group.
pub fn fanotify_init(flags: u32, event_f_flags: u32) -> Result<OwnedFd> {
    // SAFETY: plain integer arguments; on success the kernel returns a new fd.
    let fd = unsafe { libc::fanotify_init(flags, event_f_flags) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fanotify_mark(group, flags, mask, AT_FDCWD, path)`.
pub fn fanotify_mark(group: BorrowedFd<'_>, flags: u32, mask: u64, path: &CStr) -> Result<()> {
    // SAFETY: `group` is a live fanotify fd and `path` is NUL-terminated; the
    // kernel only reads the path.
    let rc = unsafe {
        libc::fanotify_mark(
            group.as_raw_fd(),
            flags,
            mask,
            libc::AT_FDCWD,
            path.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(Errno::last());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_keep_their_bytes_inline_or_boxed() {
        for len in [0u8, 8, 12, 14, 15, 40, 128] {
            let bytes: Vec<u8> = (1..=len).collect();
            let h = FileHandle::new(7, &bytes);
            assert_eq!(h.bytes(), &bytes[..], "{len} bytes");
            assert_eq!(h, FileHandle::new(7, &bytes));
        }
        // Trailing zeros are part of a handle.
        assert_ne!(FileHandle::new(1, b"ab"), FileHandle::new(1, b"ab\0"));
        // Kept for every known inode: no bigger than a boxed slice and a type.
        assert!(size_of::<FileHandle>() <= 24);
    }
}
