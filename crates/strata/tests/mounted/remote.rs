//! Images through an S3-compatible bucket: `strata image push` and `pull`
//! against a local moto server (the AWS conventions for endpoint, region and
//! credentials; nothing reaches the network).

use std::fs;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::common::*;

/// A moto S3 server on a free local port, stopped on drop.
struct Moto {
    child: Child,
    url: String,
}

impl Moto {
    fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (scripts/install-deps.sh installs moto[server])");
        let up = wait_until(Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let m = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        assert!(up, "moto_server did not listen within 30 s");
        m
    }

    /// Runs boto3 `script` (with `s3`, a client of this server) in python3.
    fn boto(&self, script: &str) {
        let prog = format!(
            "import boto3\ns3 = boto3.client('s3', endpoint_url='{}', aws_access_key_id='test', \
             aws_secret_access_key='test', region_name='us-east-1')\n{script}",
            self.url
        );
        let out = output_with_timeout(
            Command::new("python3").args(["-c", &prog]),
            Duration::from_secs(60),
        )
        .expect("boto3 script timed out");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `strata ARGS` with the store `store` and AWS settings for `moto`
/// (none from the machine's own ~/.aws), killed after a minute.
fn run(moto: &Moto, store: &Path, endpoint_in_env: bool, args: &[&str]) -> Output {
    let mut cmd = Command::new(STRATA);
    cmd.args(args)
        .env("STRATA_STORE", store)
        .envs(aws_env(moto))
        .env_remove("AWS_PROFILE");
    if !endpoint_in_env {
        cmd.env_remove("AWS_ENDPOINT_URL");
    }
    output_with_timeout(&mut cmd, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("strata {args:?} did not finish within 60 s"))
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(out: Output, code: i32, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(what), "{err}");
}

/// A moto server with bucket `envs`, and a store holding image `name`
/// built from `files` (path, content).
fn bucket_and_image(name: &str, files: &[(&str, Vec<u8>)]) -> (Moto, ImageScratch) {
    let moto = Moto::start();
    moto.boto("s3.create_bucket(Bucket='envs')");
    let here = ImageScratch::new();
    let src = here.path("src");
    for (path, content) in files {
        let p = src.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }
    fs::create_dir_all(&src).unwrap();
    here.build(&src, name);
    (moto, here)
}

/// The AWS settings for `moto`, none from the machine's own ~/.aws.
fn aws_env(moto: &Moto) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_CONFIG_FILE", "/nonexistent".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_ENDPOINT_URL", moto.url.clone()),
    ]
}

const TOOL: &str = "#!/bin/sh\necho tool\n";

#[test]
fn an_image_goes_through_a_bucket_and_mounts_on_the_other_side() {
    let (moto, here) = bucket_and_image(
        "env",
        &[
            ("bin/tool", TOOL.into()),
            ("data", vec![7u8; 300_000]),
            ("same", vec![7u8; 300_000]),
        ],
    );

    let pushed = ok(run(
        &moto,
        &here.store(),
        true,
        &["image", "push", "env", "s3://envs/team"],
    ));
    assert!(pushed.contains("2 blobs, 2 uploaded"), "{pushed}");
    // Again: the bucket has every blob.
    let again = ok(run(
        &moto,
        &here.store(),
        true,
        &["image", "push", "env", "s3://envs/team"],
    ));
    assert!(again.contains("2 blobs, 0 uploaded"), "{again}");

    // Another machine: an empty store, the endpoint given on the command line.
    let there = ImageScratch::new();
    let url = moto.url.clone();
    let pulled = ok(run(
        &moto,
        &there.store(),
        false,
        &["image", "pull", "env", "s3://envs/team", "--endpoint", &url],
    ));
    assert!(pulled.contains("2 blobs fetched"), "{pulled}");
    let m = there.mount("image:env", false, &[]);
    assert_eq!(fs::read_to_string(m.m("bin/tool")).unwrap(), TOOL);
    assert_eq!(fs::read(m.m("same")).unwrap(), vec![7u8; 300_000]);
    drop(m);
    // Pulled again over itself: nothing to fetch.
    let over = ok(run(
        &moto,
        &there.store(),
        true,
        &["image", "pull", "env", "s3://envs/team", "--replace"],
    ));
    assert!(
        over.contains("0 blobs fetched") && over.contains("2 already here"),
        "{over}"
    );
    // Without --replace, an image of that name is not overwritten.
    fails(
        run(
            &moto,
            &there.store(),
            true,
            &["image", "pull", "env", "s3://envs/team"],
        ),
        2,
        "already exists",
    );
}

