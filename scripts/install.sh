#!/usr/bin/env bash
# Installs strata where mount(8) and systemd look for it: the binary in
# /usr/local/bin (mount(8) runs helpers with a fixed PATH, so `mount -t
# fuse.strata` and fstab lines find it there) and the unit template
# strata@.service in /etc/systemd/system, the man pages (generated from the
# same definitions as --help) in /usr/local/share/man/man1. `--uninstall`
# removes them.
# PREFIX (default /usr/local) and UNITDIR (default /etc/systemd/system)
# override the places.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$HOME/.cargo/bin:$PATH
prefix=${PREFIX:-/usr/local}
unitdir=${UNITDIR:-/etc/systemd/system}
bin=$prefix/bin/strata unit=$unitdir/strata@.service mandir=$prefix/share/man/man1

if [[ ${1:-} == --uninstall ]]; then
    rm -f "$bin" "$unit" "$mandir"/strata.1 "$mandir"/strata-*.1
    echo "removed $bin $unit $mandir/strata*.1"
    exit 0
fi
cargo build --release --quiet -p strata
install -D -m 755 target/release/strata "$bin"
install -D -m 644 dist/strata@.service "$unit"
"$bin" man "$mandir"
echo "installed $bin $unit $mandir/strata*.1"
