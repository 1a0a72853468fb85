#!/usr/bin/env bash
# Install the arm64 cross linker kiln's `arm64` target links with (Debian/Ubuntu).
# Idempotent: does nothing when aarch64-linux-gnu-gcc is already on PATH.
# Needs root (or sudo); prints what to run and exits 0 where it cannot install,
# so `make setup` still works on machines that never build for arm64.
set -euo pipefail

if command -v aarch64-linux-gnu-gcc >/dev/null 2>&1; then
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
        echo "install_cross: run 'apt-get install gcc-aarch64-linux-gnu' as root to build for arm64" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends \
        gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null; }; then
    echo "install_cross: apt-get could not install gcc-aarch64-linux-gnu; arm64 builds will say so" >&2
    exit 0
fi
command -v aarch64-linux-gnu-gcc
