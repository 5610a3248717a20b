#!/usr/bin/env bash
# Builds strata and mounts a demo: the host's /usr/share (or SOURCE) at
# /tmp/strata-demo (or MOUNTPOINT), read-only, in the background.
#   ./scripts/demo.sh [SOURCE [MOUNTPOINT]]
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-/usr/share}
mnt=${2:-/tmp/strata-demo}
./scripts/install-deps.sh >/dev/null
cargo build --release -p strata
# Where mount(8) and systemd find it (fstab, mount -t fuse.strata).
./scripts/install.sh
strata=target/release/strata
mkdir -p "$mnt"
# mountinfo: "... MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE ..."
if grep -qs " $mnt .* - fuse.strata " /proc/self/mountinfo; then
    "$strata" umount "$mnt"
fi
"$strata" mount -o ro "$src" "$mnt"
"$strata" status
echo
echo "$src is mounted read-only at $mnt:"
ls "$mnt" | head -n 12
echo "..."
echo
echo "Try: ls -al $mnt/doc | head; $strata status --json"
echo "Unmount with: $strata umount $mnt"
