//! `strata snapshot` and `strata branch`: a workspace's snapshots and
//! branches (docs/ARCHITECTURE.md, "Snapshots and branches"). Changes go
//! through the mount's control file, so the daemon serving it makes them;
//! listings and diffs read the workspace's state directly.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Subcommand;
use strata_core::control::NAME as CONTROL_NAME;
use strata_core::workspace::diff::{self, Change};
use strata_core::workspace::state::{self, State, layer_rel};

use crate::commands::{Failure, MOUNT_ANSWER_LIMIT, failure, in_child, usage};
use crate::ctl::{PREFIX, control_file, get, read_key};
use crate::image_cmd::iso8601_secs;
use crate::output::outln;

/// How long a snapshot may take (it syncs the mount's dirty data and
/// copies the files open at the time).
const SNAPSHOT_LIMIT: Duration = Duration::from_secs(300);

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Freeze the writable state the caller sees on MOUNTPOINT (O(1));
    /// prints the snapshot's id.
    Create {
        mountpoint: PathBuf,
        /// A name (letters, digits, '.', '_', '-'); default snap-DATE-TIME.
        #[arg(long)]
        name: Option<String>,
    },
    /// List snapshots: id, name, branch, parent, created, size.
    Ls {
        mountpoint: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove a snapshot (refused while a branch was made from it).
    Rm { mountpoint: PathBuf, name: String },
    /// Build image IMAGE (in the image store) from a snapshot: deduplicated
    /// against the store, mountable, pushable like any image.
    Export {
        mountpoint: PathBuf,
        name: String,
        #[arg(long)]
        image: String,
        /// Replace an existing image of that name.
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        store: crate::image_cmd::StoreArg,
    },
    /// Added, modified and deleted paths from FROM to TO (snapshot names or
    /// ids, or branch names).
    Diff {
        mountpoint: PathBuf,
        from: String,
        to: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum BranchCommand {
    /// A writable fork of a snapshot (O(1)).
    Create {
        mountpoint: PathBuf,
        /// The snapshot (name or id).
        #[arg(long)]
        from: String,
        #[arg(long)]
        name: String,
    },
    /// List branches: name, the snapshot it came from, created, which one
    /// the mount shows, bound processes.
    Ls {
        mountpoint: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove a branch (refused while it is shown, bound or has open files).
    Rm { mountpoint: PathBuf, name: String },
    /// Make NAME the branch processes that are not bound see.
    Switch { mountpoint: PathBuf, name: String },
    /// Run a command that (with its children) sees branch NAME at MOUNTPOINT.
    Exec {
        mountpoint: PathBuf,
        name: String,
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
    /// Bind a running process (and the children it starts afterwards) to
    /// branch NAME.
    Bind {
        mountpoint: PathBuf,
        name: String,
        #[arg(long)]
        pid: u32,
    },
    /// Undo a binding: the process sees the mount's current branch again.
    Unbind {
        mountpoint: PathBuf,
        #[arg(long)]
        pid: u32,
    },
}

/// A mounted workspace: its control file and upper directory.
struct Mounted {
    control: PathBuf,
    upper: PathBuf,
}

impl Mounted {
    fn open(mountpoint: &Path) -> Result<Mounted, Failure> {
        let control = control_file(mountpoint)?;
        let upper = read_key(&control, "workspace")?.ok_or_else(|| {
            usage(format!(
                "{}: not a workspace (snapshots and branches need a mount with --upper)",
                mountpoint.display()
            ))
        })?;
        let upper = PathBuf::from(upper);
        Ok(Mounted { control, upper })
    }

    /// Sets a control key; a refusal comes back as the daemon's one line.
    fn set(&self, key: &str, value: &str) -> Result<(), Failure> {
        rustix::fs::setxattr(
            &self.control,
            format!("{PREFIX}{key}").as_str(),
            value.as_bytes(),
            rustix::fs::XattrFlags::empty(),
        )
        .map_err(|e| {
            let why = get(&self.control, "error").unwrap_or_default();
            let why = match why.is_empty() {
                true => format!("{key} {value}: {e}"),
                false => why,
            };
            match e {
                rustix::io::Errno::IO | rustix::io::Errno::NOSPC => failure(why),
                _ => usage(why),
            }
        })
    }

    fn state(&self) -> Result<State, Failure> {
        State::open_read_only(&self.upper).map_err(failure)
    }
}

fn default_name() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    format!("snap-{}", iso8601_secs(now).replace([':', '-'], ""))
}

/// Bytes a layer directory holds on disk (the workspace's own directory
/// aside).
fn layer_size(upper: &Path, id: i64) -> u64 {
    fn walk(dir: &Path, top: bool) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut n = 0;
        for e in entries.flatten() {
            if top && e.file_name() == CONTROL_NAME {
                continue;
            }
            let Ok(m) = e.metadata() else { continue };
            n += std::os::unix::fs::MetadataExt::blocks(&m) * 512;
            if m.is_dir() {
                n += walk(&e.path(), false);
            }
        }
        n
    }
    walk(&upper.join(layer_rel(id)), id == 0)
}

fn sync_mount(mountpoint: &Path) -> Result<(), Failure> {
    let dir = std::fs::File::open(mountpoint)
        .map_err(|e| failure(format!("{}: {e}", mountpoint.display())))?;
    rustix::fs::syncfs(&dir).map_err(|e| failure(format!("{}: syncfs: {e}", mountpoint.display())))
}

pub fn snapshot(cmd: SnapshotCommand) -> Result<(), Failure> {
    if let SnapshotCommand::Export {
        mountpoint,
        name,
        image,
        replace,
        store,
    } = cmd
    {
        return export(&mountpoint, &name, &image, replace, &store.root());
    }
    let (mp, limit) = match &cmd {
        // Long limits for long work: a mount that does not answer at all
        // is told from a short probe first.
        SnapshotCommand::Create { mountpoint, .. } | SnapshotCommand::Diff { mountpoint, .. }
            if !crate::commands::is_asking_child() =>
        {
            check_answers(mountpoint)?;
            (mountpoint, SNAPSHOT_LIMIT)
        }
        SnapshotCommand::Create { mountpoint, .. } => (mountpoint, SNAPSHOT_LIMIT),
        SnapshotCommand::Diff { mountpoint, .. } => (mountpoint, SNAPSHOT_LIMIT),
        SnapshotCommand::Ls { mountpoint, .. } | SnapshotCommand::Rm { mountpoint, .. } => {
            (mountpoint, MOUNT_ANSWER_LIMIT)
        }
        SnapshotCommand::Export { .. } => unreachable!("handled above"),
    };
    if let Some(done) = in_child(mp, limit) {
        return done;
    }
    match cmd {
        SnapshotCommand::Create { mountpoint, name } => {
            let m = Mounted::open(&mountpoint)?;
            let name = name.unwrap_or_else(default_name);
            state::check_name("snapshot", &name).map_err(|e| usage(e.why))?;
            // Written data still in the kernel's page cache goes in first.
            sync_mount(&mountpoint)?;
            m.set("snapshot.create", &name)?;
            let s = m.state()?.snapshot(&name).map_err(|e| failure(e.why))?;
            outln!("{}", s.id)?;
        }
        SnapshotCommand::Ls { mountpoint, json } => {
            let m = Mounted::open(&mountpoint)?;
            let list = match State::open_read_only(&m.upper) {
                Ok(st) => st.snapshots().map_err(|e| failure(e.why))?,
                Err(_) => Vec::new(),
            };
            if json {
                let rows: Vec<serde_json::Value> = list
                    .iter()
                    .map(|s| {
                        let mut v = serde_json::to_value(s).expect("plain data");
                        v["size"] = layer_size(&m.upper, s.layer).into();
                        v
                    })
                    .collect();
                outln!("{}", serde_json::Value::Array(rows))?;
            } else {
                outln!(
                    "{:>4}  {:<20} {:<12} {:<20} {:<20} {:>10}",
                    "ID",
                    "NAME",
                    "BRANCH",
                    "PARENT",
                    "CREATED (UTC)",
                    "SIZE"
                )?;
                for s in &list {
                    outln!(
                        "{:>4}  {:<20} {:<12} {:<20} {:<20} {:>10}",
                        s.id,
                        s.name,
                        s.branch,
                        s.parent.as_deref().unwrap_or("-"),
                        iso8601_secs(s.created),
                        layer_size(&m.upper, s.layer)
                    )?;
                }
            }
        }
        SnapshotCommand::Rm { mountpoint, name } => {
            Mounted::open(&mountpoint)?.set("snapshot.rm", &name)?;
        }
        SnapshotCommand::Diff {
            mountpoint,
            from,
            to,
            json,
        } => {
            let m = Mounted::open(&mountpoint)?;
            // The live layers of branches hold what was written: flush it.
            sync_mount(&mountpoint)?;
            let changes = diff::diff(&m.upper, &from, &to).map_err(usage)?;
            if json {
                outln!("{}", serde_json::to_string(&changes).expect("plain data"))?;
            } else {
                for c in &changes {
                    let tag = match c.change {
                        Change::Added => 'A',
                        Change::Modified => 'M',
                        Change::Deleted => 'D',
                    };
                    outln!("{tag} {}", c.path)?;
                }
            }
        }
        SnapshotCommand::Export { .. } => unreachable!("handled above"),
    }
    Ok(())
}

pub fn branch(cmd: BranchCommand) -> Result<(), Failure> {
    if let BranchCommand::Exec {
        mountpoint,
        name,
        command,
    } = cmd
    {
        return exec(&mountpoint, &name, &command);
    }
    let mp = match &cmd {
        BranchCommand::Create { mountpoint, .. }
        | BranchCommand::Ls { mountpoint, .. }
        | BranchCommand::Rm { mountpoint, .. }
        | BranchCommand::Switch { mountpoint, .. }
        | BranchCommand::Bind { mountpoint, .. }
        | BranchCommand::Unbind { mountpoint, .. }
        | BranchCommand::Exec { mountpoint, .. } => mountpoint.clone(),
    };
    if let Some(done) = in_child(&mp, MOUNT_ANSWER_LIMIT) {
        return done;
    }
    let m = Mounted::open(&mp)?;
    match cmd {
        BranchCommand::Create { from, name, .. } => {
            state::check_name("branch", &name).map_err(|e| usage(e.why))?;
            m.set("branch.create", &format!("{name} {from}"))?;
        }
        BranchCommand::Rm { name, .. } => m.set("branch.rm", &name)?,
        BranchCommand::Switch { name, .. } => m.set("branch.switch", &name)?,
        BranchCommand::Bind { name, pid, .. } => m.set("branch.bind", &format!("{name} {pid}"))?,
        BranchCommand::Unbind { pid, .. } => m.set("branch.unbind", &pid.to_string())?,
        BranchCommand::Ls { json, .. } => {
            let bindings: serde_json::Value =
                serde_json::from_str(&get(&m.control, "bindings")?).unwrap_or_default();
            let shown = get(&m.control, "branch")?;
            let list = match State::open_read_only(&m.upper) {
                Ok(st) => st.branches().map_err(|e| failure(e.why))?,
                Err(_) => Vec::new(),
            };
            let bound = |b: &str| -> Vec<u64> {
                bindings
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|v| v["branch"] == b)
                    .filter_map(|v| v["pid"].as_u64())
                    .collect()
            };
            if json {
                let rows: Vec<serde_json::Value> = list
                    .iter()
                    .map(|b| {
                        let mut v = serde_json::to_value(b).expect("plain data");
                        v["current"] = (b.name == shown).into();
                        v["bound"] = bound(&b.name).into();
                        v
                    })
                    .collect();
                outln!("{}", serde_json::Value::Array(rows))?;
            } else {
                outln!(
                    "  {:<20} {:<20} {:<20} BOUND",
                    "NAME",
                    "FROM",
                    "CREATED (UTC)"
                )?;
                for b in &list {
                    let pids: Vec<String> = bound(&b.name).iter().map(|p| p.to_string()).collect();
                    outln!(
                        "{} {:<20} {:<20} {:<20} {}",
                        if b.name == shown { '*' } else { ' ' },
                        b.name,
                        b.from.as_deref().unwrap_or("-"),
                        iso8601_secs(b.created),
                        if pids.is_empty() {
                            "-".into()
                        } else {
                            pids.join(",")
                        }
                    )?;
                }
            }
        }
        BranchCommand::Exec { .. } => unreachable!("handled above"),
    }
    Ok(())
}

/// Fails unless the mount answers within [`MOUNT_ANSWER_LIMIT`] (asked
/// from a child: a hung mount must not hang us).
fn check_answers(mountpoint: &Path) -> Result<(), Failure> {
    let probe = crate::state::Probe::start(mountpoint, false, None);
    match probe.finish(Instant::now() + MOUNT_ANSWER_LIMIT).0 {
        crate::state::Health::Hung => Err(failure(format!(
            "{}: no answer within {}s (is the mount hung?)",
            mountpoint.display(),
            MOUNT_ANSWER_LIMIT.as_secs()
        ))),
        _ => Ok(()),
    }
}

/// `snapshot export`: this process is bound to a scratch branch made from
/// the snapshot, so the mount shows it the snapshot; the image is built from
/// there, and the branch goes again.
fn export(
    mountpoint: &Path,
    name: &str,
    image: &str,
    replace: bool,
    store: &Path,
) -> Result<(), Failure> {
    check_answers(mountpoint)?;
    let m = Mounted::open(mountpoint)?;
    let me = std::process::id();
    let scratch = format!("export-{me}");
    m.set("branch.create", &format!("{scratch} {name}"))?;
    let built = m
        .set("branch.bind", &format!("{scratch} {me}"))
        .and_then(|()| crate::image_cmd::build(mountpoint, image, replace, store));
    let unbound = m.set("branch.unbind", &me.to_string());
    let removed = m.set("branch.rm", &scratch);
    built.and(unbound).and(removed)
}

/// `branch exec`: binds this process to the branch, then becomes the
/// command (same pid, so the binding holds; its children inherit it).
fn exec(mountpoint: &Path, name: &str, command: &[OsString]) -> Result<(), Failure> {
    check_answers(mountpoint)?;
    let m = Mounted::open(mountpoint)?;
    m.set("branch.bind", &format!("{name} {}", std::process::id()))?;
    // A working directory inside the mount was entered through the branch
    // seen before: enter it again through this one.
    if let Ok(cwd) = std::env::current_dir()
        && cwd.starts_with(mountpoint)
    {
        let _ = std::env::set_current_dir(&cwd);
    }
    let (prog, args) = command.split_first().expect("clap requires a command");
    let e = std::process::Command::new(prog).args(args).exec();
    Err(failure(format!("{}: {e}", Path::new(prog).display())))
}