#[test]
fn a_bad_bucket_a_corrupt_blob_or_a_missing_image_changes_nothing() {
    let (moto, here) = bucket_and_image("env", &[("f", b"content of f".to_vec())]);
    ok(run(
        &moto,
        &here.store(),
        true,
        &["image", "push", "env", "s3://envs"],
    ));
    let hex = here
        .blob(b"content of f")
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    // Someone replaced the blob in the bucket.
    moto.boto(&format!(
        "s3.put_object(Bucket='envs', Key='blobs/{}/{hex}', Body=b'STRB not a blob')",
        &hex[..2]
    ));
    let there = ImageScratch::new();
    fails(
        run(
            &moto,
            &there.store(),
            true,
            &["image", "pull", "env", "s3://envs"],
        ),
        1,
        &hex,
    );
    let listed = ok(run(&moto, &there.store(), true, &["image", "ls"]));
    assert!(!listed.contains("env"), "{listed}");
    fails(
        run(
            &moto,
            &there.store(),
            true,
            &["image", "pull", "nope", "s3://envs"],
        ),
        2,
        "no image named \"nope\"",
    );
    fails(
        run(
            &moto,
            &here.store(),
            true,
            &["image", "push", "env", "envs/x"],
        ),
        2,
        "s3://BUCKET",
    );
    fails(
        run(
            &moto,
            &here.store(),
            true,
            &["image", "push", "nope", "s3://envs"],
        ),
        2,
        "no image named",
    );
    // Mount options naming a remote badly, or without an image to fetch.
    let mnt = there.path("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let src = there.path("plain");
    let up = there.path("up");
    fs::create_dir_all(&src).unwrap();
    fs::create_dir_all(&up).unwrap();
    let no_image = format!("remote=s3://envs,upper={}", up.display());
    for (source, opts, what) in [
        ("image:env", "remote=http://envs", "option 'remote'"),
        ("image:env", "remote=s3://E", "option 'remote'"),
        (
            src.to_str().unwrap(),
            no_image.as_str(),
            "SOURCE has no image:NAME",
        ),
        (
            "image:env",
            "remote.endpoint=http://127.0.0.1:1",
            "remote.endpoint",
        ),
    ] {
        let out = run(
            &moto,
            &there.store(),
            true,
            &["mount", source, mnt.to_str().unwrap(), "-o", opts],
        );
        fails(out, 2, what);
        assert!(!is_mounted(&mnt));
    }
    // A bucket that does not exist: one line, exit 1.
    fails(
        run(
            &moto,
            &here.store(),
            true,
            &["image", "push", "env", "s3://missing-bucket"],
        ),
        1,
        "s3://missing-bucket",
    );
    // Nothing listens there: it fails, and soon.
    let start = std::time::Instant::now();
    fails(
        run(
            &moto,
            &here.store(),
            false,
            &[
                "image",
                "push",
                "env",
                "s3://envs",
                "--endpoint",
                "http://127.0.0.1:1",
            ],
        ),
        1,
        "s3://envs",
    );
    assert!(start.elapsed() < Duration::from_secs(45));
}

/// Blob files in the store at `store`.
fn blobs_in(store: &Path) -> usize {
    walk(&store.join("blobs"), Detail::default())
        .objs
        .values()
        .filter(|o| o.kind == 'f')
        .count()
}

#[test]
fn a_mount_with_a_remote_fetches_the_manifest_at_once_and_each_file_when_first_read() {
    let (moto, here) = bucket_and_image(
        "env",
        &[("bin/tool", TOOL.into()), ("data", vec![9u8; 200_000])],
    );
    ok(run(
        &moto,
        &here.store(),
        true,
        &["image", "push", "env", "s3://envs/team"],
    ));

    let there = ImageScratch::new();
    let env = aws_env(&moto);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let store = there.store();
    let opts = [
        format!("store={}", store.display()),
        "remote=s3://envs/team".to_string(),
    ];
    let m = Mounted::build_with(&[], &env, move |_| ("image:env".to_string(), opts.to_vec()));
    // Mounted: the manifest is here, no blob yet.
    assert!(store.join("images/env").is_file());
    assert_eq!(blobs_in(&store), 0);
    assert_eq!(fs::read_dir(m.m("")).unwrap().count(), 2);
    assert_eq!(blobs_in(&store), 0);
    // Each file's blob comes when it is first read, checked, and stays.
    assert_eq!(fs::read_to_string(m.m("bin/tool")).unwrap(), TOOL);
    assert_eq!(blobs_in(&store), 1);
    assert_eq!(fs::read(m.m("data")).unwrap(), vec![9u8; 200_000]);
    assert_eq!(blobs_in(&store), 2);
    drop(m);

    // An image the bucket does not have: the mount is refused, one line.
    fs::create_dir_all(there.path("mnt-none")).unwrap();
    let out = output_with_timeout(
        Command::new(STRATA)
            .args([
                "mount",
                "image:nope",
                there.path("mnt-none").to_str().unwrap(),
            ])
            .arg("-o")
            .arg(format!("store={},remote=s3://envs/team", store.display()))
            .envs(env.iter().copied())
            .env("STRATA_STATE_DIR", there.path("state")),
        Duration::from_secs(60),
    )
    .unwrap();
    fails(out, 2, "image:nope");
}

#[test]
fn a_pull_of_many_blobs_fetches_ahead_and_keeps_each_one_right() {
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            (
                format!("f{i:02}"),
                format!(
                    "file number {i}
"
                )
                .repeat(i + 1)
                .into_bytes(),
            )
        })
        .collect();
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(p, c)| (p.as_str(), c.clone())).collect();
    let (moto, here) = bucket_and_image("many", &files);
    ok(run(
        &moto,
        &here.store(),
        true,
        &["image", "push", "many", "s3://envs"],
    ));
    let there = ImageScratch::new();
    let pulled = ok(run(
        &moto,
        &there.store(),
        true,
        &["image", "pull", "many", "s3://envs"],
    ));
    assert!(pulled.contains("40 blobs fetched"), "{pulled}");
    let out = there.ok(&["image", "verify", "many"]);
    assert!(
        !out.contains("corrupt") && !out.contains("missing"),
        "{out}"
    );
    let m = there.mount("image:many", false, &[]);
    for i in 0..40 {
        assert_eq!(
            fs::read_to_string(m.m(&format!("f{i:02}"))).unwrap(),
            format!("file number {i}\n").repeat(i + 1)
        );
    }
}

