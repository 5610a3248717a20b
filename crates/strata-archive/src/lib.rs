//! Archives as read-only trees: tar (plain, gzip, zstd, xz) and zip. Opening
//! an archive streams it once into an index of members (names, types,
//! metadata, where each member's data lives); a member's data is extracted
//! when first asked for, into an unnamed temporary file, and kept in a cache
//! bounded in bytes. Knows nothing of FUSE.
//!
//! An archive is untrusted input. Every name the index holds is one path
//! component (the rule `strata_image::entry_name_problem` states); a member
//! whose path has a `..`, a NUL or an over-long component is left out and
//! logged, never clamped into something else. A leading `/` and `.` parts
//! are dropped, as tar does when extracting. The first member to claim a
//! name as a directory keeps it; a later file of the same name replaces an
//! earlier file (the archive's last word, as extraction would leave it).
//! Extraction checks the size a member declares: more or less data is an
//! error for that member, and a zip member declaring a size far beyond what
//! its compressed data can hold is left out (a zip bomb).

#![deny(unsafe_code)]

mod index;
mod persist;

pub use persist::prune as prune_kept_indexes;

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

pub use index::{Kind, Member};

/// Archive formats, told by their first bytes (not the file's name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Tar,
    TarGz,
    TarZst,
    TarXz,
    Zip,
}

impl Format {
    /// The format of a file starting with `head` (at least 262 bytes read,
    /// or the whole file if shorter).
    pub fn sniff(head: &[u8]) -> Option<Format> {
        if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
            Some(Format::Zip)
        } else if head.starts_with(&[0x1f, 0x8b]) {
            Some(Format::TarGz)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Format::TarZst)
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Some(Format::TarXz)
        } else if head.len() >= 262 && &head[257..262] == b"ustar" {
            Some(Format::Tar)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Tar => "tar",
            Format::TarGz => "tar.gz",
            Format::TarZst => "tar.zst",
            Format::TarXz => "tar.xz",
            Format::Zip => "zip",
        }
    }
}

/// What [`Archive::open`] could not get past, with the archive named.
#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// Bytes of extracted members kept for the next open.
pub const DEFAULT_CACHE_BYTES: u64 = 512 << 20;

/// An indexed archive.
pub struct Archive {
    path: PathBuf,
    /// Opened once: extraction never goes by path again (the archive may
    /// sit under the mount it serves, or be replaced).
    file: File,
    format: Format,
    members: Vec<Member>,
    /// Members left out of the index (unsafe names, conflicts, bombs).
    skipped: usize,
    /// The index was read from where an earlier open kept it.
    from_kept: bool,
    zip: Option<Mutex<zip::ZipArchive<File>>>,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    /// Extracted data by inode (the member hard links share).
    files: HashMap<u32, (File, u64)>,
    order: VecDeque<u32>,
    bytes: u64,
    limit: u64,
}

impl Archive {
    /// Indexes the archive at `path` (one pass over it).
    pub fn open(path: &Path) -> Result<Archive, Error> {
        let file = File::open(path).map_err(|e| Error(format!("{}: {e}", path.display())))?;
        Archive::from_file_kept(file, path, None)
    }

