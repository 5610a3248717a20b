#!/usr/bin/env bash
# Runs each fuzz target for a bounded time (default 40 s each; FUZZ_SECONDS
# overrides). libFuzzer through libfuzzer-sys on the stable toolchain: the
# coverage instrumentation is plain -C flags, applied to the target crates
# only (--target keeps them off build scripts). A crash fails the run and
# leaves its input in target/fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$HOME/.cargo/bin:$PATH
seconds=${FUZZ_SECONDS:-40}
triple=$(rustc -vV | sed -n 's/^host: //p')
out=target/fuzz
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo build --quiet --release --manifest-path fuzz/Cargo.toml --target "$triple" --target-dir "$out"
unset RUSTFLAGS

# Seeds: manifests of a small tree with every kind of entry, built by strata.
cargo build --quiet -p strata
work=$(mktemp -d /tmp/strata-fuzz.XXXXXX)
trap 'rm -rf "$work"' EXIT
src=$work/src
mkdir -p "$src/dir/sub" "$work/corpus/manifest" "$out/artifacts"
echo content > "$src/dir/file"
ln "$src/dir/file" "$src/dir/sub/link"
ln -s ../../elsewhere "$src/dir/symlink"
mkfifo "$src/fifo"
python3 -c "import os; os.setxattr('$src/dir/file', 'user.k', b'v')" 2>/dev/null || true
for i in 1 2 3; do touch "$src/dir/sub/f$i"; done
target/debug/strata image build "$src" --name seed --store "$work/store" >/dev/null
target/debug/strata image build "$src/dir" --name seed2 --store "$work/store" >/dev/null
cp "$work/store/images/seed" "$work/store/images/seed2" "$work/corpus/manifest/"
# Seeds for the archive reader: the same tree as tar, tar.gz, tar.zst,
# tar.xz and zip.
mkdir -p "$work/corpus/archive"
rm "$src/fifo"
tar -C "$src" -cf "$work/corpus/archive/seed.tar" .
gzip -kc "$work/corpus/archive/seed.tar" > "$work/corpus/archive/seed.tar.gz"
zstd -q -c "$work/corpus/archive/seed.tar" > "$work/corpus/archive/seed.tar.zst"
xz -kc "$work/corpus/archive/seed.tar" > "$work/corpus/archive/seed.tar.xz"
(cd "$src" && zip -qry "$work/corpus/archive/seed.zip" .)
# Seed for the kept archive index (format in crates/strata-archive/src/persist.rs),
# without its checksum (the target seals what it is given): a root and one file.
mkdir -p "$work/corpus/archive_index"
python3 - "$work/corpus/archive_index/seed" <<'PY'
import struct, sys
def member(name, parent, kind, perm, nlink, tag, children):
    b = struct.pack("<I", len(name)) + name + struct.pack("<IBIIIqQII", parent, kind, perm, 0, 0, 0, 5, 0, 0)
    b += struct.pack("<I", 0) + struct.pack("<II", 1 if kind == 1 else 0, nlink)
    b += struct.pack("<BQ", tag, 512 if tag else 0) + struct.pack("<I", len(children))
    return b + b"".join(struct.pack("<I", c) for c in children)
body = b"STRATAIX" + struct.pack("<IBII", 1, 1, 2, 0)
body += member(b"", 0, 2, 0o755, 2, 0, [1]) + member(b"file", 0, 1, 0o644, 1, 1, [])
open(sys.argv[1], "wb").write(body)
PY
# Seeds for the view spec parser: the example of docs/VIEWS.md and a small one.
mkdir -p "$work/corpus/view_spec"
sed -n '/^```toml$/,/^```$/p' docs/VIEWS.md | sed '1d;$d' > "$work/corpus/view_spec/example.toml"
printf '[sources]\ntmp = "/tmp"\n[[map]]\npath = "a/b"\nfrom = "tmp:."\ninclude = ["*.x"]\nrename = ["A:B"]\n' \
    > "$work/corpus/view_spec/small.toml"

for t in manifest archive archive_index view_spec; do
    echo "fuzz: $t for ${seconds}s"
    "$out/$triple/release/$t" -max_total_time="$seconds" -max_len=16384 \
        -artifact_prefix="$out/artifacts/$t-" -print_final_stats=1 \
        "$work/corpus/$t" 2>"$work/$t.log" || { tail -40 "$work/$t.log" >&2; echo "fuzz: $t failed" >&2; exit 1; }
    grep -E '^stat::number_of_executed_units' "$work/$t.log" | sed "s/^/fuzz: $t /"
done
