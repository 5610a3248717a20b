#!/usr/bin/env bash
# Everything: formatting, lints, unit tests, mounted integration tests, and
# pjdfstest in each mode. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export PATH=$HOME/.cargo/bin:$PATH

leftover_mounts() { grep ' - fuse.strata ' /proc/self/mountinfo | grep -E ' /tmp/(strata-test|strata-pjdfstest)' || true; }

# FUSE over io_uring (Linux 6.14+) is off unless the fuse module's
# enable_uring is set. Mounts take it when offered, so the suite runs with it
# on; the `uring=false` pjdfstest pass covers /dev/fuse. Restored on exit.
uring_param=/sys/module/fuse/parameters/enable_uring
if [[ -w $uring_param ]]; then
    uring_before=$(cat "$uring_param")
    trap 'echo "$uring_before" > "$uring_param"' EXIT
    echo Y > "$uring_param"
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --profile ci
else
    cargo test --workspace
fi
# The vendored fuser fork (FUSE over io_uring) is outside the workspace.
cargo test --manifest-path vendor/fuser/Cargo.toml --lib

./scripts/pjdfstest.sh
./scripts/pjdfstest.sh -o passthrough=false
./scripts/pjdfstest.sh -o uring=false
./scripts/pjdfstest.sh --union
./scripts/pjdfstest.sh --overlay
./scripts/pjdfstest.sh --image
./scripts/pjdfstest.sh --view
./scripts/pjdfstest.sh --snapshots
./scripts/pjdfstest.sh --branch

# The image manifest, archive and view spec readers under libFuzzer, bounded
# (FUZZ_SECONDS each, default 40).
./scripts/fuzz.sh

left=$(leftover_mounts)
if [[ -n $left ]]; then
    echo "leftover mounts after the tests:" >&2
    echo "$left" >&2
    exit 1
fi
echo "all tests passed"