    /// Indexes the archive open as `file` (`path` names it in messages),
    /// keeping the index below `index_dir` for the next time and reading it
    /// from there when the archive is unchanged.
    pub fn from_file_kept(
        mut file: File,
        path: &Path,
        index_dir: Option<&Path>,
    ) -> Result<Archive, Error> {
        let shown = path.display();
        let fail = |e: &dyn std::fmt::Display| Error(format!("{shown}: {e}"));
        let meta = file.metadata().map_err(|e| fail(&e))?;
        if !meta.is_file() {
            return Err(fail(&"not a regular file"));
        }
        let mut head = Vec::with_capacity(512);
        (&mut file)
            .take(512)
            .read_to_end(&mut head)
            .map_err(|e| fail(&e))?;
        let format = Format::sniff(&head)
            .ok_or_else(|| fail(&"not a known archive (tar, tar.gz, tar.zst, tar.xz, zip)"))?;
        let mtime = std::os::unix::fs::MetadataExt::mtime(&meta);
        let label = shown.to_string();
        let kept_at = index_dir.map(|d| persist::index_path(d, &meta));
        let mut zip = None;
        if format == Format::Zip {
            let z = file.try_clone().map_err(|e| fail(&e))?;
            zip = Some(zip::ZipArchive::new(z).map_err(|e| fail(&e))?);
        }
        let zip_entries = zip.as_ref().map_or(0, |z| z.len());
        let kept = kept_at
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| persist::decode(&b, format, zip_entries));
        let from_kept = kept.is_some();
        if let (Some(p), true) = (&kept_at, from_kept) {
            persist::touch(p);
        }
        let (members, skipped, zip) = if let Some((members, skipped)) = kept {
            (members, skipped, zip.map(Mutex::new))
        } else if let Some(mut z) = zip {
            let (members, skipped) = index::index_zip(&mut z, mtime, &label);
            (members, skipped, Some(Mutex::new(z)))
        } else {
            let reader = decoder(
                format,
                At {
                    file: &file,
                    pos: 0,
                },
            )
            .map_err(|e| fail(&e))?;
            let (members, skipped) = index::index_tar(reader, mtime, &label);
            (members, skipped, None)
        };
        if skipped > 0 && !from_kept {
            tracing::warn!(archive = %label, skipped, "members left out of the index");
        }
        if let (Some(p), false) = (&kept_at, from_kept) {
            persist::store(p, &persist::encode(format, &members, skipped));
        }
        Ok(Archive {
            path: path.to_path_buf(),
            file,
            from_kept,
            format,
            members,
            skipped,
            zip,
            cache: Mutex::new(Cache {
                limit: DEFAULT_CACHE_BYTES,
                ..Cache::default()
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Number of members, the root (index 0) included.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.len() <= 1
    }

    /// Members the index left out.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// Whether the index came from where an earlier open kept it (the
    /// archive itself was not read).
    pub fn from_kept_index(&self) -> bool {
        self.from_kept
    }

    pub fn member(&self, index: u32) -> Option<&Member> {
        self.members.get(index as usize)
    }

    /// `name` in directory `dir`.
    pub fn lookup(&self, dir: u32, name: &[u8]) -> Option<u32> {
        let d = self.member(dir)?;
        let i = d
            .children
            .binary_search_by(|&c| self.members[c as usize].name.as_slice().cmp(name))
            .ok()?;
        Some(d.children[i])
    }

    /// The members of directory `dir`, by name.
    pub fn children(&self, dir: u32) -> &[u32] {
        self.member(dir).map_or(&[], |d| d.children.as_slice())
    }

    /// Members sharing `index`'s data (its hard links), itself excluded.
    pub fn other_names(&self, index: u32) -> Vec<u32> {
        let Some(me) = self.member(index) else {
            return Vec::new();
        };
        (1..self.members.len() as u32)
            .filter(|&i| i != index && self.members[i as usize].inode == me.inode)
            .filter(|&i| self.reachable(i))
            .collect()
    }

    /// Whether a member still has its name (a replaced one keeps its index
    /// for the hard links made to it, but no directory lists it).
    fn reachable(&self, index: u32) -> bool {
        let m = &self.members[index as usize];
        self.lookup(m.parent, &m.name) == Some(index)
    }

    /// The member's path from the root, as components.
    pub fn path_of(&self, index: u32) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut cur = index;
        // Bounded: a member no directory lists may have any parent.
        while cur != 0 && out.len() < self.members.len() {
            let Some(m) = self.member(cur) else { break };
            out.push(m.name.as_slice());
            cur = m.parent;
        }
        out.reverse();
        out
    }

    /// A read-only descriptor of a regular member's data: extracted into an
    /// unnamed temporary file on first use, and kept (bounded) for later opens.
    pub fn open_member(&self, index: u32) -> io::Result<OwnedFd> {
        let m = self
            .member(index)
            .filter(|m| m.kind == Kind::File)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let inode = m.inode;
        if let Some((f, _)) = self.cache.lock().files.get(&inode) {
            return Ok(f.try_clone()?.into());
        }
        let mut out = temp_file()?;
        self.extract(inode, &mut out)?;
        // Descriptors share the offset: hand them out at the start.
        io::Seek::rewind(&mut out)?;
        let fd: OwnedFd = out.try_clone()?.into();
        self.cache.lock().insert(inode, out, m.size);
        Ok(fd)
    }

    /// Writes member `index`'s data to `out`: exactly its declared size, or
    /// an error.
    pub fn extract(&self, index: u32, out: &mut dyn Write) -> io::Result<()> {
        let m = self
            .member(index)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let size = m.size;
        match m.data {
            index::Data::None => Ok(()),
            index::Data::Tar { offset } => {
                if self.format == Format::Tar {
                    let mut at = At {
                        file: &self.file,
                        pos: offset,
                    };
                    copy_exact(&mut at, out, size, false)
                } else {
                    let mut r = decoder(
                        self.format,
                        At {
                            file: &self.file,
                            pos: 0,
                        },
                    )?;
                    let skipped = io::copy(&mut (&mut r).take(offset), &mut io::sink())?;
                    if skipped != offset {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the archive ends before the member",
                        ));
                    }
                    copy_exact(&mut r, out, size, false)
                }
            }
            index::Data::Zip { entry } => {
                let zip = self.zip.as_ref().ok_or(io::ErrorKind::InvalidInput)?;
                let mut z = zip.lock();
                let mut f = z.by_index(entry).map_err(io::Error::other)?;
                copy_exact(&mut f, out, size, true)
            }
        }
    }
}

