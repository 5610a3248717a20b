//! Building the index: each archive entry's path checked and split into
//! components, implied directories made, conflicts settled.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;

pub use strata_image::Kind;
use strata_image::entry_name_problem;

/// Where a member's data is.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Data {
    None,
    /// Offset of the data in the (decompressed) tar stream.
    Tar {
        offset: u64,
    },
    /// Entry number in the zip's central directory.
    Zip {
        entry: usize,
    },
}

/// One name in the archive's tree.
#[derive(Clone, Debug)]
pub struct Member {
    /// One path component; empty for the root.
    pub name: Vec<u8>,
    pub parent: u32,
    pub kind: Kind,
    /// Permission bits (07777).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub size: u64,
    /// Device number (major, minor) of a device member.
    pub rdev: (u32, u32),
    /// A symlink's target, as stored.
    pub target: Vec<u8>,
    /// The member whose data and identity this one shares: itself, or the
    /// first name of a hard-linked file.
    pub inode: u32,
    pub nlink: u32,
    pub(crate) children: Vec<u32>,
    pub(crate) data: Data,
}

/// A zip member may declare at most this many times its compressed size
/// (deflate cannot do better than about 1032:1) once it declares more than
/// `BOMB_FLOOR` bytes.
const MAX_RATIO: u64 = 1100;
const BOMB_FLOOR: u64 = 1 << 20;
/// Longest symlink target kept (PATH_MAX).
const MAX_TARGET: usize = 4095;

struct Builder<'a> {
    members: Vec<Member>,
    names: HashMap<(u32, Vec<u8>), u32>,
    /// Times of directories the archive only implies.
    mtime: i64,
    skipped: usize,
    archive: &'a str,
}

impl<'a> Builder<'a> {
    fn new(mtime: i64, archive: &'a str) -> Builder<'a> {
        let root = dir_member(Vec::new(), 0, mtime);
        Builder {
            members: vec![root],
            names: HashMap::new(),
            mtime,
            skipped: 0,
            archive,
        }
    }

    fn skip(&mut self, path: &[u8], why: &str) {
        self.skipped += 1;
        tracing::warn!(
            archive = self.archive,
            member = %String::from_utf8_lossy(path),
            "left out: {why}"
        );
    }

    /// The directory `parts` names, made (as implied) where missing.
    fn dir(&mut self, parts: &[&[u8]]) -> Result<u32, &'static str> {
        let mut cur = 0u32;
        for part in parts {
            cur = match self.names.get(&(cur, part.to_vec())) {
                Some(&i) if self.members[i as usize].kind == Kind::Dir => i,
                Some(_) => return Err("a parent is not a directory"),
                None => {
                    let dir = dir_member(part.to_vec(), cur, self.mtime);
                    self.insert(cur, dir)
                }
            };
        }
        Ok(cur)
    }

    fn insert(&mut self, parent: u32, mut m: Member) -> u32 {
        let i = self.members.len() as u32;
        if m.kind != Kind::File || m.inode == 0 {
            m.inode = i;
        }
        m.parent = parent;
        self.names.insert((parent, m.name.clone()), i);
        self.members[parent as usize].children.push(i);
        self.members.push(m);
        i
    }

