//! FUSE over io_uring (Linux 6.14+), strata's addition to this fork.
//!
//! Each CPU has a queue in the kernel; a request is put on the queue of the
//! CPU its caller runs on. Workers pinned to that CPU register ring entries
//! for it, so a request is served without waking a thread on another CPU.
//! On a VM a cross-CPU wake-up costs most of a /dev/fuse round trip.
//!
//! Protocol (`fs/fuse/dev_uring.c`): an entry is an `IORING_OP_URING_CMD` on
//! the /dev/fuse fd that points at two buffers, a header
//! (`struct fuse_uring_req_header`) and a payload. REGISTER hands the entry to
//! the kernel; its completion carries a request: `fuse_in_header` in
//! `in_out`, the opcode's own argument struct in `op_in`, the rest (names,
//! write data) in the payload. The reply goes back the same way
//! (`fuse_out_header` in `in_out`, the whole reply body in the payload) with
//! COMMIT_AND_FETCH, which also waits for the next request. The kernel uses
//! the rings only once every possible CPU's queue has an entry; until then,
//! and for FORGET, INTERRUPT and notifications always, /dev/fuse is used as
//! before, so the classic workers keep running.

use std::io;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::error;
use log::warn;
use parking_lot::Condvar;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::channel::ChannelSender;
use crate::ll::Operation;
use crate::ll::fuse_abi as abi;
use crate::reply::ReplyEmpty;
use crate::reply::ReplyTarget;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// Requests served through rings by this process, for tests and statistics.
static RING_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// How many requests this process has served through io_uring queues.
pub fn io_uring_requests() -> u64 {
    RING_REQUESTS.load(Ordering::Relaxed)
}

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `struct fuse_uring_req_header`: `in_out[128]`, `op_in[128]`, then
/// `struct fuse_uring_ent_in_out { flags, commit_id, payload_sz, padding, reserved }`.
const HEADER_SIZE: usize = 288;
const OP_IN: usize = 128;
const OP_IN_SIZE: usize = 128;
const ENT_COMMIT_ID: usize = 256 + 8;
const ENT_PAYLOAD_SZ: usize = 256 + 16;
const IN_HEADER: usize = size_of::<abi::fuse_in_header>();
const OUT_HEADER: usize = size_of::<abi::fuse_out_header>();
/// Room before the payload to put the in-header and op struct back in
/// front of it, so a request parses in place as one /dev/fuse message.
const SLACK: usize = IN_HEADER + OP_IN_SIZE;

/// The number of queues the kernel creates: one per possible CPU.
pub(crate) fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    parse_cpu_list_max(text.trim())
        .map(|max| max + 1)
        .ok_or_else(|| io::Error::other(format!("cannot parse possible CPUs {text:?}")))
}

fn parse_cpu_list_max(list: &str) -> Option<usize> {
    list.split(',')
        .map(|part| part.rsplit('-').next()?.parse::<usize>().ok())
        .try_fold(None, |max: Option<usize>, cpu| Some(max.max(Some(cpu?))))?
}

/// The reply to the request an entry holds, kept until its worker commits it.
#[derive(Debug, Clone)]
pub(crate) struct UringReply(Arc<ReplySlot>);

#[derive(Debug)]
struct ReplySlot {
    /// For passthrough's backing-file ioctls, which are not ring commands.
    channel: ChannelSender,
    state: Mutex<ReplyState>,
    sent: Condvar,
}

#[derive(Debug, Default)]
struct ReplyState {
    /// `fuse_out_header` followed by the reply body.
    bytes: Vec<u8>,
    sent: bool,
}

impl UringReply {
    fn new(channel: ChannelSender) -> Self {
        Self(Arc::new(ReplySlot {
            channel,
            state: Mutex::new(ReplyState::default()),
            sent: Condvar::new(),
        }))
    }

    pub(crate) fn channel(&self) -> &ChannelSender {
        &self.0.channel
    }

    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let mut state = self.0.state.lock();
        if state.sent {
            return Err(io::Error::other("second reply to one io_uring request"));
        }
        state.bytes.clear();
        for slice in data {
            state.bytes.extend_from_slice(slice);
        }
        state.sent = true;
        self.0.sent.notify_one();
        Ok(())
    }

    /// Waits for the filesystem's reply (usually already there when the
    /// handler returns) and hands it to `commit`.
    fn take<T>(&self, commit: impl FnOnce(&[u8]) -> T) -> T {
        let mut state = self.0.state.lock();
        while !state.sent {
            self.0.sent.wait(&mut state);
        }
        state.sent = false;
        commit(&state.bytes)
    }
}

