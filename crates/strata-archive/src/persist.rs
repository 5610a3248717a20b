//! The index kept across mounts: written after an archive is first
//! indexed, under a name made from the archive's identity (device, inode,
//! size, modification and change times), and read instead of the archive
//! the next time. A kept index is as untrusted as the archive: it is read
//! only when its checksum holds and it passes the same checks the index
//! builder guarantees (every name one component, a tree whose directories
//! list only their own children, sorted).

use std::fs::{File, Metadata};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::Format;
use crate::index::{Data, Kind, Member};

const MAGIC: &[u8; 8] = b"STRATAIX";
const VERSION: u32 = 1;

/// The file an archive with metadata `meta` keeps its index in, below `dir`.
pub(crate) fn index_path(dir: &Path, meta: &Metadata) -> PathBuf {
    let id = format!(
        "{}-{}-{}-{}.{}-{}.{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    );
    dir.join(format!("{}.idx", blake3::hash(id.as_bytes()).to_hex()))
}

fn format_byte(f: Format) -> u8 {
    match f {
        Format::Tar => 1,
        Format::TarGz => 2,
        Format::TarZst => 3,
        Format::TarXz => 4,
        Format::Zip => 5,
    }
}

fn kind_byte(k: Kind) -> u8 {
    match k {
        Kind::File => 1,
        Kind::Dir => 2,
        Kind::Symlink => 3,
        Kind::CharDevice => 4,
        Kind::BlockDevice => 5,
        Kind::Fifo => 6,
        Kind::Socket => 7,
    }
}

fn kind_of(b: u8) -> Option<Kind> {
    Some(match b {
        1 => Kind::File,
        2 => Kind::Dir,
        3 => Kind::Symlink,
        4 => Kind::CharDevice,
        5 => Kind::BlockDevice,
        6 => Kind::Fifo,
        7 => Kind::Socket,
        _ => return None,
    })
}

/// The index as bytes, checksum last.
pub(crate) fn encode(format: Format, members: &[Member], skipped: usize) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(format_byte(format));
    out.extend_from_slice(&(members.len() as u32).to_le_bytes());
    out.extend_from_slice(&(skipped as u32).to_le_bytes());
    for m in members {
        let bytes = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        };
        bytes(&mut out, &m.name);
        out.extend_from_slice(&m.parent.to_le_bytes());
        out.push(kind_byte(m.kind));
        for v in [m.perm, m.uid, m.gid] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&m.mtime.to_le_bytes());
        out.extend_from_slice(&m.size.to_le_bytes());
        out.extend_from_slice(&m.rdev.0.to_le_bytes());
        out.extend_from_slice(&m.rdev.1.to_le_bytes());
        bytes(&mut out, &m.target);
        out.extend_from_slice(&m.inode.to_le_bytes());
        out.extend_from_slice(&m.nlink.to_le_bytes());
        let (tag, v) = match m.data {
            Data::None => (0u8, 0u64),
            Data::Tar { offset } => (1, offset),
            Data::Zip { entry } => (2, entry as u64),
        };
        out.push(tag);
        out.extend_from_slice(&v.to_le_bytes());
        out.extend_from_slice(&(m.children.len() as u32).to_le_bytes());
        for c in &m.children {
            out.extend_from_slice(&c.to_le_bytes());
        }
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self, max: usize) -> Option<Vec<u8>> {
        let n = self.u32()? as usize;
        if n > max {
            return None;
        }
        Some(self.take(n)?.to_vec())
    }
}

