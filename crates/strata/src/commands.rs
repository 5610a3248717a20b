//! The subcommands.

use std::fs;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_core::overlay::{LowerSpec, Overlay, OverlayConfig};
use strata_core::single::{SingleDir, SingleDirConfig};
use strata_core::source::is_within;
use strata_core::stack::Stack;
use strata_core::union::{Union, UnionConfig};
use strata_core::workspace::Workspace;
use strata_fuse::MountConfig;

use crate::options::MountOptions;
use crate::output::outln;
use crate::state::{self, MountRecord};
use crate::{EXIT_FAILURE, EXIT_USAGE};

/// A failure with its exit code and a one-line message.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    /// Stops the command without a message, exit status 0 (stdout closed).
    pub fn quiet() -> Failure {
        Failure {
            code: 0,
            message: String::new(),
        }
    }
}

pub(crate) fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_USAGE,
        message: message.into(),
    }
}

pub(crate) fn failure(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_FAILURE,
        message: message.into(),
    }
}

/// How long a background mount may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

fn absolute(path: &Path) -> Result<PathBuf, Failure> {
    std::path::absolute(path).map_err(|e| usage(format!("{}: {e}", path.display())))
}

/// Everything that can be checked before a daemon starts, so bad input fails
/// with a clear message and leaves nothing behind. Returns the mountpoint
/// resolved (realpath), for the checks that layers keep apart from it.
fn check_mountpoint(mountpoint: &Path, opts: &MountOptions) -> Result<PathBuf, Failure> {
    let mp = mountpoint.display();
    // Only a mount can hang a stat; a plain directory needs no probe (which
    // a busy machine could mistake for a hung mount).
    let health = match state::mount_at(mountpoint) {
        Some(_) => state::health(mountpoint),
        None => state::Health::Ok,
    };
    match health {
        state::Health::Stale => {
            return Err(usage(format!(
                "{mp}: stale mount (its daemon is gone); run `strata umount {mp}` first"
            )));
        }
        state::Health::Hung => {
            return Err(usage(format!(
                "{mp}: the mount there does not answer (its daemon is stopped or stuck); \
                 `strata umount -l {mp}` detaches it"
            )));
        }
        state::Health::Ok => {}
    }
    let meta = fs::metadata(mountpoint).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => usage(format!("{mp}: mountpoint does not exist")),
        _ => usage(format!("{mp}: {e}")),
    })?;
    if !meta.is_dir() {
        return Err(usage(format!("{mp}: mountpoint is not a directory")));
    }
    if let Some(m) = state::mount_at(mountpoint)
        && m.fstype == state::FSTYPE
    {
        return Err(usage(format!(
            "{mp}: already mounted (strata, source {})",
            m.source
        )));
    }
    if !opts.nonempty {
        let mut entries = fs::read_dir(mountpoint).map_err(|e| usage(format!("{mp}: {e}")))?;
        if entries.next().is_some() {
            return Err(usage(format!(
                "{mp}: mountpoint is not empty (use -o nonempty to mount over it)"
            )));
        }
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(usage(
            "/dev/fuse: no such device; load the fuse module (modprobe fuse) or give the container /dev/fuse",
        ));
    }
    fs::canonicalize(mountpoint).map_err(|e| usage(format!("{mp}: {e}")))
}

/// Refuses layers (`what`, directory) that are, hold or lie inside the
/// mountpoint (see [`strata_core::source::check_apart`]).
fn check_layers_apart(real_mountpoint: &Path, layers: &[(&str, &Path)]) -> Result<(), Failure> {
    for (what, dir) in layers {
        strata_core::source::check_apart(real_mountpoint, what, dir).map_err(usage)?;
    }
    Ok(())
}

