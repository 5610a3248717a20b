#!/usr/bin/env bash
# Installs what a fresh machine lacks for running and testing strata. Idempotent and quick when all is there.
set -euo pipefail
export PATH=$HOME/.cargo/bin:$PATH
need_apt=()
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
command -v setpriv >/dev/null || need_apt+=(util-linux)
command -v flock >/dev/null || need_apt+=(util-linux)
command -v python3 >/dev/null || need_apt+=(python3)
command -v mergerfs >/dev/null || need_apt+=(mergerfs)
# libFuzzer (scripts/fuzz.sh) is C++, built by libfuzzer-sys.
command -v c++ >/dev/null || need_apt+=(g++)
# Archives the archive tests and fuzz seeds build.
command -v zip >/dev/null || need_apt+=(zip)
command -v zstd >/dev/null || need_apt+=(zstd)
command -v xz >/dev/null || need_apt+=(xz-utils)
# A local S3 server for the remote-store tests (moto, with boto3).
command -v moto_server >/dev/null || command -v pip3 >/dev/null || need_apt+=(python3-pip)
if ((${#need_apt[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
[[ -e /dev/fuse ]] || { modprobe fuse 2>/dev/null || true; }
# Debian's Python is "externally managed": moto goes into it all the same.
command -v moto_server >/dev/null || pip3 install -q --break-system-packages 'moto[server]'

command -v pjdfstest >/dev/null || cargo install pjdfstest --locked
# Users pjdfstest switches to.
getent group nogroup >/dev/null || groupadd nogroup
id nobody >/dev/null 2>&1 || useradd -M -g nogroup -s /usr/sbin/nologin nobody
getent group tests >/dev/null || groupadd tests
id tests >/dev/null 2>&1 || useradd -M -g tests -s /usr/sbin/nologin tests
