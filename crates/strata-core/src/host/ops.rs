//! Operations on one host object through its descriptors, shared by every
//! layer that stores data in host directories (single directory, union branches,
//! later the upper).

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, Gid, Mode, OFlags, Stat, Timespec, Timestamps, Uid, XattrFlags};

use super::HostDir;
use crate::fs::{Ctx, SetAttr, SetTime, Xattr};
use crate::{Errno, Result};

fn to_timespec(t: Option<SetTime>) -> Timespec {
    match t {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        Some(SetTime::Now) => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        Some(SetTime::At(t)) => match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: d.subsec_nanos() as _,
            },
            Err(e) => {
                let d = e.duration();
                let mut sec = -(d.as_secs() as i64);
                let mut nsec = d.subsec_nanos() as i64;
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Timespec {
                    tv_sec: sec,
                    tv_nsec: nsec as _,
                }
            }
        },
    }
}

/// Applies `set` to the object behind the O_PATH fd `fd`; `file` is an open
/// descriptor of it when the kernel named one (ftruncate, fchmod).
pub fn set_attr(
    host: &HostDir,
    fd: BorrowedFd<'_>,
    file: Option<BorrowedFd<'_>>,
    set: &SetAttr,
) -> Result<()> {
    if set.uid.is_some() || set.gid.is_some() {
        rustix::fs::chownat(
            fd,
            c"",
            set.uid.map(Uid::from_raw),
            set.gid.map(Gid::from_raw),
            AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        )?;
    }
    if let Some(mode) = set.mode {
        match file {
            Some(f) => rustix::fs::fchmod(f, Mode::from_raw_mode(mode & 0o7777))?,
            None => host.chmod_fd(fd, mode)?,
        }
    }
    if let Some(size) = set.size {
        match file {
            Some(f) => rustix::fs::ftruncate(f, size)?,
            None => {
                let w = host.reopen(fd, OFlags::WRONLY)?;
                rustix::fs::ftruncate(&w, size)?
            }
        }
    }
    if let (Some(caller), None) = (set.kill_suidgid, set.mode) {
        kill_suidgid(host, fd, file, &caller)?;
    }
    if set.atime.is_some() || set.mtime.is_some() {
        let times = Timestamps {
            last_access: to_timespec(set.atime),
            last_modification: to_timespec(set.mtime),
        };
        rustix::fs::utimensat(
            fd,
            c"",
            &times,
            AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        )?;
    }
    Ok(())
}

/// Drops S_ISUID, and S_ISGID when group-executable or when the caller is
/// not in the file's group, as the kernel does when a caller without
/// CAP_FSETID writes to or truncates a regular file.
fn kill_suidgid(
    host: &HostDir,
    fd: BorrowedFd<'_>,
    file: Option<BorrowedFd<'_>>,
    caller: &Ctx,
) -> Result<()> {
    let st = host.stat_fd(fd)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG
        || st.st_mode & (libc::S_ISUID | libc::S_ISGID) == 0
    {
        return Ok(());
    }
    let mut mode = st.st_mode & 0o7777 & !libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 || !caller.in_group(st.st_gid) {
        mode &= !libc::S_ISGID;
    }
    if mode == st.st_mode & 0o7777 {
        return Ok(());
    }
    match file {
        Some(f) => rustix::fs::fchmod(f, Mode::from_raw_mode(mode))?,
        None => host.chmod_fd(fd, mode)?,
    }
    Ok(())
}

/// Permission bits to create with. The kernel leaves the umask to us
/// (FUSE_DONT_MASK) because it must not apply under a default ACL: there
/// the host derives the mode from the ACL.
pub fn create_perm(host: &HostDir, parent: BorrowedFd<'_>, mode: u32, umask: u32) -> u32 {
    let perm = mode & 0o7777;
    if umask & 0o777 == 0 || has_default_acl(host, parent) {
        perm
    } else {
        perm & !umask
    }
}

fn has_default_acl(host: &HostDir, dir: BorrowedFd<'_>) -> bool {
    let path = host.proc_path(dir);
    rustix::fs::getxattr_query(path.as_c_str(), c"system.posix_acl_default").is_ok_and(|n| n > 0)
}