/// An overlay directory given on the command line must exist: the message
/// names the option (`--upper`) or role (`lower`) and the path.
fn check_dir(what: &str, dir: &Path) -> Result<(), Failure> {
    let shown = dir.display();
    match fs::metadata(dir) {
        Ok(md) if md.is_dir() => Ok(()),
        Ok(_) => Err(usage(format!("{what} {shown}: not a directory"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(usage(format!("{what} {shown}: no such directory")))
        }
        Err(e) => Err(usage(format!("{what} {shown}: {e}"))),
    }
}

/// The mode a SOURCE asks for: one directory, a union of branches, or an
/// overlay (images and directories, with or without a writable upper).
enum Mode {
    SingleDir(SingleDir),
    Union(Union),
    Overlay(Overlay),
    Workspace(Box<Workspace>),
}

/// Whether SOURCE names overlay lowers (an `image:NAME` or an archive file
/// among them) rather than union branches.
fn has_overlay_layer(source: &str) -> bool {
    let tokens: Vec<&str> = source.split(':').collect();
    tokens.windows(2).any(|w| w[0] == "image" || w[0] == "view")
        || tokens.iter().any(|t| Path::new(t).is_file())
}

/// Overlay lowers from SOURCE: `image:NAME`, archive files and host
/// directories joined by ':', topmost first.
fn overlay_lowers(source: &str, store: &Path) -> Result<Vec<LowerSpec>, Failure> {
    let mut out = Vec::new();
    let mut tokens = source.split(':').peekable();
    while let Some(tok) = tokens.next() {
        match tok {
            // `image` last is a directory of that name (`./image` always is).
            "image" if tokens.peek().is_some() => {
                let name = tokens
                    .next()
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| usage(format!("{source}: 'image:' needs an image name")))?;
                out.push(LowerSpec::Image {
                    store: store.to_path_buf(),
                    name: name.to_string(),
                });
            }
            // `view` last is a directory of that name, as `image` is.
            "view" if tokens.peek().is_some() => {
                let spec = tokens
                    .next()
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| usage(format!("{source}: 'view:' needs a spec file")))?;
                out.push(LowerSpec::View(absolute(Path::new(spec))?));
            }
            "" => return Err(usage(format!("{source}: empty layer between ':'"))),
            path if path.contains('=') => {
                return Err(usage(format!(
                    "{path}: branch modes (=RW/RO/NC) belong to unions; overlay layers are read-only"
                )));
            }
            path if Path::new(path).is_file() => {
                out.push(LowerSpec::Archive(absolute(Path::new(path))?))
            }
            path => out.push(LowerSpec::Host(absolute(Path::new(path))?)),
        }
    }
    Ok(out)
}

struct Prepared {
    fs: Mode,
    mount: MountConfig,
    readahead_kib: u64,
}

