#!/usr/bin/env bash
# Everything: formatting, lints, unit tests, mounted integration tests, and
# pjdfstest in each mode. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export PATH=$HOME/.cargo/bin:$PATH

leftover_mounts() { grep ' - fuse.strata ' /proc/self/mountinfo | grep -E ' /tmp/(strata-test|strata-pjdfstest)' || true; }

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --profile ci
else
    cargo test --workspace
fi

./scripts/pjdfstest.sh
./scripts/pjdfstest.sh -o passthrough=false
./scripts/pjdfstest.sh --union
./scripts/pjdfstest.sh --overlay
./scripts/pjdfstest.sh --image

left=$(leftover_mounts)
if [[ -n $left ]]; then
    echo "leftover mounts after the tests:" >&2
    echo "$left" >&2
    exit 1
fi
echo "all tests passed"