    /// Adds `m` at `path`; `link`: the path of the file it is a hard link to.
    fn add(&mut self, path: &[u8], mut m: Member, link: Option<&[u8]>) {
        let parts = match components(path) {
            Ok(p) => p,
            Err(why) => return self.skip(path, why),
        };
        if m.kind == Kind::Symlink
            && (m.target.is_empty() || m.target.len() > MAX_TARGET || m.target.contains(&0))
        {
            return self.skip(path, "bad symlink target");
        }
        if let Some(link) = link {
            match self.resolve(link) {
                Some(t) if self.members[t as usize].kind == Kind::File => {
                    let target = &self.members[t as usize];
                    m = Member {
                        name: Vec::new(),
                        inode: target.inode,
                        ..target.clone()
                    };
                    m.children = Vec::new();
                }
                _ => return self.skip(path, "hard link to no earlier regular file"),
            }
        }
        let Some((name, dirs)) = parts.split_last() else {
            // The root itself: a directory entry for it sets its metadata.
            if m.kind == Kind::Dir {
                let root = &mut self.members[0];
                (root.perm, root.uid, root.gid, root.mtime) = (m.perm, m.uid, m.gid, m.mtime);
            }
            return;
        };
        let parent = match self.dir(dirs) {
            Ok(p) => p,
            Err(why) => return self.skip(path, why),
        };
        m.name = name.to_vec();
        match self.names.get(&(parent, m.name.clone())).copied() {
            None => {
                self.insert(parent, m);
            }
            Some(old) => {
                let old_kind = self.members[old as usize].kind;
                match (old_kind == Kind::Dir, m.kind == Kind::Dir) {
                    (true, true) => {
                        let d = &mut self.members[old as usize];
                        (d.perm, d.uid, d.gid, d.mtime) = (m.perm, m.uid, m.gid, m.mtime);
                    }
                    (true, false) | (false, true) => {
                        self.skip(path, "a member of another type has the name")
                    }
                    (false, false) => {
                        // The last word: the name now shows this member; the
                        // old one stays for hard links made to it.
                        let siblings = &mut self.members[parent as usize].children;
                        siblings.retain(|&c| c != old);
                        self.insert(parent, m);
                    }
                }
            }
        }
    }

    /// The member a path names, if any.
    fn resolve(&self, path: &[u8]) -> Option<u32> {
        let parts = components(path).ok()?;
        let mut cur = 0u32;
        for part in parts {
            cur = *self.names.get(&(cur, part.to_vec()))?;
        }
        Some(cur)
    }

    fn finish(mut self) -> (Vec<Member>, usize) {
        let names: Vec<Vec<u8>> = self.members.iter().map(|m| m.name.clone()).collect();
        let mut links: HashMap<u32, u32> = HashMap::new();
        for m in &mut self.members {
            m.children
                .sort_by(|a, b| names[*a as usize].cmp(&names[*b as usize]));
        }
        // Link counts: a file's names (those still listed), a directory's
        // subdirectories plus two.
        let listed: Vec<u32> = self
            .members
            .iter()
            .flat_map(|m| m.children.iter().copied())
            .collect();
        let mut subdirs: HashMap<u32, u32> = HashMap::new();
        for &c in &listed {
            let m = &self.members[c as usize];
            if m.kind == Kind::Dir {
                *subdirs.entry(m.parent).or_default() += 1;
            } else {
                *links.entry(m.inode).or_default() += 1;
            }
        }
        for (i, m) in self.members.iter_mut().enumerate() {
            m.nlink = if m.kind == Kind::Dir {
                2 + subdirs.get(&(i as u32)).copied().unwrap_or(0)
            } else {
                links.get(&m.inode).copied().unwrap_or(1).max(1)
            };
        }
        (self.members, self.skipped)
    }
}

/// The components of a member path: empty and `.` parts dropped (so a
/// leading `/` or `./` is), every other part a valid name.
pub(crate) fn components(path: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    let mut out = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => continue,
            b".." => return Err("'..' in its path"),
            _ => {
                if let Some(why) = entry_name_problem(part) {
                    return Err(why);
                }
                out.push(part);
            }
        }
    }
    Ok(out)
}

/// A directory the archive implies (or its root): 0755, root's, `mtime`.
fn dir_member(name: Vec<u8>, parent: u32, mtime: i64) -> Member {
    Member {
        name,
        parent,
        mtime,
        nlink: 2,
        ..blank(Kind::Dir, 0o755)
    }
}

fn blank(kind: Kind, perm: u32) -> Member {
    Member {
        name: Vec::new(),
        parent: 0,
        kind,
        perm: perm & 0o7777,
        uid: 0,
        gid: 0,
        mtime: 0,
        size: 0,
        rdev: (0, 0),
        target: Vec::new(),
        inode: 0,
        nlink: 1,
        children: Vec::new(),
        data: Data::None,
    }
}