fn prepare(source: &str, mountpoint: &Path, option_lists: &[String]) -> Result<Prepared, Failure> {
    let opts = MountOptions::parse(option_lists.iter().map(String::as_str)).map_err(usage)?;
    strata_core::host::set_no_atime(opts.flags.atime == strata_fuse::Atime::No);
    if opts.upper.is_some() || has_overlay_layer(source) {
        return prepare_overlay(source, mountpoint, &opts);
    }
    if opts.branch.is_some() {
        return Err(usage(
            "option 'branch' needs an upper (--upper DIR): branches are of the writable state"
                .to_string(),
        ));
    }
    let mut branches = strata_core::source::parse_branches(source).map_err(usage)?;
    for b in &mut branches {
        b.path = absolute(&b.path)?;
    }
    let real_mountpoint = check_mountpoint(mountpoint, &opts)?;
    check_layers_apart(
        &real_mountpoint,
        &branches
            .iter()
            .map(|b| ("branch", b.path.as_path()))
            .collect::<Vec<_>>(),
    )?;
    let all_ro = branches
        .iter()
        .all(|b| b.mode == strata_core::source::BranchMode::RO);
    let paths = branches
        .iter()
        .map(|b| b.path.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let mount = mount_config(&opts, &paths, all_ro);
    // One plain directory is served directly; union options or an NC branch
    // ask for mergerfs's behaviour, which is a union of one branch.
    let single = branches.len() == 1
        && branches[0].mode != strata_core::source::BranchMode::NC
        && opts.union_keys.is_empty();
    let fs = if single {
        Mode::SingleDir(
            SingleDir::new(
                &branches[0].path,
                SingleDirConfig {
                    cache: opts.cache,
                    watch: opts.watch,
                    fd_cache: opts.fd_cache,
                    passthrough: opts.passthrough,
                },
            )
            .map_err(usage)?,
        )
    } else {
        Mode::Union(
            Union::new(UnionConfig {
                branches,
                settings: opts.union.clone(),
                watch: opts.watch,
                mountpoint: mountpoint.to_path_buf(),
                fd_cache: opts.fd_cache,
                passthrough: opts.passthrough,
            })
            .map_err(usage)?,
        )
    };
    Ok(Prepared {
        fs,
        mount,
        readahead_kib: opts.readahead_kib,
    })
}

fn mount_config(opts: &MountOptions, source: &str, read_only: bool) -> MountConfig {
    let is_root = rustix::process::geteuid().is_root();
    MountConfig {
        fsname: opts.fsname.clone().unwrap_or_else(|| source.to_string()),
        allow_other: opts.allow_other.unwrap_or(is_root),
        read_only: opts.read_only || read_only,
        threads: opts.threads,
        passthrough: opts.passthrough,
        uring: opts.uring,
        panic_probe: std::env::var_os("STRATA_PANIC_PROBE").is_some_and(|v| v == "1"),
        dev: opts.flags.dev,
        suid: opts.flags.suid,
        noexec: opts.flags.noexec,
        atime: opts.flags.atime,
        sync: opts.flags.sync,
        dirsync: opts.flags.dirsync,
    }
}

fn prepare_overlay(
    source: &str,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<Prepared, Failure> {
    if let Some(key) = opts.union_keys.first() {
        return Err(usage(format!(
            "option '{key}' is a union option; an overlay (--upper or image:) takes none: drop it"
        )));
    }
    let store = match &opts.store {
        Some(s) => absolute(s)?,
        None => strata_image::Store::default_root(),
    };
    let lowers = overlay_lowers(source, &store)?;
    let upper = opts.upper.as_deref().map(absolute).transpose()?;
    let mut layers: Vec<(&str, &Path)> = Vec::new();
    if let Some(up) = &upper {
        check_dir("--upper", up)?;
        layers.push(("upper", up));
    }
    for l in &lowers {
        match l {
            LowerSpec::Host(p) => {
                check_dir("lower", p)?;
                layers.push(("lower", p));
            }
            LowerSpec::Archive(p) => {
                check_archive(p)?;
                layers.push(("archive", p));
            }
            LowerSpec::View(p) => layers.push(("view spec", p)),
            LowerSpec::Image { .. } => {}
        }
    }
    if let Some(LowerSpec::Image { name, .. }) =
        lowers.iter().find(|l| matches!(l, LowerSpec::Image { .. }))
    {
        // With a remote, the store is where its images are kept: made on first use.
        if !store.exists() && opts.remote.is_none() {
            return Err(usage(format!(
                "image:{name}: image store {} does not exist (give -o store=DIR or set STRATA_STORE)",
                store.display()
            )));
        }
        layers.push(("image store", &store));
    }
    if let Some(up) = &upper {
        check_upper_apart(up, &lowers)?;
    }
    let fetch = remote_images(opts, &lowers, &store)?;
    let real_mountpoint = check_mountpoint(mountpoint, opts)?;
    check_layers_apart(&real_mountpoint, &layers)?;
    let cfg = OverlayConfig {
        lowers,
        upper: upper.clone(),
        cache: opts.cache,
        fd_cache: opts.fd_cache,
        passthrough: opts.passthrough,
        watch: opts.watch,
        index_dir: Some(store.join("archive-index")),
        fetch,
    };
    // With an upper, the overlay is a workspace: snapshots, branches.
    let fs = match &upper {
        Some(_) => {
            let ws = Workspace::open(cfg, opts.branch.as_deref()).map_err(usage)?;
            tracing::info!(layers = ws.describe(), "workspace");
            Mode::Workspace(Box::new(ws))
        }
        None if opts.branch.is_some() => {
            return Err(usage(
                "option 'branch' needs an upper (--upper DIR): branches are of the writable state"
                    .to_string(),
            ));
        }
        None => {
            let o = Overlay::new(cfg).map_err(usage)?;
            tracing::info!(layers = o.describe(), "overlay");
            Mode::Overlay(o)
        }
    };
    Ok(Prepared {
        fs,
        mount: mount_config(opts, source, upper.is_none()),
        readahead_kib: opts.readahead_kib,
    })
}

/// With `-o remote=`, the source of image blobs the store lacks; the
/// manifest of each image lower the store lacks is fetched now.
fn remote_images(
    opts: &MountOptions,
    lowers: &[LowerSpec],
    store: &Path,
) -> Result<Option<Arc<dyn strata_image::Fetch>>, Failure> {
    let Some(url) = &opts.remote else {
        if opts.remote_endpoint.is_some() {
            return Err(usage(
                "option 'remote.endpoint' goes with 'remote=s3://…'".to_string(),
            ));
        }
        return Ok(None);
    };
    let names: Vec<&str> = lowers
        .iter()
        .filter_map(|l| match l {
            LowerSpec::Image { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    if names.is_empty() {
        return Err(usage(format!(
            "option 'remote={url}': SOURCE has no image:NAME layer"
        )));
    }
    strata_remote::Location::parse(url).map_err(|e| usage(format!("option 'remote': {e}")))?;
    let remote =
        strata_remote::Remote::open(url, opts.remote_endpoint.as_deref()).map_err(failure)?;
    let local = strata_image::Store::open(store).map_err(|e| failure(e.to_string()))?;
    for name in names {
        strata_remote::pull_manifest(&local, name, &remote).map_err(|e| match e {
            strata_remote::PullError::NoImage(_) => usage(format!("image:{name}: {e}")),
            e => failure(format!("image:{name}: {e}")),
        })?;
    }
    Ok(Some(Arc::new(remote)))
}

/// An upper inside a host lower (or holding one) would see its own writes
/// as lower content; kernel overlayfs refuses overlapping layers too.
fn check_upper_apart(upper: &Path, lowers: &[LowerSpec]) -> Result<(), Failure> {
    let real = |p: &Path| fs::canonicalize(p).map_err(|e| usage(format!("{}: {e}", p.display())));
    let up = real(upper)?;
    for l in lowers {
        if let LowerSpec::Host(p) = l {
            let low = real(p)?;
            if is_within(&up, &low) || is_within(&low, &up) {
                return Err(usage(format!(
                    "upper {} and lower {} overlap; they must be separate directories",
                    upper.display(),
                    p.display()
                )));
            }
        }
    }
    Ok(())
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only for a person at a terminal: a background daemon's stderr
    // is its log file.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
    // Panics are caught per request; make sure they land in the log.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!("panic: {info}");
    }));
}

/// Lets the daemon keep many pinned descriptors where file handles are unavailable.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
    }
}