/// One ring entry's buffers. The kernel writes a request into them and reads
/// the reply from them while the entry's command is in flight; we touch them
/// only between its completion and the next commit.
struct EntryBuffers {
    header: Box<[u64; HEADER_SIZE / 8]>,
    /// `SLACK` bytes, then the payload the kernel sees. `u64`s keep the
    /// re-assembled request aligned for parsing.
    payload: Vec<u64>,
    payload_size: usize,
    iov: Box<[libc::iovec; 2]>,
}

impl EntryBuffers {
    fn new(payload_size: usize) -> Self {
        let mut header = Box::new([0u64; HEADER_SIZE / 8]);
        let mut payload = vec![0u64; (SLACK + payload_size).div_ceil(8)];
        let iov = Box::new([
            libc::iovec {
                iov_base: header.as_mut_ptr().cast(),
                iov_len: HEADER_SIZE,
            },
            libc::iovec {
                // SAFETY: SLACK is within the allocation (it is sized SLACK + payload_size).
                iov_base: unsafe { payload.as_mut_ptr().cast::<u8>().add(SLACK) }.cast(),
                iov_len: payload_size,
            },
        ]);
        Self {
            header,
            payload,
            payload_size,
            iov,
        }
    }

    fn header(&self) -> &[u8] {
        zerocopy::IntoBytes::as_bytes(&self.header[..])
    }

    fn header_mut(&mut self) -> &mut [u8] {
        zerocopy::IntoBytes::as_mut_bytes(&mut self.header[..])
    }

    fn payload_area(&mut self) -> &mut [u8] {
        zerocopy::IntoBytes::as_mut_bytes(&mut self.payload[..])
    }

    fn read_u32(&self, at: usize) -> u32 {
        u32::from_ne_bytes(self.header()[at..at + 4].try_into().unwrap())
    }

    fn read_u64(&self, at: usize) -> u64 {
        u64::from_ne_bytes(self.header()[at..at + 8].try_into().unwrap())
    }

    /// Puts the in-header and op struct in front of the payload and returns
    /// the request as /dev/fuse would have delivered it, with its commit id.
    fn assemble(&mut self) -> Result<(&[u8], u64), String> {
        let commit_id = self.read_u64(ENT_COMMIT_ID);
        let total = self.read_u32(0) as usize;
        let payload_len = self.read_u32(ENT_PAYLOAD_SZ) as usize;
        let op_len = total
            .checked_sub(IN_HEADER + payload_len)
            .filter(|&n| n <= OP_IN_SIZE && n % 8 == 0 && payload_len <= self.payload_size)
            .ok_or_else(|| format!("bad sizes: total {total}, payload {payload_len}"))?;
        let start = SLACK - IN_HEADER - op_len;
        let mut head = [0u8; SLACK];
        head[..IN_HEADER].copy_from_slice(&self.header()[..IN_HEADER]);
        head[IN_HEADER..IN_HEADER + op_len].copy_from_slice(&self.header()[OP_IN..OP_IN + op_len]);
        let area = self.payload_area();
        area[start..SLACK].copy_from_slice(&head[..IN_HEADER + op_len]);
        Ok((&area[start..SLACK + payload_len], commit_id))
    }

    /// Copies a reply (`fuse_out_header` + body) where the kernel reads it.
    fn put_reply(&mut self, reply: &[u8]) {
        let body = &reply[OUT_HEADER..];
        if body.len() > self.payload_size {
            error!("reply of {} bytes exceeds the ring payload", body.len());
            // fuse_out_header { len: u32, error: i32, unique: u64 }
            let unique = u64::from_ne_bytes(reply[8..OUT_HEADER].try_into().unwrap());
            self.put_reply(zerocopy::IntoBytes::as_bytes(&error_header(
                unique,
                libc::EIO,
            )));
            return;
        }
        self.header_mut()[..OUT_HEADER].copy_from_slice(&reply[..OUT_HEADER]);
        self.header_mut()[ENT_PAYLOAD_SZ..ENT_PAYLOAD_SZ + 4]
            .copy_from_slice(&(body.len() as u32).to_ne_bytes());
        self.payload_area()[SLACK..SLACK + body.len()].copy_from_slice(body);
    }
}