/// Indexes a tar stream (already decompressed). A stream that breaks off
/// keeps the members read before the break.
pub(crate) fn index_tar(
    reader: Box<dyn Read + Send + '_>,
    mtime: i64,
    label: &str,
) -> (Vec<Member>, usize) {
    let mut b = Builder::new(mtime, label);
    let mut tar = tar::Archive::new(reader);
    let entries = match tar.entries() {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(archive = label, "unreadable: {e}");
            return b.finish();
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(archive = label, "stops here: {e}");
                break;
            }
        };
        let h = entry.header();
        use tar::EntryType as T;
        let kind = match h.entry_type() {
            T::Regular | T::Continuous | T::Link => Kind::File,
            T::Directory => Kind::Dir,
            T::Symlink => Kind::Symlink,
            T::Char => Kind::CharDevice,
            T::Block => Kind::BlockDevice,
            T::Fifo => Kind::Fifo,
            T::GNUSparse => {
                b.skip(&entry.path_bytes(), "sparse members are not supported");
                continue;
            }
            // Headers of headers (PAX, GNU long names) the reader applied.
            _ => continue,
        };
        let mut m = blank(kind, h.mode().unwrap_or(0o644));
        m.uid = h.uid().unwrap_or(0) as u32;
        m.gid = h.gid().unwrap_or(0) as u32;
        m.mtime = h.mtime().unwrap_or(0).min(i64::MAX as u64) as i64;
        if matches!(kind, Kind::CharDevice | Kind::BlockDevice) {
            m.rdev = (
                h.device_major().ok().flatten().unwrap_or(0),
                h.device_minor().ok().flatten().unwrap_or(0),
            );
        }
        let is_link = h.entry_type() == T::Link;
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        if kind == Kind::Symlink {
            m.target = link.clone().unwrap_or_default();
        }
        if kind == Kind::File && !is_link {
            m.size = entry.size();
            m.data = Data::Tar {
                offset: entry.raw_file_position(),
            };
        }
        let path = entry.path_bytes().into_owned();
        let link = if is_link {
            Some(link.unwrap_or_default())
        } else {
            None
        };
        b.add(&path, m, link.as_deref());
    }
    b.finish()
}

/// Seconds since the epoch of a zip's DOS time (taken as UTC, which is
/// what tools that set no extended timestamp mean as often as not).
fn dos_time(t: zip::DateTime) -> i64 {
    let (y, mo, d) = (t.year() as i64, t.month() as i64, t.day() as i64);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + t.hour() as i64 * 3600 + t.minute() as i64 * 60 + t.second() as i64
}

/// Indexes a zip's central directory.
pub(crate) fn index_zip(
    z: &mut zip::ZipArchive<File>,
    mtime: i64,
    label: &str,
) -> (Vec<Member>, usize) {
    let mut b = Builder::new(mtime, label);
    for entry in 0..z.len() {
        let (path, mut m, is_link) = {
            let f = match z.by_index_raw(entry) {
                Ok(f) => f,
                Err(e) => {
                    b.skipped += 1;
                    tracing::warn!(archive = label, entry, "left out: {e}");
                    continue;
                }
            };
            let path = f.name_raw().to_vec();
            let mode = f.unix_mode();
            let (kind, default) = if f.is_dir() {
                (Kind::Dir, 0o755)
            } else if f.is_symlink() {
                (Kind::Symlink, 0o777)
            } else {
                (Kind::File, 0o644)
            };
            let mut m = blank(kind, mode.unwrap_or(default));
            m.mtime = f.last_modified().map_or(mtime, dos_time);
            if kind == Kind::File {
                m.size = f.size();
                let packed = f.compressed_size();
                if m.size > BOMB_FLOOR && m.size / packed.max(1) > MAX_RATIO {
                    drop(f);
                    b.skip(&path, "declares far more data than it holds (zip bomb)");
                    continue;
                }
                m.data = Data::Zip { entry };
            }
            (path, m, kind == Kind::Symlink)
        };
        if is_link {
            // A zip symlink's data is its target.
            let mut target = Vec::new();
            let read = z
                .by_index(entry)
                .map_err(std::io::Error::other)
                .and_then(|f| f.take(MAX_TARGET as u64 + 1).read_to_end(&mut target));
            if read.is_err() {
                b.skip(&path, "unreadable symlink target");
                continue;
            }
            m.target = target;
        }
        b.add(&path, m, None);
    }
    b.finish()
}