/// `mount --upper DIR`: the same as `-o upper=DIR`.
pub fn mount_with_upper(
    source: &str,
    mountpoint: &Path,
    option_lists: &[String],
    upper: Option<&Path>,
    foreground: bool,
    daemon_child: bool,
) -> Result<(), Failure> {
    let mut lists = option_lists.to_vec();
    if let Some(dir) = upper {
        let dir = absolute(dir)?;
        let text = dir.to_str().filter(|t| !t.contains(',')).ok_or_else(|| {
            usage(format!(
                "{}: upper path must be UTF-8 without ','",
                dir.display()
            ))
        })?;
        lists.push(format!("upper={text}"));
    }
    mount(source, mountpoint, &lists, foreground, daemon_child)
}

pub fn mount(
    source: &str,
    mountpoint: &Path,
    option_lists: &[String],
    foreground: bool,
    daemon_child: bool,
) -> Result<(), Failure> {
    let mountpoint = absolute(mountpoint)?;
    if !foreground && !daemon_child {
        // The daemon checks everything once (an image's manifest is read and
        // verified there, not twice) and reports the first error on its
        // stdout, which becomes ours.
        return spawn_daemon(source, &mountpoint, option_lists);
    }
    // Before any thread: each worker that allocates would otherwise get its
    // own malloc arena, and every arena keeps its own slack (overlay with
    // 150k inodes: 67.6 MiB peak with an arena per thread, 57.9 with one).
    // Threads keep their own small-chunk caches, so they rarely share the lock.
    strata_core::host::sys::limit_malloc_arenas(1);
    init_logging(if daemon_child { "info" } else { "warn" });
    let report = |line: &str| {
        if daemon_child {
            // The parent waits for exactly one line on our stdout.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    };
    let prepared = match prepare(source, &mountpoint, option_lists) {
        Ok(p) => p,
        Err(e) => {
            report(&format!("error {} {}", e.code, e.message));
            return Err(e);
        }
    };
    // New objects get exactly the mode the kernel asks for.
    rustix::process::umask(rustix::fs::Mode::empty());
    raise_fd_limit();
    let ctx = Serving {
        source,
        mountpoint: &mountpoint,
        daemon_child,
        report: &report,
        readahead_kib: prepared.readahead_kib,
    };
    match prepared.fs {
        Mode::SingleDir(rule) => ctx.run(Arc::new(Stack::new(rule)), &prepared.mount),
        Mode::Union(rule) => ctx.run(Arc::new(Stack::new(rule)), &prepared.mount),
        Mode::Overlay(rule) => ctx.run(Arc::new(Stack::new(rule)), &prepared.mount),
        Mode::Workspace(rule) => ctx.run(Arc::new(Stack::new(*rule)), &prepared.mount),
    }
}

/// What serving a mount needs besides the filesystem.
struct Serving<'a> {
    source: &'a str,
    mountpoint: &'a Path,
    daemon_child: bool,
    report: &'a dyn Fn(&str),
    /// Kernel readahead to set on the mount, KiB; 0 keeps the kernel's.
    readahead_kib: u64,
}

impl Serving<'_> {
    fn run<F: strata_core::Filesystem>(
        &self,
        fs: Arc<F>,
        cfg: &MountConfig,
    ) -> Result<(), Failure> {
        let (source, mountpoint, report) = (self.source, self.mountpoint, self.report);
        let session = match strata_fuse::mount(fs, mountpoint, cfg) {
            Ok(s) => s,
            Err(e) => {
                let f = failure(mount_error(mountpoint, &e));
                report(&format!("error {} {}", f.code, f.message));
                return Err(f);
            }
        };
        if self.readahead_kib > 0 {
            set_readahead(mountpoint, self.readahead_kib);
        }
        let record = MountRecord {
            mountpoint: mountpoint.to_path_buf(),
            source: source.to_string(),
            pid: std::process::id(),
            started: state::now(),
            // The file the parent opened as our stderr, one per daemon.
            log: if self.daemon_child {
                fs::read_link("/proc/self/fd/2").unwrap_or_default()
            } else {
                PathBuf::new()
            },
        };
        if let Err(e) = state::write_record(&record) {
            tracing::warn!(
                "cannot write mount record {}: {e}",
                state::record_path(mountpoint).display()
            );
        }
        tracing::info!(source, mountpoint = %mountpoint.display(), "mounted");
        report("ready");
        crate::notify::notify(&format!(
            "READY=1\nMAINPID={}\nSTATUS=serving {source} at {}",
            std::process::id(),
            mountpoint.display()
        ));
        serve(session, mountpoint)
    }
}

