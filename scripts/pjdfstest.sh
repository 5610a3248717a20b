#!/usr/bin/env bash
# Runs the POSIX suite (pjdfstest, Rust port) against `strata mount` of a scratch
# directory. Exits non-zero on any failure; the mount is removed on every exit path.
# `--union` mounts a 3-branch union instead: the scratch dir (RW), an empty NC
# branch and a read-only branch with content. `--overlay` mounts a lower
# directory with content with the scratch dir as its upper; `--image` the same
# with an image (built into a scratch store) as the lower; `--view` with a
# view (a spec mapping that lower and a zip of it) as the lower.
# `--snapshots` is `--overlay` after three snapshots of the mount (the lower
# content then sits below frozen layers); `--branch` runs the suite inside a
# branch made from such a snapshot, through `strata branch exec`. Other
# arguments go to `strata mount`.
set -euo pipefail

STRATA=${STRATA:-$(cd "$(dirname "$0")/.." && pwd)/target/debug/strata}
work=$(mktemp -d /tmp/strata-pjdfstest.XXXXXX)
src=$work/src mnt=$work/mnt second=/dev/shm/strata-pjdfstest-$$
# Other users must reach the mount (pjdfstest switches to nobody and tests).
chmod 755 "$work"
mkdir -p "$src" "$mnt" "$second"
export STRATA_STATE_DIR=$work/state

cleanup() {
    cd /
    if grep -qs " $mnt " /proc/self/mountinfo; then
        timeout 20 "$STRATA" umount "$mnt" || umount -l "$mnt" || true
    fi
    rm -rf "$work" "$second"
}
trap cleanup EXIT

getent group tests >/dev/null || groupadd tests
id tests >/dev/null 2>&1 || useradd -M -g tests -s /usr/sbin/nologin tests

cat > "$work/pjdfstest.toml" <<'TOML'
[features]
posix_fallocate = {}
utime_now = {}
utimensat = {}
rename_ctime = {}

[settings]
naptime = 0.01
allow_remount = false
# None: every test must pass.
expected_failures = []

[dummy_auth]
entries = [
  ["nobody", "nogroup"],
  ["tests", "tests"],
]
TOML

source=$src label=""
if [[ ${1:-} == --union ]]; then
    shift
    mkdir -p "$work/nc" "$work/ro/shared"
    echo "lower" > "$work/ro/shared/file"
    source="$src:$work/nc=NC:$work/ro=RO"
    label=" on a union (RW, NC, RO)"
    set -- -o minfreespace=16M "$@"
elif [[ ${1:-} =~ ^--(overlay|image|view|snapshots|branch)$ ]]; then
    mode=$1
    shift
    lower=$work/lower
    mkdir -p "$lower/shared/dir"
    echo "lower" > "$lower/shared/file"
    ln -s file "$lower/shared/link"
    if [[ $mode == --image ]]; then
        export STRATA_STORE=$work/store
        "$STRATA" image build "$lower" --name pjdfstest-lower >/dev/null
        source=image:pjdfstest-lower
        label=" on an image with an upper"
    elif [[ $mode == --view ]]; then
        (cd "$lower" && zip -qry "$work/lower.zip" .)
        cat > "$work/view.toml" <<TOML
[sources]
lower = "$lower"
zipped = "$work/lower.zip"
[[map]]
path = ""
from = "lower"
[[map]]
path = "zipped"
from = "zipped"
TOML
        source=view:$work/view.toml
        label=" on a view (a directory and a zip) with an upper"
    else
        source=$lower
        label=" on a directory with an upper"
    fi
    [[ $mode == --snapshots ]] && label=" on a directory with an upper, after 3 snapshots"
    [[ $mode == --branch ]] && label=" in a branch (strata branch exec) of a directory with an upper"
    chmod 755 "$lower"
    set -- --upper "$src" "$@"
fi
timeout 20 "$STRATA" mount "$source" "$mnt" "$@"
run=()
if [[ ${mode:-} == --snapshots || ${mode:-} == --branch ]]; then
    # Content in each layer: the suite then works over frozen layers.
    for i in 1 2 3; do
        echo "layer $i" > "$mnt/shared/file"
        mkdir -p "$mnt/shared/dir$i"
        timeout 60 "$STRATA" snapshot create "$mnt" --name "s$i" >/dev/null
    done
    if [[ $mode == --branch ]]; then
        timeout 20 "$STRATA" branch create "$mnt" --from s2 --name suite
        run=("$STRATA" branch exec "$mnt" suite --)
    fi
fi
cd "$mnt"
# The secondary filesystem (tmpfs) enables the EXDEV cases.
timeout 900 "${run[@]}" pjdfstest -c "$work/pjdfstest.toml" -p "$mnt" -s "$second" > "$work/pjdfstest.log" 2>&1 || true
# Show everything but the passing lines (failures carry their reason on the next lines).
grep -v ' ok$' "$work/pjdfstest.log" | grep -v -A1 ' skipped$' | grep -v '^--$' || true
summary=$(grep '^Summary:' "$work/pjdfstest.log" || true)
echo "pjdfstest$label${*:+ ($*)}: ${summary:-no summary (crashed?)}"
[[ $summary =~ ^Summary:\ 0\ failed ]]