/// The index in `bytes`, if they hold a sound one for an archive in
/// `format` (`zip_entries`: how many entries the zip's directory has).
pub(crate) fn decode(
    bytes: &[u8],
    format: Format,
    zip_entries: usize,
) -> Option<(Vec<Member>, usize)> {
    let (body, sum) = bytes.split_at(bytes.len().checked_sub(32)?);
    if blake3::hash(body).as_bytes() != sum {
        return None;
    }
    let mut r = Reader { buf: body };
    if r.take(8)? != MAGIC || r.u32()? != VERSION || r.u8()? != format_byte(format) {
        return None;
    }
    let count = r.u32()? as usize;
    let skipped = r.u32()? as usize;
    // Each member takes at least 60 bytes: a count beyond that is a lie.
    if count == 0 || count > body.len() / 60 + 1 {
        return None;
    }
    let mut members = Vec::with_capacity(count);
    for _ in 0..count {
        let name = r.bytes(255)?;
        let parent = r.u32()?;
        let kind = kind_of(r.u8()?)?;
        let (perm, uid, gid) = (r.u32()?, r.u32()?, r.u32()?);
        let mtime = r.u64()? as i64;
        let size = r.u64()?;
        let rdev = (r.u32()?, r.u32()?);
        let target = r.bytes(4095)?;
        let inode = r.u32()?;
        let nlink = r.u32()?;
        let data = match (r.u8()?, r.u64()?) {
            (0, _) => Data::None,
            (1, offset) if format != Format::Zip => Data::Tar { offset },
            (2, entry) if format == Format::Zip && (entry as usize) < zip_entries => Data::Zip {
                entry: entry as usize,
            },
            _ => return None,
        };
        let n = r.u32()? as usize;
        if n > count {
            return None;
        }
        let children = (0..n).map(|_| r.u32()).collect::<Option<Vec<u32>>>()?;
        members.push(Member {
            name,
            parent,
            kind,
            perm: perm & 0o7777,
            uid,
            gid,
            mtime,
            size,
            rdev,
            target,
            inode,
            nlink,
            children,
            data,
        });
    }
    if !r.buf.is_empty() || !sound(&members) {
        return None;
    }
    Some((members, skipped))
}

/// What the index builder guarantees, checked of a kept index.
fn sound(members: &[Member]) -> bool {
    let root = &members[0];
    if root.kind != Kind::Dir || !root.name.is_empty() || root.parent != 0 {
        return false;
    }
    let n = members.len() as u32;
    for (i, m) in members.iter().enumerate() {
        if i > 0 && strata_image::entry_name_problem(&m.name).is_some() {
            return false;
        }
        if m.parent >= n || members[m.parent as usize].kind != Kind::Dir {
            return false;
        }
        if m.kind == Kind::Symlink && (m.target.is_empty() || m.target.contains(&0)) {
            return false;
        }
        if m.kind == Kind::File && (m.inode >= n || members[m.inode as usize].kind != Kind::File) {
            return false;
        }
        if m.kind != Kind::Dir && !m.children.is_empty() {
            return false;
        }
        // Children: in range, never the root, each this directory's own,
        // sorted by name without repeats (so a lookup finds one, and no
        // directory lists an ancestor).
        for &c in &m.children {
            if c == 0 || c >= n || members[c as usize].parent != i as u32 {
                return false;
            }
        }
        for w in m.children.windows(2) {
            if members[w[0] as usize].name >= members[w[1] as usize].name {
                return false;
            }
        }
    }
    true
}

/// Keeps the index for the next mount (best effort: a read-only or full
/// disk costs only the next mount's time).
pub(crate) fn store(path: &Path, bytes: &[u8]) {
    let Some(dir) = path.parent() else { return };
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| File::create(&tmp))
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!(path = %path.display(), "archive index not kept: {e}");
    }
}

/// Marks a kept index as just used, so pruning ([`prune`]) keeps it.
pub(crate) fn touch(path: &Path) {
    if let Ok(f) = File::options().write(true).open(path) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// Removes the kept indexes below `dir` not used for `unused` (and
/// temporaries of writes that died); returns (files removed, bytes).
pub fn prune(dir: &Path, unused: std::time::Duration) -> std::io::Result<(usize, u64)> {
    let now = std::time::SystemTime::now();
    let (mut files, mut bytes) = (0, 0);
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let meta = entry.metadata()?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let age = now.duration_since(meta.modified()?).unwrap_or_default();
        let stale = if name.ends_with(".idx") {
            age > unused
        } else {
            name.contains(".tmp.") && age > std::time::Duration::from_secs(3600)
        };
        if meta.is_file() && stale {
            std::fs::remove_file(entry.path())?;
            files += 1;
            bytes += meta.len();
        }
    }
    Ok((files, bytes))
}