/// Why the kernel mount failed, in one line. Without access to /dev/fuse
/// (and no setuid fusermount3 to fall back on) the error is a bare EACCES:
/// name the device.
fn mount_error(mountpoint: &Path, e: &std::io::Error) -> String {
    let mp = mountpoint.display();
    if e.kind() == std::io::ErrorKind::PermissionDenied
        && rustix::fs::access(
            "/dev/fuse",
            rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK,
        )
        .is_err()
    {
        return format!(
            "{mp}: mount failed: /dev/fuse: permission denied for uid {} \
             (needs read-write access to /dev/fuse, or fusermount3 installed setuid root)",
            rustix::process::geteuid().as_raw()
        );
    }
    format!("{mp}: mount failed: {e}")
}

/// Sets the readahead of the mount just made, for the reads the daemon
/// serves. The kernel caps what INIT may ask for at its 128 KiB default, so
/// it goes through the mount's bdi in sysfs (root only); the device comes
/// from the mount table, since a stat of the mountpoint would wait for this
/// very daemon, which is not serving yet.
fn set_readahead(mountpoint: &Path, kib: u64) {
    let Some(m) = state::mount_at(mountpoint) else {
        tracing::debug!(mountpoint = %mountpoint.display(), "mount not in the mount table; readahead left alone");
        return;
    };
    let knob = format!("/sys/class/bdi/{}/read_ahead_kb", m.device);
    match fs::write(&knob, kib.to_string()) {
        Ok(()) => tracing::debug!(knob, kib, "readahead set"),
        Err(e) => tracing::debug!(knob, "readahead left at the kernel's default: {e}"),
    }
}

