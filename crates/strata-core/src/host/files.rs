//! Open host files by file handle: the part of the protocol that works on an
//! open descriptor and not on a name, the same for every rule.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use rustix::fs::{FallocateFlags, SeekFrom};

use crate::fs::Opened;
use crate::{Errno, Result};

#[derive(Default)]
pub struct OpenFiles {
    files: Mutex<HashMap<u64, Arc<OwnedFd>>>,
    next_fh: AtomicU64,
}

pub fn sync_fd(fd: BorrowedFd<'_>, datasync: bool) -> Result<()> {
    if datasync {
        rustix::fs::fdatasync(fd)?
    } else {
        rustix::fs::fsync(fd)?
    }
    Ok(())
}

impl OpenFiles {
    /// Registers an open file; offers it for kernel passthrough when asked.
    pub fn insert(&self, fd: OwnedFd, passthrough: bool) -> Opened {
        let fd = Arc::new(fd);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed) + 1;
        self.files.lock().insert(fh, fd.clone());
        Opened {
            fh,
            keep_cache: false,
            direct_io: false,
            cache_dir: false,
            // Locks are the kernel's, and host close-to-open needs nothing: skip FLUSH.
            noflush: true,
            passthrough: passthrough.then_some(fd),
        }
    }

    pub fn get(&self, fh: u64) -> Result<Arc<OwnedFd>> {
        self.files.lock().get(&fh).cloned().ok_or(Errno::EBADF)
    }

    /// Forgets an open file; returns its descriptor (closed when the last user drops it).
    pub fn release(&self, fh: u64) -> Option<Arc<OwnedFd>> {
        self.files.lock().remove(&fh)
    }

    /// Points `fh` at another descriptor (the file moved); later requests use it.
    pub fn replace(&self, fh: u64, fd: OwnedFd) {
        if let Some(slot) = self.files.lock().get_mut(&fh) {
            *slot = Arc::new(fd);
        }
    }

    pub fn len(&self) -> usize {
        self.files.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let fd = self.get(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            let n = rustix::io::pread(&*fd, &mut buf[done..], offset + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let fd = self.get(fh)?;
        Ok(rustix::io::pwrite(&*fd, data, offset)? as u32)
    }

    /// Like close(2) on the host file, without giving up our descriptor.
    pub fn flush(&self, fh: u64) -> Result<()> {
        drop(rustix::io::dup(&*self.get(fh)?)?);
        Ok(())
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        sync_fd(self.get(fh)?.as_fd(), datasync)
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        rustix::fs::fallocate(
            &*self.get(fh)?,
            FallocateFlags::from_bits_retain(mode as u32),
            offset,
            length,
        )?;
        Ok(())
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        let pos = match whence {
            libc::SEEK_SET => SeekFrom::Start(offset as u64),
            libc::SEEK_CUR => SeekFrom::Current(offset),
            libc::SEEK_END => SeekFrom::End(offset),
            libc::SEEK_DATA => SeekFrom::Data(offset as u64),
            libc::SEEK_HOLE => SeekFrom::Hole(offset as u64),
            _ => return Err(Errno::EINVAL),
        };
        Ok(rustix::fs::seek(&*self.get(fh)?, pos)? as i64)
    }

    pub fn copy_file_range(
        &self,
        fh_in: u64,
        offset_in: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
    ) -> Result<u32> {
        let fin = self.get(fh_in)?;
        let fout = self.get(fh_out)?;
        let (mut oi, mut oo) = (offset_in, offset_out);
        let n = rustix::fs::copy_file_range(
            &*fin,
            Some(&mut oi),
            &*fout,
            Some(&mut oo),
            len.min(u32::MAX as u64) as usize,
        )?;
        Ok(n as u32)
    }
}
