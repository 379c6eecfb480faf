#!/usr/bin/env bash
# Build an aarch64 sysroot in which `qemu-aarch64` runs Python + the TVM runtime, so
# onnxc's ARM artifacts can really be executed on this x86 machine.
#
#   tools/build_arm_sysroot.sh [DIR]     (default: ${ONNXC_ARM_SYSROOT:-~/.cache/onnxc/arm-sysroot})
#
# What it does (idempotent; a finished sysroot is marked by DIR/.complete):
#   1. Debian arm64 packages (python3.11 and the C/C++ runtime it needs), fetched with apt
#      into a private package-list directory, so the host's apt state is untouched, and
#      unpacked with `dpkg -x` into DIR.
#   2. The aarch64 manylinux wheels of apache-tvm, apache-tvm-ffi and the pure-Python/
#      numpy bits the runtime imports, fetched with pip and unzipped into DIR/site.
# Nothing downloaded here is committed: the sysroot lives in the user's cache.
set -euo pipefail

DIR="${1:-${ONNXC_ARM_SYSROOT:-$HOME/.cache/onnxc/arm-sysroot}}"
PY="${PYTHON:-python3}"
TVM_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("apache-tvm"))' 2>/dev/null || echo 0.27.0.post1)"
FFI_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))' 2>/dev/null || echo 0.1.14.post0)"
NUMPY_VERSION="$("$PY" -c 'import numpy; print(numpy.__version__)' 2>/dev/null || echo 2.2.6)"

if [ -f "$DIR/.complete" ]; then
    echo "arm sysroot ready: $DIR"
    exit 0
fi
mkdir -p "$DIR"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/onnxc-arm-sysroot.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# --- 1. Debian arm64 packages --------------------------------------------------------
# A private apt state (lists + cache) for the arm64 architecture only.
mkdir -p "$WORK/lists/partial" "$WORK/archives/partial" "$WORK/debs"
APT_OPTS=(-oAPT::Architecture=arm64 -oAPT::Architectures=arm64
          "-oDir::State::Lists=$WORK/lists" "-oDir::Cache::Archives=$WORK/archives"
          "-oDir::State::Status=/dev/null" -oAPT::Sandbox::User=root -qq)
apt-get "${APT_OPTS[@]}" update
# Python 3.11 itself and the shared libraries TVM's runtime and numpy's wheel link to.
DEBS=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libstdc++6
      libgcc-s1 zlib1g libexpat1 libffi8 libbz2-1.0 liblzma5 libssl3 libsqlite3-0
      libuuid1 libncursesw6 libtinfo6 libreadline8 libdb5.3 libgomp1 libcrypt1 media-types
      libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0
      libcom-err2 libkeyutils1)
(cd "$WORK/debs" && apt-get "${APT_OPTS[@]}" download "${DEBS[@]}")
for deb in "$WORK"/debs/*.deb; do
    dpkg -x "$deb" "$DIR"
done
# Debian's aarch64 loader lives at /lib/ld-linux-aarch64.so.1 -> usr/lib/...; make sure
# the merged-/usr symlinks exist the way the loader and qemu's -L lookup expect.
for d in lib bin sbin; do
    if [ ! -e "$DIR/$d" ] && [ -d "$DIR/usr/$d" ]; then ln -s "usr/$d" "$DIR/$d"; fi
done

# --- 2. aarch64 wheels -----------------------------------------------------------------
mkdir -p "$WORK/wheels" "$DIR/site"
"$PY" -m pip download -q --only-binary=:all: --no-deps --python-version 3.11 \
    --implementation cp --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
    --platform manylinux_2_27_aarch64 --platform manylinux_2_28_aarch64 \
    -d "$WORK/wheels" \
    "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION" "numpy==$NUMPY_VERSION" \
    ml_dtypes typing_extensions
for whl in "$WORK"/wheels/*.whl; do
    "$PY" -m zipfile -e "$whl" "$DIR/site"
done

touch "$DIR/.complete"
echo "arm sysroot ready: $DIR"