fn serve<F: strata_core::Filesystem>(
    mut session: strata_fuse::Session<strata_fuse::Adapter<F>>,
    mountpoint: &Path,
) -> Result<(), Failure> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| failure(format!("cannot install signal handlers: {e}")))?;
    let signal_handle = signals.handle();
    let mp = mountpoint.to_path_buf();
    // Unmounts only our own mount, never by path alone: it may have been
    // unmounted or detached from outside and another mounted in its place.
    // Lazy, as libfuse does: a busy mount is detached now and the daemon
    // keeps serving open files until their last close.
    let mut unmounter = session.unmount_callable();
    let signal_thread = std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, mountpoint = %mp.display(), "unmounting on signal");
            crate::notify::notify("STOPPING=1\nSTATUS=unmounting");
            if let Err(e) = unmounter.unmount() {
                tracing::error!(mountpoint = %mp.display(), "unmount failed: {e}");
            }
        }
    });
    let result = session.run();
    // Unmounted from outside (umount) or on a signal: systemd hears it.
    crate::notify::notify("STOPPING=1\nSTATUS=unmounted");
    signal_handle.close();
    let _ = signal_thread.join();
    state::remove_own_record(mountpoint);
    tracing::info!(mountpoint = %mountpoint.display(), "unmounted");
    result.map_err(|e| failure(format!("{}: serving failed: {e}", mountpoint.display())))
}

fn spawn_daemon(source: &str, mountpoint: &Path, option_lists: &[String]) -> Result<(), Failure> {
    let exe =
        std::env::current_exe().map_err(|e| failure(format!("cannot find own executable: {e}")))?;
    let log = state::new_log_path(mountpoint);
    fs::create_dir_all(log.parent().expect("has parent"))
        .map_err(|e| failure(format!("{}: {e}", log.display())))?;
    // Room for the new log among the kept ones.
    state::prune_logs(mountpoint, state::LOGS_KEPT - 1);
    let log_file = fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&log)
        .map_err(|e| failure(format!("{}: {e}", log.display())))?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount").arg("--daemon-child");
    for o in option_lists {
        cmd.arg("-o").arg(o);
    }
    cmd.arg(source)
        .arg(mountpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| failure(format!("cannot start daemon: {e}")))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = match rx.recv_timeout(READY_TIMEOUT) {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            return Err(failure(format!(
                "{}: daemon not ready after {}s; see {}",
                mountpoint.display(),
                READY_TIMEOUT.as_secs(),
                log.display()
            )));
        }
    };
    let line = line.trim_end();
    if line == "ready" {
        return Ok(());
    }
    let _ = child.wait();
    if let Some(rest) = line.strip_prefix("error ") {
        // The error is the user's now; the attempt's log holds nothing more.
        let _ = fs::remove_file(&log);
        let (code, msg) = rest.split_once(' ').unwrap_or(("1", rest));
        return Err(Failure {
            code: code.parse().unwrap_or(EXIT_FAILURE),
            message: msg.to_string(),
        });
    }
    Err(failure(format!(
        "{}: daemon exited before the mount was ready; see {}",
        mountpoint.display(),
        log.display()
    )))
}

