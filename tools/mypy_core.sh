#!/usr/bin/env bash
# mypy on kiln's core (compiler/core). The folders map to kiln.* only through the
# editable install's import hook, which mypy does not follow, so the check runs on a
# tree of symlinks, .lint/kiln/{compiler,passes,backends,specs} -> the real folders.
set -euo pipefail
cd "$(dirname "$0")/.."
MYPY="${MYPY:-.venv/bin/mypy}"
mkdir -p .lint/kiln
for d in compiler passes backends specs; do ln -sfn "../../$d" ".lint/kiln/$d"; done
cd .lint
exec "../$MYPY" --config-file ../pyproject.toml -p kiln.compiler.core
