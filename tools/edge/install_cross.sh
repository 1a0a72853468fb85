#!/usr/bin/env bash
# Install the arm64 cross toolchain kiln's `arm64` target links (and strips) with, on
# Debian/Ubuntu: the apt packages gcc-aarch64-linux-gnu and libc6-dev-arm64-cross
# (binutils-aarch64-linux-gnu, with aarch64-linux-gnu-strip, comes with the first).
# Idempotent: does nothing when aarch64-linux-gnu-gcc is already on PATH.
# Says what it installs before it runs apt-get; skips with a message (exit 0) without
# root or password-less sudo, without apt-get, or with KILN_NO_APT=1, so `make setup`
# still works on machines that never build for arm64.
set -euo pipefail

PACKAGES="gcc-aarch64-linux-gnu libc6-dev-arm64-cross"

if command -v aarch64-linux-gnu-gcc >/dev/null 2>&1; then
    exit 0
fi
if [ "${KILN_NO_APT:-0}" = "1" ]; then
    echo "install_cross: KILN_NO_APT=1: not installing $PACKAGES (arm64 builds will say what is missing)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_cross: no apt-get; install an aarch64-linux-gnu gcc to build for arm64" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_cross: skipped (not root, no password-less sudo); to build for arm64 run:" >&2
        echo "    sudo apt-get install $PACKAGES" >&2
        exit 0
    fi
fi
echo "install_cross: installing the arm64 cross toolchain with ${SUDO:+sudo }apt-get: $PACKAGES" \
     "(KILN_NO_APT=1 skips this)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends \
        $PACKAGES >/dev/null; }; then
    echo "install_cross: apt-get could not install $PACKAGES; arm64 builds will say so" >&2
    exit 0
fi
command -v aarch64-linux-gnu-gcc || \
    echo "install_cross: apt-get ran, but aarch64-linux-gnu-gcc is not on PATH" >&2