impl Cache {
    fn insert(&mut self, inode: u32, file: File, size: u64) {
        if size > self.limit || self.files.contains_key(&inode) {
            return;
        }
        while self.bytes + size > self.limit {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some((_, n)) = self.files.remove(&old) {
                self.bytes -= n;
            }
        }
        self.files.insert(inode, (file, size));
        self.order.push_back(inode);
        self.bytes += size;
    }
}

/// Checks `bytes` as a kept index of a tar (its checksum recomputed, so a
/// fuzzer gets past it): `Some(members)` when it would be used. For the
/// fuzz target and tests, which hand the reader what a hostile store could
/// hold; every path of an accepted index ends.
#[doc(hidden)]
pub fn check_kept_index(bytes: &[u8]) -> Option<usize> {
    let mut sealed = bytes.to_vec();
    sealed.extend_from_slice(blake3::hash(bytes).as_bytes());
    let (members, _) = persist::decode(&sealed, Format::Tar, 0)?;
    let n = members.len();
    for m in &members {
        let mut cur = m.parent;
        let mut steps = 0;
        while cur != 0 && steps <= n {
            cur = members[cur as usize].parent;
            steps += 1;
        }
        for &c in &m.children {
            assert!(strata_image::entry_name_problem(&members[c as usize].name).is_none());
        }
    }
    Some(n)
}

/// Reads a file from a position of its own (`pread`), so readers of one
/// descriptor never move each other's offset.
struct At<'a> {
    file: &'a File,
    pos: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The decompressed byte stream of a tar archive in `format`.
fn decoder<'a>(format: Format, file: At<'a>) -> io::Result<Box<dyn Read + Send + 'a>> {
    let file = BufReader::with_capacity(256 << 10, file);
    Ok(match format {
        Format::Tar => Box::new(file),
        Format::TarGz => Box::new(flate2::bufread::MultiGzDecoder::new(file)),
        Format::TarZst => Box::new(zstd::stream::read::Decoder::with_buffer(file)?),
        Format::TarXz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(file)),
        Format::Zip => return Err(io::ErrorKind::InvalidInput.into()),
    })
}

/// Copies exactly `size` bytes: a source that has fewer is an error (a
/// truncated archive), and so is one with more where the source is the
/// member alone (`ends`: a zip member's decompressor; a tar stream goes on
/// with the next member).
fn copy_exact(from: &mut dyn Read, to: &mut dyn Write, size: u64, ends: bool) -> io::Result<()> {
    let limit = if ends { size.saturating_add(1) } else { size };
    let copied = io::copy(&mut from.take(limit), to)?;
    if copied != size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("member data is {copied} bytes (or more), it declares {size}"),
        ));
    }
    Ok(())
}

/// An unnamed file in the temporary directory: gone when the last
/// descriptor closes, crash or not.
fn temp_file() -> io::Result<File> {
    use rustix::fs::{Mode, OFlags};
    let dir = std::env::temp_dir();
    let fd = rustix::fs::open(
        &dir,
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("{}: {e}", dir.display())))?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests;
