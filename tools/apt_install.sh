#!/usr/bin/env bash
# apt_install.sh LABEL PROBE "PACKAGES" "WHAT" "WHAT FOR": install Debian/Ubuntu packages kiln's
# optional features use, for `make setup`. Idempotent: does nothing when the command PROBE is
# already on PATH. Says what it installs before it runs apt-get; skips with a message
# (exit 0) without root or password-less sudo, without apt-get, or with KILN_NO_APT=1, so
# `make setup` works on machines that never need the feature.
set -euo pipefail
LABEL=$1 PROBE=$2 PACKAGES=$3 WHAT=$4 PURPOSE=$5

if command -v "$PROBE" >/dev/null 2>&1; then
    exit 0
fi
if [ "${KILN_NO_APT:-0}" = "1" ]; then
    echo "$LABEL: KILN_NO_APT=1: not installing $PACKAGES ($PURPOSE will say what is missing)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "$LABEL: no apt-get; install $PACKAGES for $PURPOSE" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "$LABEL: skipped (not root, no password-less sudo); for $PURPOSE run:" >&2
        echo "    sudo apt-get install $PACKAGES" >&2
        exit 0
    fi
fi
echo "$LABEL: installing $WHAT with ${SUDO:+sudo }apt-get: $PACKAGES" \
     "(KILN_NO_APT=1 skips this)" >&2
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends \
        $PACKAGES >/dev/null; }; then
    echo "$LABEL: apt-get could not install $PACKAGES; $PURPOSE will say so" >&2
    exit 0
fi
command -v "$PROBE" >/dev/null || \
    echo "$LABEL: apt-get ran, but $PROBE is not on PATH" >&2