#[test]
fn a_lazy_image_under_an_upper_takes_writes_snapshots_and_branches() {
    let (moto, here) = bucket_and_image(
        "env",
        &[
            ("lib/a.py", b"A = 1\n".to_vec()),
            ("lib/b.py", b"B = 2\n".to_vec()),
        ],
    );
    ok(run(
        &moto,
        &here.store(),
        true,
        &["image", "push", "env", "s3://envs"],
    ));
    let there = ImageScratch::new();
    let env = aws_env(&moto);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let store = there.store();
    let opts = vec![
        format!("store={}", store.display()),
        "remote=s3://envs".to_string(),
    ];
    let m = Mounted::build_with(&[], &env, move |dir| {
        let up = dir.join("upper");
        fs::create_dir(&up).unwrap();
        let mut o = opts.clone();
        o.push(format!("upper={}", up.display()));
        ("image:env".to_string(), o)
    });
    let mnt = m.mnt.to_str().unwrap().to_string();
    let state = m.dir.path().join("state");
    let cli = |args: &[&str]| {
        let out = output_with_timeout(
            Command::new(STRATA)
                .args(args)
                .env("STRATA_STATE_DIR", &state),
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // A write copies a.py up (fetching its blob); b.py is not read yet.
    fs::write(m.m("lib/a.py"), "A = 10\n").unwrap();
    assert_eq!(blobs_in(&store), 1);
    cli(&["snapshot", "create", &mnt, "--name", "s1"]);
    cli(&["branch", "create", &mnt, "--from", "s1", "--name", "b"]);
    let seen = cli(&[
        "branch",
        "exec",
        &mnt,
        "b",
        "--",
        "cat",
        &format!("{mnt}/lib/a.py"),
        &format!("{mnt}/lib/b.py"),
    ]);
    assert_eq!(seen, "A = 10\nB = 2\n");
    // b.py was read in the branch: its blob came then.
    assert_eq!(blobs_in(&store), 2);
    assert_eq!(cli(&["snapshot", "diff", &mnt, "s1", "b"]), "");
}
