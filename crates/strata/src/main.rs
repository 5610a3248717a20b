//! `strata`: mount layered namespaces through FUSE.

#![deny(unsafe_code)]

mod commands;
mod ctl;
mod doctor;
mod image_cmd;
mod notify;
mod options;
mod output;
mod state;
mod workspace_cmd;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// Exit code for bad input (usage, paths, options), as mount(8) helpers do.
pub const EXIT_USAGE: u8 = 2;
/// Exit code for failures at run time.
pub const EXIT_FAILURE: u8 = 1;

#[derive(Parser, Debug)]
#[command(
    name = "strata",
    version,
    about = "Layered FUSE filesystem: host branches, images, copy-on-write upper",
    long_about = "strata mounts a namespace composed of layers through FUSE.\n\n\
        A host directory is served with near-native speed: kernel passthrough for file I/O, \
        readdirplus, kernel attribute caching and multi-threaded dispatch.\n\n\
        Logging: set RUST_LOG (e.g. RUST_LOG=debug). Daemon logs go to the file shown by \
        `strata status`.",
    after_help = "EXAMPLES:\n  \
        strata mount /srv/data /mnt/data        mount in the background, return when ready\n  \
        strata mount -f /srv/data /mnt/data     stay in the foreground; Ctrl-C unmounts\n  \
        strata status                           list strata mounts\n  \
        strata umount /mnt/data                 unmount (also clears a stale mount)\n  \
        strata image build ./root --name base   build image \"base\" from a directory\n  \
        strata image ls                         list images (--json for scripts)\n  \
        strata image verify base                re-hash every blob of an image\n  \
        strata image rm base                    remove an image (deferred while mounted)\n  \
        strata gc                               free blobs and cache files no image uses"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `strata mount --help` after the arguments: every `-o` option, from the
/// option table, and the exit status.
fn mount_after_help() -> String {
    format!(
        "{}\nEXIT STATUS:\n  0 mounted, 2 bad input (the message names the path or option), 1 other failure.",
        options::help()
    )
}

#[derive(Subcommand, Debug)]
enum ViewCommand {
    /// Check SPEC: exit 0 and one line per map, or exit 2 and one line per error.
    Check { spec: PathBuf },
    /// Where PATH (on a strata mount) comes from: the source object, and
    /// for a view the map and its rules (the `user.strata.source` xattr).
    Explain { path: PathBuf },
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Mount SOURCE on MOUNTPOINT.
    #[command(
        long_about = "Mount SOURCE on MOUNTPOINT.\n\n\
            SOURCE is a branch list in mergerfs syntax: PATH[=RW|RO|NC][,MINFREE] joined by ':'. \
            One branch is served as is; several make a mergerfs-style union (policies via -o or `strata ctl`).\n\n\
            With image layers (image:NAME), archives (a tar, tar.gz, tar.zst, tar.xz or zip file), views \
            (view:SPEC.toml, docs/VIEWS.md) or --upper, SOURCE lists overlay lowers instead, topmost first \
            (e.g. image:app:image:base:/srv/extra): read-only without --upper; with --upper DIR every change \
            is copied up into DIR, in kernel overlayfs format (whiteouts, opaque directories).\n\n\
            Without -f the command starts a daemon and returns once the mount is ready; errors are \
            reported before it returns. With -f it serves in the foreground until unmounted or \
            interrupted (SIGINT/SIGTERM unmount cleanly).",
        after_help = mount_after_help()
    )]
    Mount {
        /// Stay in the foreground.
        #[arg(short = 'f', long)]
        foreground: bool,
        /// Mount options, comma separated: KEY or KEY=VALUE (list below).
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Writable upper directory: copy-on-write over the layers of SOURCE
        /// (same as -o upper=DIR).
        #[arg(long, value_name = "DIR")]
        upper: Option<PathBuf>,
        /// Internal: run as the daemon child of a background mount.
        #[arg(long, hide = true)]
        daemon_child: bool,
        /// Branch list PATH[=RW|RO|NC][,MINFREE] joined by ':', or overlay
        /// layers (image:NAME, view:SPEC, an archive file or PATH) joined by
        /// ':', topmost first.
        source: String,
        /// Where to mount.
        mountpoint: PathBuf,
    },
    /// Unmount a strata mount; a stale one (daemon gone) is detached.
    Umount {
        /// Detach now even if busy; cleanup happens when it is no longer in use.
        #[arg(short = 'l', long)]
        lazy: bool,
        mountpoint: PathBuf,
    },
    /// Read or change a mount's runtime keys (the xattrs of MOUNTPOINT/.strata).
    #[command(after_help = "EXAMPLES:\n  \
        strata ctl /pool list\n  \
        strata ctl /pool get category.create\n  \
        strata ctl /pool set category.create=mfs func.getattr=newest\n  \
        strata ctl /pool set branches=+>/disk4       (also +< - -< -> =)")]
    Ctl {
        mountpoint: PathBuf,
        /// list, get or set
        action: String,
        /// KEY for get, KEY=VALUE pairs for set
        args: Vec<String>,
    },
    /// Build, list, verify and remove images (content-addressed and deduplicated).
    Image {
        #[command(subcommand)]
        command: image_cmd::ImageCommand,
    },
    /// Check a view spec (docs/VIEWS.md), or explain where a path of a
    /// mount comes from.
    View {
        #[command(subcommand)]
        command: ViewCommand,
    },
    /// Snapshots of a workspace (a mount with --upper): create, ls, rm, diff.
    #[command(after_help = "EXAMPLES:\n  \
        strata snapshot create /ws/repo --name before-refactor\n  \
        strata snapshot ls /ws/repo --json\n  \
        strata snapshot diff /ws/repo before-refactor try-a")]
    Snapshot {
        #[command(subcommand)]
        command: workspace_cmd::SnapshotCommand,
    },
    /// Branches of a workspace: writable forks of snapshots, seen by the
    /// processes bound to them through the same mount.
    #[command(after_help = "EXAMPLES:\n  \
        strata branch create /ws/repo --from before-refactor --name try-a\n  \
        strata branch exec /ws/repo try-a -- make test\n  \
        strata branch bind /ws/repo try-a --pid 4242\n  \
        strata branch switch /ws/repo try-a\n  \
        strata branch rm /ws/repo try-b")]
    Branch {
        #[command(subcommand)]
        command: workspace_cmd::BranchCommand,
    },
    /// Free the image store's blobs and cache files that no image uses.
    Gc {
        #[command(flatten)]
        store: image_cmd::StoreArg,
    },
    /// Internal: probe a mountpoint for `status` (in a child process, so a
    /// hung mount never blocks the command itself).
    #[command(hide = true)]
    ProbeMount {
        #[arg(long)]
        stats: bool,
        /// Read this file first and hold it open while the counters are read.
        #[arg(long)]
        hold: Option<PathBuf>,
        path: PathBuf,
    },
    /// Write the man pages (strata.1, strata-mount.1, ...: the same text as
    /// --help) into DIR.
    #[command(hide = true)]
    Man { dir: PathBuf },
    /// Check what this machine gives strata (/dev/fuse, kernel passthrough,
    /// FUSE over io_uring, fanotify, mount(8)), with the fix for each problem.
    Doctor,
    /// List strata mounts: mountpoint, source, pid, uptime, state, log.
    Status {
        /// Machine-readable output, with inode and handle counters.
        #[arg(long)]
        json: bool,
    },
}

