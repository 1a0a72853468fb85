"""write_atomic: all or nothing, the usual file mode, never over a protected file."""

from __future__ import annotations

import os
import stat

import pytest

from kiln.compiler.core.atomic import replace_atomic, write_atomic
from kiln.compiler.core.errors import OutputError


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_with_the_plain_file_mode_and_makes_the_folder(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_atomic(path, b"{}")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_bytes() == b"{}"
    assert _mode(path) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]  # no temp file left


def test_refuses_to_write_over_a_protected_file(tmp_path):
    source = tmp_path / "model.onnx"
    source.write_bytes(b"original")
    with pytest.raises(OutputError, match="refusing to write over the input model"):
        write_atomic(tmp_path / "." / "model.onnx", b"new", protect=(source,))
    assert source.read_bytes() == b"original"


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_replace_gives_the_requested_mode(tmp_path):
    tmp = tmp_path / ".lib.tmp"
    tmp.write_bytes(b"\x7fELF")
    replace_atomic(tmp, tmp_path / "model.so", mode=0o755)
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(tmp_path / "model.so") == 0o755 & ~umask and not tmp.exists()
