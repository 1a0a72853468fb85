#!/usr/bin/env bash
# Install the arm64 cross toolchain kiln's `arm64` target links (and strips) with, on
# Debian/Ubuntu: the apt packages gcc-aarch64-linux-gnu and libc6-dev-arm64-cross
# (binutils-aarch64-linux-gnu, with aarch64-linux-gnu-strip, comes with the first).
# Idempotent; skips with a message without root, apt-get, or with KILN_NO_APT=1
# (tools/apt_install.sh), so `make setup` still works on machines that never build for arm64.
set -euo pipefail
here=${BASH_SOURCE[0]%/*}
exec "$BASH" "$here/../apt_install.sh" install_cross aarch64-linux-gnu-gcc \
    "gcc-aarch64-linux-gnu libc6-dev-arm64-cross" "the arm64 cross toolchain" "arm64 builds"
