#!/usr/bin/env bash
# Install Debian's Chromium for the test that renders report.html headless
# (tests/compiler/driver/test_report_html.py; it skips, naming what is missing, without it).
# Idempotent; skips with a message without root, apt-get, or with KILN_NO_APT=1.
set -euo pipefail
here=${BASH_SOURCE[0]%/*}
exec "$BASH" "$here/apt_install.sh" install_chromium chromium chromium "Chromium" \
    "the report.html rendering test"