fn unmount_syscall(mountpoint: &Path, lazy: bool) -> std::io::Result<()> {
    if rustix::process::geteuid().is_root() {
        let flags = if lazy {
            rustix::mount::UnmountFlags::DETACH
        } else {
            rustix::mount::UnmountFlags::empty()
        };
        return rustix::mount::unmount(mountpoint, flags).map_err(Into::into);
    }
    let mut cmd = Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd.arg(mountpoint).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

pub fn umount(mountpoint: &Path, lazy: bool) -> Result<(), Failure> {
    let mountpoint = absolute(mountpoint)?;
    let mp = mountpoint.display();
    let record = state::read_record(&mountpoint);
    let Some(m) = state::mount_at(&mountpoint) else {
        state::remove_record(&mountpoint);
        return Err(usage(format!("{mp}: not mounted")));
    };
    if m.fstype != state::FSTYPE {
        return Err(usage(format!("{mp}: not a strata mount ({})", m.fstype)));
    }
    let health = state::health(&mountpoint);
    let stale = health == state::Health::Stale;
    // A mount that does not answer holds whoever asked it (our own probe
    // among them): only detaching it works.
    let hung = health == state::Health::Hung;
    unmount_syscall(&mountpoint, lazy || stale || hung).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            usage(format!("{mp}: busy (files open or a process inside); `strata umount -l {mp}` detaches it anyway"))
        } else {
            failure(format!("{mp}: unmount failed: {e}"))
        }
    })?;
    // Give a live daemon a moment to finish, so a remount right after works.
    // A stale mount's daemon is gone already (at most a zombie); a stopped
    // one cannot finish until it is continued.
    if let Some(rec) = record.filter(|_| !stale) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while state::pid_alive(rec.pid) && !state::pid_stopped(rec.pid) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    state::remove_record(&mountpoint);
    Ok(())
}

fn uptime(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

pub fn status(json: bool) -> Result<(), Failure> {
    let now = state::now();
    let mounts: Vec<_> = state::kernel_mounts()
        .into_iter()
        .filter(|m| m.fstype == state::FSTYPE)
        .collect();
    // All mounts are probed at once, so hung ones cost one timeout in all.
    let probes: Vec<_> = mounts
        .iter()
        .map(|m| state::Probe::start(&m.mountpoint, true, None))
        .collect();
    let deadline = Instant::now() + state::PROBE_TIMEOUT;
    let mut rows = Vec::new();
    for (m, probe) in mounts.iter().zip(probes) {
        let (health, stats) = probe.finish(deadline);
        let rec = state::read_record(&m.mountpoint);
        let pid = rec.as_ref().map(|r| r.pid).filter(|p| state::pid_alive(*p));
        let state = match health {
            state::Health::Hung => "hung",
            state::Health::Stale => "stale",
            state::Health::Ok if pid.is_none() && rec.is_some() => "stale",
            state::Health::Ok => "ok",
        };
        rows.push(serde_json::json!({
            "mountpoint": m.mountpoint,
            "source": rec.as_ref().map_or(m.source.clone(), |r| r.source.clone()),
            "pid": pid,
            "uptime_secs": rec.as_ref().map(|r| now.saturating_sub(r.started)),
            "state": state,
            "log": rec.as_ref().map(|r| r.log.clone()).filter(|l| !l.as_os_str().is_empty()),
            "stats": stats,
        }));
    }
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("serializable")
        )?;
        return Ok(());
    }
    if rows.is_empty() {
        outln!("no strata mounts")?;
        return Ok(());
    }
    outln!(
        "{:<30} {:<30} {:>8} {:>8}  {:<5}  LOG",
        "MOUNTPOINT",
        "SOURCE",
        "PID",
        "UPTIME",
        "STATE"
    )?;
    for r in rows {
        let s = |k: &str| {
            r[k].as_str()
                .map(str::to_string)
                .unwrap_or_else(|| "-".into())
        };
        let pid = r["pid"].as_u64().map_or("-".into(), |p| p.to_string());
        let up = r["uptime_secs"].as_u64().map_or("-".into(), uptime);
        outln!(
            "{:<30} {:<30} {:>8} {:>8}  {:<5}  {}",
            s("mountpoint"),
            s("source"),
            pid,
            up,
            s("state"),
            s("log")
        )?;
    }
    Ok(())
}