/// Gives a new object to the caller: the daemon creates as root, so the owner
/// is set afterwards, the group following a setgid parent as the kernel
/// would. `target`+`name` name the object (`name` empty: `target` is it).
/// `st` is its stat right after creation.
pub fn give_to_caller(
    host: &HostDir,
    ctx: &Ctx,
    parent: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    name: &CStr,
    st: &Stat,
) -> Result<()> {
    let pst = host.stat_fd(parent)?;
    let gid = if pst.st_mode & libc::S_ISGID != 0 {
        pst.st_gid
    } else {
        ctx.gid
    };
    if st.st_uid == ctx.uid && st.st_gid == gid {
        return Ok(());
    }
    let empty = if name.is_empty() {
        AtFlags::EMPTY_PATH
    } else {
        AtFlags::empty()
    };
    rustix::fs::chownat(
        target,
        name,
        Some(Uid::from_raw(ctx.uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW | empty,
    )?;
    let kind = st.st_mode & libc::S_IFMT;
    if st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0
        && kind != libc::S_IFDIR
        && kind != libc::S_IFLNK
    {
        // chown cleared setuid/setgid on a non-directory; put them back.
        rustix::fs::chmodat(
            target,
            name,
            Mode::from_raw_mode(st.st_mode & 0o7777),
            empty,
        )?;
    }
    Ok(())
}

/// create(2) for a layer: makes the file `name` in `parent` with the
/// kernel's `mode`, `umask` and open `flags`, gives it to the caller, and
/// runs `register` (the layer's lookup of the new name). If any step fails,
/// nothing is left behind.
///
/// Without O_EXCL, a file a racing caller made since the kernel's lookup is
/// opened instead, as open(2) would: the kernel only asks to create a name
/// it saw missing, and answers EEXIST to the caller if we did.
#[allow(clippy::too_many_arguments)]
pub fn create_file<T>(
    host: &HostDir,
    ctx: &Ctx,
    parent: BorrowedFd<'_>,
    name: &CStr,
    mode: u32,
    umask: u32,
    flags: i32,
    register: impl FnOnce() -> Result<T>,
) -> Result<(T, OwnedFd)> {
    let perm = create_perm(host, parent, mode, umask);
    let mut attempts = 0;
    let fd = loop {
        let made = rustix::fs::openat(
            parent,
            name,
            open_flags(flags) | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            Mode::from_raw_mode(perm),
        );
        match made {
            Err(rustix::io::Errno::EXIST) if flags & libc::O_EXCL == 0 && attempts < 3 => {
                attempts += 1;
                match open_existing(host, ctx, parent, name, flags) {
                    Ok(fd) => return Ok((register()?, fd)),
                    // Gone again: create it after all.
                    Err(Errno::ENOENT) => continue,
                    Err(e) => return Err(e),
                }
            }
            made => break made?,
        }
    };
    let res = rustix::fs::fstat(&fd)
        .map_err(Errno::from)
        .and_then(|st| give_to_caller(host, ctx, parent, fd.as_fd(), c"", &st))
        .and_then(|()| register());
    match res {
        Ok(registered) => Ok((registered, fd)),
        Err(e) => {
            let _ = rustix::fs::unlinkat(parent, name, AtFlags::empty());
            Err(e)
        }
    }
}

/// Opens the existing `name` in `parent` for a create(2) without O_EXCL,
/// checking the caller's access to it (the kernel checked only the
/// directory). A symlink is not followed: EEXIST, as the kernel's retry
/// would find it.
fn open_existing(
    host: &HostDir,
    ctx: &Ctx,
    parent: BorrowedFd<'_>,
    name: &CStr,
    flags: i32,
) -> Result<OwnedFd> {
    let fd = rustix::fs::openat(
        parent,
        name,
        open_flags(flags & !libc::O_TRUNC) | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP => Errno::EEXIST,
        e => e.into(),
    })?;
    let st = rustix::fs::fstat(&fd)?;
    let mut mask = match flags & libc::O_ACCMODE {
        libc::O_RDONLY => libc::R_OK,
        libc::O_WRONLY => libc::W_OK,
        _ => libc::R_OK | libc::W_OK,
    };
    if flags & libc::O_TRUNC != 0 {
        mask |= libc::W_OK;
    }
    check_access(ctx, st.st_mode, st.st_uid, st.st_gid, mask)?;
    if flags & libc::O_TRUNC != 0 && st.st_mode & libc::S_IFMT == libc::S_IFREG {
        // Only now that the caller may write it (O_RDONLY|O_TRUNC truncates too).
        if flags & libc::O_ACCMODE == libc::O_RDONLY {
            rustix::fs::ftruncate(host.reopen(fd.as_fd(), OFlags::WRONLY)?, 0)?;
        } else {
            rustix::fs::ftruncate(&fd, 0)?;
        }
    }
    Ok(fd)
}

/// Hands a just-made directory, node or symlink `name` in `parent` to the
/// caller; removes it if that fails, so no root-owned object is left.
pub fn finish_new(host: &HostDir, ctx: &Ctx, parent: BorrowedFd<'_>, name: &CStr) -> Result<()> {
    let st = host.stat_child(parent, name)?;
    let res = give_to_caller(host, ctx, parent, parent, name, &st);
    if res.is_err() {
        let flags = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        let _ = rustix::fs::unlinkat(parent, name, flags);
    }
    res
}

/// Open flags for reopening a node: creation flags are the kernel's business.
pub fn open_flags(flags: i32) -> OFlags {
    // O_NOFOLLOW was for the kernel's walk, done by now: on our reopen
    // through /proc/self/fd (a link) it would fail every open with ELOOP.
    let strip = libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW;
    OFlags::from_bits_retain(((flags & !strip) as u32) & !OFlags::PATH.bits())
}

/// `link(2)` of the object behind the O_PATH fd `fd` to `name` in `new_parent`.
pub fn link_fd(
    host: &HostDir,
    fd: BorrowedFd<'_>,
    new_parent: BorrowedFd<'_>,
    name: &CStr,
) -> Result<()> {
    match rustix::fs::linkat(fd, c"", new_parent, name, AtFlags::EMPTY_PATH) {
        Ok(()) => Ok(()),
        // Without CAP_DAC_READ_SEARCH, AT_EMPTY_PATH is refused: go through /proc.
        Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::PERM) => {
            let path = host.proc_path(fd);
            rustix::fs::linkat(
                rustix::fs::CWD,
                path.as_c_str(),
                new_parent,
                name,
                AtFlags::SYMLINK_FOLLOW,
            )?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

pub fn readlink(fd: BorrowedFd<'_>) -> Result<Vec<u8>> {
    Ok(rustix::fs::readlinkat(fd, c"", Vec::new())?.into_bytes())
}

fn xattr_name(name: &OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)
}

/// Extended attributes of an O_PATH fd, through its `/proc/self/fd` entry.
pub fn getxattr(host: &HostDir, fd: BorrowedFd<'_>, name: &OsStr, size: u32) -> Result<Xattr> {
    let path = host.proc_path(fd);
    let cname = xattr_name(name)?;
    let res = if size == 0 {
        rustix::fs::getxattr_query(path.as_c_str(), cname.as_c_str()).map(|n| Xattr::Size(n as u32))
    } else {
        let mut buf = vec![0u8; size as usize];
        rustix::fs::getxattr(path.as_c_str(), cname.as_c_str(), &mut buf[..]).map(|n| {
            buf.truncate(n);
            Xattr::Data(buf)
        })
    };
    res.map_err(|e| crate::xattr::absent(name, e.into()))
}

pub fn listxattr(host: &HostDir, fd: BorrowedFd<'_>, size: u32) -> Result<Xattr> {
    let path = host.proc_path(fd);
    if size == 0 {
        let n = rustix::fs::listxattr_query(path.as_c_str())?;
        return Ok(Xattr::Size(n as u32));
    }
    let mut buf = vec![0u8; size as usize];
    let n = rustix::fs::listxattr(path.as_c_str(), &mut buf[..])?;
    buf.truncate(n);
    Ok(Xattr::Data(buf))
}

pub fn setxattr(
    host: &HostDir,
    fd: BorrowedFd<'_>,
    name: &OsStr,
    value: &[u8],
    flags: i32,
) -> Result<()> {
    let path = host.proc_path(fd);
    rustix::fs::setxattr(
        path.as_c_str(),
        xattr_name(name)?.as_c_str(),
        value,
        XattrFlags::from_bits_retain(flags as u32),
    )?;
    Ok(())
}

pub fn removexattr(host: &HostDir, fd: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    let path = host.proc_path(fd);
    rustix::fs::removexattr(path.as_c_str(), xattr_name(name)?.as_c_str())?;
    Ok(())
}

/// `access(2)` as the kernel would answer it from the mode bits, for the
/// cases `default_permissions` leaves to the filesystem.
pub fn access(host: &HostDir, ctx: &Ctx, fd: BorrowedFd<'_>, mask: i32) -> Result<()> {
    let st = host.stat_fd(fd)?;
    check_access(ctx, st.st_mode, st.st_uid, st.st_gid, mask)
}

/// The mode-bit check behind [`access`], for objects known by their metadata.
pub fn check_access(ctx: &Ctx, mode: u32, uid: u32, gid: u32, mask: i32) -> Result<()> {
    let want = (mask & 0o7) as u32;
    if want == 0 {
        return Ok(());
    }
    if ctx.uid == 0 {
        // root may do anything but execute a file nobody may execute.
        let x_ok = want & 1 == 0 || mode & 0o111 != 0 || mode & libc::S_IFMT == libc::S_IFDIR;
        return if x_ok { Ok(()) } else { Err(Errno::EACCES) };
    }
    let bits = if uid == ctx.uid {
        (mode >> 6) & 7
    } else if gid == ctx.gid {
        (mode >> 3) & 7
    } else {
        mode & 7
    };
    if bits & want == want {
        Ok(())
    } else {
        Err(Errno::EACCES)
    }
}

/// Copies the regular file behind the O_PATH fd `src` (of `src_host`) to
/// `name` in the directory `dst_dir`: data, owner, mode, extended attributes
/// and times. The copy is written and synced under a temporary name and
/// renamed into place, so `name` is never seen half-written and survives a
/// crash once this returns (callers unlink the original afterwards).
pub fn copy_file(
    src_host: &HostDir,
    src: BorrowedFd<'_>,
    dst_dir: BorrowedFd<'_>,
    name: &CStr,
) -> Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let st = src_host.stat_fd(src)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(Errno::EINVAL);
    }
    let input = src_host.reopen(src, OFlags::RDONLY)?;
    let tmp = CString::new(format!(
        ".strata-copy.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ))
    .expect("no NUL");
    let out = rustix::fs::openat(
        dst_dir,
        tmp.as_c_str(),
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    let res = copy_data(&input, &out)
        .and_then(|()| copy_metadata(&input, &out, &st))
        .and_then(|()| Ok(rustix::fs::fsync(&out)?))
        .and_then(|()| {
            Ok(rustix::fs::renameat(
                dst_dir,
                tmp.as_c_str(),
                dst_dir,
                name,
            )?)
        });
    if res.is_err() {
        let _ = rustix::fs::unlinkat(dst_dir, tmp.as_c_str(), AtFlags::empty());
    }
    res
}

/// Copies all of `input` (from its offset) to `out`, in the kernel where it can.
pub fn copy_data(input: &OwnedFd, out: &OwnedFd) -> Result<()> {
    loop {
        match rustix::fs::copy_file_range(input, None, out, None, 1 << 30) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            // Across filesystems some kernels refuse: copy by hand.
            Err(
                rustix::io::Errno::XDEV
                | rustix::io::Errno::INVAL
                | rustix::io::Errno::NOSYS
                | rustix::io::Errno::OPNOTSUPP,
            ) => break,
            Err(e) => return Err(e.into()),
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = rustix::io::read(input, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        let mut done = 0;
        while done < n {
            done += rustix::io::write(out, &buf[done..n])?;
        }
    }
}

fn copy_metadata(input: &OwnedFd, out: &OwnedFd, st: &Stat) -> Result<()> {
    let mut names = vec![0u8; 64 * 1024];
    let len = rustix::fs::flistxattr(input, &mut names).unwrap_or(0);
    let mut value = vec![0u8; 64 * 1024];
    for name in names[..len].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = CString::new(name).expect("split at NUL");
        let Ok(n) = rustix::fs::fgetxattr(input, name.as_c_str(), &mut value) else {
            continue;
        };
        match rustix::fs::fsetxattr(out, name.as_c_str(), &value[..n], XattrFlags::empty()) {
            // Namespaces the target does not have (e.g. security.* on tmpfs).
            Ok(()) | Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::PERM) => {}
            Err(e) => return Err(e.into()),
        }
    }
    rustix::fs::fchown(
        out,
        Some(Uid::from_raw(st.st_uid)),
        Some(Gid::from_raw(st.st_gid)),
    )?;
    // After chown, which clears setuid/setgid.
    rustix::fs::fchmod(out, Mode::from_raw_mode(st.st_mode & 0o7777))?;
    rustix::fs::futimens(
        out,
        &Timestamps {
            last_access: Timespec {
                tv_sec: st.st_atime,
                tv_nsec: st.st_atime_nsec as _,
            },
            last_modification: Timespec {
                tv_sec: st.st_mtime,
                tv_nsec: st.st_mtime_nsec as _,
            },
        },
    )?;
    Ok(())
}