/// The command area: `struct fuse_uring_cmd_req { u64 flags; u64 commit_id;
/// u16 qid; u8 padding[6]; }`.
fn cmd_req(commit_id: u64, qid: u16) -> [u8; 80] {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    cmd
}

fn commit_and_fetch_command(fd: i32, commit_id: u64, qid: u16) -> squeue::Entry128 {
    opcode::UringCmd80::new(types::Fd(fd), CMD_COMMIT_AND_FETCH)
        .cmd(cmd_req(commit_id, qid))
        .build()
}

fn register_command(fd: i32, qid: u16, bufs: &EntryBuffers) -> squeue::Entry128 {
    let mut sqe = opcode::UringCmd80::new(types::Fd(fd), CMD_REGISTER)
        .cmd(cmd_req(0, qid))
        .addr(Some(bufs.iov.as_ptr() as u64))
        .build();
    // The crate has no setter for `sqe->len`, which must say 2 iovecs.
    // SAFETY: `Entry128` is `#[repr(C)]` over the 128-byte SQE; `len` is the
    // u32 at offset 24 of `struct io_uring_sqe`.
    const _: () = assert!(size_of::<squeue::Entry128>() == 128);
    let raw = unsafe { &mut *(&raw mut sqe).cast::<[u8; 128]>() };
    raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
    sqe
}

/// Serves queue `qid` until the connection ends. Returns early, with an
/// error, if the ring cannot be set up; /dev/fuse then keeps serving.
pub(crate) fn serve_queue<FS: Filesystem>(
    event_loop: &SessionEventLoop<FS>,
    qid: usize,
    pinned: bool,
    payload_size: usize,
) -> io::Result<()> {
    if pinned {
        pin_to_cpu(qid);
    }
    let fd = event_loop.ch.as_fd().as_raw_fd();
    let mut ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(4)
        .or_else(|_| IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(4))?;
    let mut bufs = EntryBuffers::new(payload_size);
    let reply = UringReply::new(event_loop.ch.sender());
    let qid16 = u16::try_from(qid).map_err(io::Error::other)?;

    // The kernel only falls back to /dev/fuse while the rings are not ready:
    // once they are, a queue without an entry leaves its CPU's callers
    // waiting. So after the first request this loop only ends with the
    // connection, and an entry whose command failed is registered again.
    let mut serving = false;
    let mut sqe = register_command(fd, qid16, &bufs);
    loop {
        // SAFETY: the SQE points at `bufs`, which live until this function
        // returns, and the kernel is done with them once the ring is dropped.
        unsafe { ring.submission().push(&sqe) }.map_err(io::Error::other)?;
        let cqe = loop {
            // An interrupted wait (a signal, a debugger attaching) returns
            // early, possibly without a completion: wait again, never submit
            // the same command twice.
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
            if let Some(cqe) = ring.completion().next() {
                break cqe;
            }
        };
        let res = cqe.result();
        if res < 0 {
            match -res {
                // Unmounted or aborted.
                libc::ENOTCONN | libc::ENODEV | libc::ECONNABORTED => return Ok(()),
                _ if !serving => return Err(io::Error::from_raw_os_error(-res)),
                // E.g. ENOENT: the request being committed is gone (aborted).
                errno => {
                    warn!(
                        "io_uring queue {qid}: command failed ({}); registering the entry again",
                        io::Error::from_raw_os_error(errno)
                    );
                    sqe = register_command(fd, qid16, &bufs);
                    continue;
                }
            }
        }
        serving = true;
        RING_REQUESTS.fetch_add(1, Ordering::Relaxed);
        let commit_id = match bufs.assemble() {
            Ok((request, commit_id)) => {
                let target = ReplyTarget::Uring(reply.clone());
                match RequestWithSender::with_target(target, request) {
                    Some(req) => match req.request.operation() {
                        Ok(Operation::Destroy(_)) => req.reply::<ReplyEmpty>().ok(),
                        // The kernel sends these through /dev/fuse only and
                        // expects no reply; the entry still needs a commit.
                        Ok(Operation::Forget(_) | Operation::BatchForget(_)) => {
                            req.dispatch(event_loop);
                            reply_errno(&reply, commit_id, libc::EIO);
                        }
                        _ => req.dispatch(event_loop),
                    },
                    // Unparsable: `with_target` logged it. Answer EIO.
                    None => reply_errno(&reply, commit_id, libc::EIO),
                }
                commit_id
            }
            Err(why) => {
                error!("io_uring queue {qid}: {why}");
                let commit_id = bufs.read_u64(ENT_COMMIT_ID);
                reply_errno(&reply, commit_id, libc::EIO);
                commit_id
            }
        };
        reply.take(|bytes| bufs.put_reply(bytes));
        sqe = commit_and_fetch_command(fd, commit_id, qid16);
    }
}