/// `strata view check SPEC`.
pub fn view_check(spec: &Path) -> Result<(), Failure> {
    match strata_core::layer::view::Spec::load(spec) {
        Ok(s) => {
            for line in s.describe() {
                outln!("{line}")?;
            }
            Ok(())
        }
        Err(errors) => Err(usage(errors.join("\n"))),
    }
}

/// A regular file in SOURCE must be an archive: said before the daemon
/// starts, in terms of what SOURCE may hold.
fn check_archive(path: &Path) -> Result<(), Failure> {
    use std::io::Read;
    let mut head = Vec::with_capacity(512);
    let read = fs::File::open(path).and_then(|f| f.take(512).read_to_end(&mut head));
    match read {
        Err(e) => Err(usage(format!("{}: {e}", path.display()))),
        Ok(_) if strata_archive::Format::sniff(&head).is_none() => Err(usage(format!(
            "{}: not a directory, nor a known archive (tar, tar.gz, tar.zst, tar.xz, zip)",
            path.display()
        ))),
        Ok(_) => Ok(()),
    }
}

/// How long a command waits for a mount to answer.
pub const MOUNT_ANSWER_LIMIT: Duration = Duration::from_secs(5);

/// Set in the child [`in_child`] starts: it does the work itself.
const CHILD_ENV: &str = "STRATA_ASKS_IN_CHILD";

/// For a command that asks the mount at `path` something: runs this same
/// command again in a child process and waits `limit` (usually
/// [`MOUNT_ANSWER_LIMIT`]) for it; its output and exit status become ours. A child that does not end is
/// killed and left behind (a thread could not be: with FUSE over io_uring
/// a request already queued holds its caller, and so the whole process,
/// until the mount answers; see `state::Probe`), and the command fails with
/// one line. `None` in the child itself: the caller does the work.
pub fn in_child(path: &Path, limit: Duration) -> Option<Result<(), Failure>> {
    if is_asking_child() {
        return None;
    }
    Some(run_in_child(path, limit))
}

/// Whether this process is the child [`in_child`] started.
pub fn is_asking_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

fn run_in_child(path: &Path, limit: Duration) -> Result<(), Failure> {
    use std::io::Read;
    let exe =
        std::env::current_exe().map_err(|e| failure(format!("cannot find own executable: {e}")))?;
    let mut child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failure(format!("cannot start a child: {e}")))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let (mut out, mut err) = (
        child.stdout.take().expect("piped"),
        child.stderr.take().expect("piped"),
    );
    std::thread::spawn(move || {
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let errs = std::thread::spawn(move || {
            let _ = err.read_to_end(&mut e);
            e
        });
        let _ = out.read_to_end(&mut o);
        let e = errs.join().unwrap_or_default();
        let _ = tx.send((o, e));
    });
    let Ok((o, e)) = rx.recv_timeout(limit) else {
        let _ = child.kill();
        return Err(failure(format!(
            "{}: no answer within {}s (is the mount hung?)",
            path.display(),
            limit.as_secs()
        )));
    };
    let status = child.wait().map_err(|e| failure(e.to_string()))?;
    let _ = std::io::stderr().write_all(&e);
    if let Err(e) = std::io::stdout().write_all(&o) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Err(Failure::quiet());
        }
        return Err(failure(format!("stdout: {e}")));
    }
    match status.code() {
        Some(0) => Ok(()),
        code => Err(Failure {
            code: code.unwrap_or(1) as u8,
            message: String::new(),
        }),
    }
}

/// `strata view explain PATH`: the `user.strata.source` xattr (asked in a
/// child, [`in_child`]).
pub fn view_explain(path: &Path) -> Result<(), Failure> {
    if let Some(done) = in_child(path, MOUNT_ANSWER_LIMIT) {
        return done;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let text = match rustix::fs::lgetxattr(path, strata_core::overlay::SOURCE_XATTR, &mut buf[..]) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(rustix::io::Errno::NODATA | rustix::io::Errno::NOTSUP) => {
            return Err(usage(format!(
                "{}: not on a strata overlay, archive or view mount",
                path.display()
            )));
        }
        Err(e) => return Err(failure(format!("{}: {e}", path.display()))),
    };
    outln!("{text}")
}