/// The arguments, with `mount` put in front of `SOURCE MOUNTPOINT [-o OPTS]`
/// (how mount(8) runs a filesystem's helper through mount.fuse3: `mount -t
/// fuse.strata` and fstab lines of that type work without a helper of ours).
fn arguments() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or("-");
    let subcommand = first.starts_with('-')
        || Cli::command().find_subcommand(first).is_some()
        || first == "help";
    if !subcommand && args.len() >= 3 {
        args.insert(1, "mount".into());
    }
    args
}

/// `strata man DIR`: one page per visible command, from the clap
/// definitions (so a page and `--help` never disagree).
fn write_man_pages(dir: &std::path::Path) -> Result<(), commands::Failure> {
    let fail = |e: std::io::Error| commands::failure(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(fail)?;
    clap_mangen::generate_to(Cli::command(), dir).map_err(fail)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(arguments()) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Mount {
            foreground,
            options,
            daemon_child,
            upper,
            source,
            mountpoint,
        } => commands::mount_with_upper(
            &source,
            &mountpoint,
            &options,
            upper.as_deref(),
            foreground,
            daemon_child,
        ),
        Command::Umount { lazy, mountpoint } => commands::umount(&mountpoint, lazy),
        Command::Status { json } => commands::status(json),
        Command::ProbeMount { stats, hold, path } => {
            state::probe_mount(&path, stats, hold.as_deref());
            Ok(())
        }
        Command::Ctl {
            mountpoint,
            action,
            args,
        } => commands::in_child(&mountpoint, commands::MOUNT_ANSWER_LIMIT)
            .unwrap_or_else(|| ctl::run(&mountpoint, &action, &args)),
        Command::Image { command } => image_cmd::run(command),
        Command::Snapshot { command } => workspace_cmd::snapshot(command),
        Command::Branch { command } => workspace_cmd::branch(command),
        Command::Gc { store } => image_cmd::gc(&store),
        Command::Man { dir } => write_man_pages(&dir),
        Command::Doctor => doctor::run(),
        Command::View { command } => match command {
            ViewCommand::Check { spec } => commands::view_check(&spec),
            ViewCommand::Explain { path } => commands::view_explain(&path),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.message.is_empty() {
                // Not eprintln!: a closed stderr must not turn into a panic.
                let _ = writeln!(std::io::stderr(), "strata: {}", e.message);
            }
            ExitCode::from(e.code)
        }
    }
}
