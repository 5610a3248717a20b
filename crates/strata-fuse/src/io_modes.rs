//! I/O modes: how each open handle of an inode does its I/O (kernel
//! passthrough to one backing file, or through the daemon), and the
//! bookkeeping the kernel's rules need.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use fuser::BackingId;
use strata_core::{self as core, Opened};

use crate::Adapter;

/// How each inode's open handles do I/O. The kernel puts an inode in one
/// mode at a time: passthrough to one backing file, or the page cache through
/// the daemon. While page-cache handles are open, new handles join them (no
/// passthrough), which the kernel allows. While a backing file is active,
/// every new open must use that same file: a handle that cannot (the layer
/// offers another file, or none) gets direct I/O, which the kernel refuses
/// with EIO; layers avoid it (the overlay serves lower files through the
/// daemon whenever a copy-up could give the inode another file).
#[derive(Default)]
pub(crate) struct IoModes {
    backed: HashMap<u64, Backed>,
    /// Inode → its open handles doing cached I/O through the daemon.
    cached: HashMap<u64, usize>,
    /// Handle → its inode, whether it counts in `backed`, and whether it
    /// counts in its `writers`.
    handles: HashMap<u64, (u64, bool, bool)>,
}

impl IoModes {
    /// Whether `ino` has a passthrough handle open for writing.
    pub(crate) fn has_writer(&self, ino: u64) -> bool {
        self.backed.get(&ino).is_some_and(|b| b.writers > 0)
    }

    /// Inodes with an active backing file.
    pub(crate) fn backed_inodes(&self) -> usize {
        self.backed.len()
    }
}

pub(crate) struct Backed {
    id: Arc<BackingId>,
    /// (st_dev, st_ino) of the backing file.
    file: (u64, u64),
    handles: usize,
    /// Of those, the ones open for writing.
    writers: usize,
}

/// The I/O mode chosen for a new handle.
pub(crate) enum IoMode {
    /// Kernel passthrough to this backing file.
    Backed(Arc<BackingId>),
    /// Through the daemon (page cache, or direct I/O if the layer asked).
    Daemon,
    /// Another backing file is active on the inode and this handle cannot
    /// use it; nothing was recorded.
    Conflict,
}

/// Read-only opens that meet another handle's backing file are opened
/// again this many times in all: the usual cause is a copy-up finishing
/// between the layer's open (of the lower file) and the choice of mode, and
/// the next open gets the copy.
pub(crate) const OPEN_ATTEMPTS: usize = 3;

impl<F: core::Filesystem> Adapter<F> {
    /// Picks the I/O mode of a new handle (see [`IoModes`]) and records it,
    /// unless the handle cannot join the inode's active backing file.
    /// `writer`: the handle is open for writing.
    pub(crate) fn io_mode(
        &self,
        ino: u64,
        fh: u64,
        opened: &Opened,
        writer: bool,
        open: impl FnOnce(&std::os::fd::OwnedFd) -> io::Result<BackingId>,
    ) -> IoMode {
        if opened.direct_io {
            return IoMode::Daemon;
        }
        let mut m = self.io_modes.lock();
        let offered = opened
            .passthrough
            .as_ref()
            .filter(|_| self.passthrough.load(Ordering::Relaxed) && !m.cached.contains_key(&ino))
            .and_then(|fd| Some((fd, rustix::fs::fstat(&**fd).ok()?)));
        if let Some((fd, st)) = offered {
            let file = (st.st_dev, st.st_ino);
            match m.backed.get_mut(&ino) {
                Some(b) if b.file == file => {
                    b.handles += 1;
                    b.writers += usize::from(writer);
                    let id = b.id.clone();
                    m.handles.insert(fh, (ino, true, writer));
                    self.writers
                        .fetch_add(usize::from(writer), Ordering::Relaxed);
                    return IoMode::Backed(id);
                }
                Some(_) => {}
                None => match open(fd) {
                    Ok(id) => {
                        let id = Arc::new(id);
                        m.backed.insert(
                            ino,
                            Backed {
                                id: id.clone(),
                                file,
                                handles: 1,
                                writers: usize::from(writer),
                            },
                        );
                        m.handles.insert(fh, (ino, true, writer));
                        self.writers
                            .fetch_add(usize::from(writer), Ordering::Relaxed);
                        return IoMode::Backed(id);
                    }
                    Err(e) => {
                        tracing::debug!(ino, "no passthrough for this file: {e}");
                        if e.raw_os_error() == Some(libc::EPERM) {
                            tracing::warn!(
                                "kernel passthrough needs CAP_SYS_ADMIN; serving I/O through the daemon"
                            );
                            self.passthrough.store(false, Ordering::Relaxed);
                        }
                    }
                },
            }
        }
        if m.backed.contains_key(&ino) {
            return IoMode::Conflict;
        }
        *m.cached.entry(ino).or_default() += 1;
        m.handles.insert(fh, (ino, false, false));
        IoMode::Daemon
    }

    /// A handle that cannot join the active backing file gets direct I/O,
    /// which the kernel refuses with EIO (unless the backing file was
    /// released meanwhile): logged, since it is a layer's mistake or a race
    /// the retry in `open` did not outlast.
    pub(crate) fn conflicting(ino: u64, fh: u64, opened: &mut Opened) {
        tracing::warn!(
            ino,
            fh,
            "open offers another file than the inode's active passthrough file; the kernel may refuse it (EIO)"
        );
        opened.direct_io = true;
    }

    pub(crate) fn release_backing(&self, fh: u64) {
        let mut m = self.io_modes.lock();
        let Some((ino, backed, writer)) = m.handles.remove(&fh) else {
            return;
        };
        if backed {
            if let Some(b) = m.backed.get_mut(&ino) {
                b.handles -= 1;
                b.writers -= usize::from(writer);
                self.writers
                    .fetch_sub(usize::from(writer), Ordering::Relaxed);
                if b.handles == 0 {
                    m.backed.remove(&ino);
                }
            }
        } else if let Some(n) = m.cached.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                m.cached.remove(&ino);
            }
        }
    }
}