fn error_header(unique: u64, errno: i32) -> abi::fuse_out_header {
    abi::fuse_out_header {
        len: OUT_HEADER as u32,
        error: -errno,
        unique,
    }
}

fn reply_errno(reply: &UringReply, unique: u64, errno: i32) {
    let header = error_header(unique, errno);
    let _ = reply.send(&[IoSlice::new(zerocopy::IntoBytes::as_bytes(&header))]);
}

/// Requests from CPU `cpu` come on queue `cpu`; serving them there avoids a
/// cross-CPU wake-up. A CPU outside our affinity mask (cpusets) stays
/// unpinned: slower, still correct.
fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    let pinned = set
        .set(cpu)
        .and_then(|()| nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set));
    if let Err(e) = pinned {
        debug!("io_uring queue {cpu}: not pinned to its CPU: {e}");
    }
}

/// Logs why a queue's worker stopped before the connection ended. Until every
/// queue has an entry the kernel keeps using /dev/fuse, so a worker that
/// could not set up its ring leaves the mount working, only slower.
pub(crate) fn report(qid: usize, result: io::Result<()>) {
    if let Err(e) = result {
        warn!("io_uring queue {qid}: worker stopped: {e}; requests go through /dev/fuse");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_to_their_highest_cpu() {
        assert_eq!(parse_cpu_list_max("0"), Some(0));
        assert_eq!(parse_cpu_list_max("0-1"), Some(1));
        assert_eq!(parse_cpu_list_max("0-3,8-11"), Some(11));
        assert_eq!(parse_cpu_list_max("0,2"), Some(2));
        assert_eq!(parse_cpu_list_max("x"), None);
    }

    #[test]
    fn a_request_is_reassembled_in_front_of_its_payload() {
        let mut bufs = EntryBuffers::new(4096);
        // A LOOKUP-like request: 40-byte header, 16-byte op struct, 4-byte name.
        let total = (IN_HEADER + 16 + 4) as u32;
        bufs.header_mut()[0..4].copy_from_slice(&total.to_ne_bytes());
        bufs.header_mut()[4..8].copy_from_slice(&7u32.to_ne_bytes());
        bufs.header_mut()[OP_IN..OP_IN + 16].copy_from_slice(&[9u8; 16]);
        bufs.header_mut()[ENT_COMMIT_ID..ENT_COMMIT_ID + 8].copy_from_slice(&42u64.to_ne_bytes());
        bufs.header_mut()[ENT_PAYLOAD_SZ..ENT_PAYLOAD_SZ + 4].copy_from_slice(&4u32.to_ne_bytes());
        bufs.payload_area()[SLACK..SLACK + 4].copy_from_slice(b"abc\0");
        let (request, commit_id) = bufs.assemble().unwrap();
        assert_eq!(commit_id, 42);
        assert_eq!(request.len(), total as usize);
        assert_eq!(request.as_ptr() as usize % 8, 0);
        assert_eq!(&request[4..8], &7u32.to_ne_bytes());
        assert_eq!(&request[IN_HEADER..IN_HEADER + 16], &[9u8; 16]);
        assert_eq!(&request[IN_HEADER + 16..], b"abc\0");
    }

    #[test]
    fn inconsistent_sizes_are_refused() {
        let mut bufs = EntryBuffers::new(4096);
        bufs.header_mut()[0..4].copy_from_slice(&10u32.to_ne_bytes());
        assert!(bufs.assemble().is_err());
    }
}
