#!/usr/bin/env bash
# Installs strata where mount(8) and systemd look for it: the binary in
# /usr/local/bin (mount(8) runs helpers with a fixed PATH, so `mount -t
# fuse.strata` and fstab lines find it there) and the unit template
# strata@.service in /etc/systemd/system. `--uninstall` removes both.
# PREFIX (default /usr/local) and UNITDIR (default /etc/systemd/system)
# override the places.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$HOME/.cargo/bin:$PATH
prefix=${PREFIX:-/usr/local}
unitdir=${UNITDIR:-/etc/systemd/system}
bin=$prefix/bin/strata unit=$unitdir/strata@.service

if [[ ${1:-} == --uninstall ]]; then
    rm -f "$bin" "$unit"
    echo "removed $bin $unit"
    exit 0
fi
cargo build --release --quiet -p strata
install -D -m 755 target/release/strata "$bin"
install -D -m 644 dist/strata@.service "$unit"
echo "installed $bin $unit"
