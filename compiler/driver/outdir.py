"""One build, one folder, all or nothing: how a run's files reach OUTDIR.

A run takes OUTDIR's lock (``fcntl.flock`` on ``.NAME.kiln-lock`` beside OUTDIR; inside
it when OUTDIR is a mount point or its parent is read-only, as the staging folder): a
second run into the same folder while the first holds it **refuses at once** with a
one-line OutputError naming the first run's pid (it does not wait: a compile can take
minutes and the second would overwrite the first's result anyway). Everything the run
writes goes into a fresh staging folder beside OUTDIR (same filesystem). At the end
:meth:`OutputFolder.commit` moves it in, with SIGINT/SIGTERM held off:

- OUTDIR missing: the staging folder is renamed to OUTDIR (one rename);
- else OUTDIR's kiln files (:data:`KILN_FILES`, manifest.json first) are moved aside,
  the new files moved in (manifest.json last: a folder is loadable only once it is
  complete, and ``kiln run`` checks every file against it), then the old ones deleted;
  if a move fails, everything is moved back. Kiln files of an earlier run that this
  run does not write are removed; other files in OUTDIR are left alone, and the input
  model is never moved or removed.

An interrupt that arrives during those moves (milliseconds) is held until they end: the
new build is then complete and kiln exits 130. Any exception or interrupt before the
commit deletes the staging folder: OUTDIR stays
exactly as it was (a run killed outright leaves its staging folder, which the next run
into OUTDIR removes). A failed compile's report goes to ``OUTDIR/report.json`` only when
OUTDIR holds no earlier build, else beside it (``OUTDIR.failed-report.json``).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from kiln.compiler.core import interrupt
from kiln.compiler.core.atomic import DEFAULT_MODE, current_umask, write_atomic, write_error
from kiln.compiler.core.errors import OutputError

#: The files kiln writes into OUTDIR, in the order they are moved out at a commit.
KILN_FILES = ("manifest.json", "model.so", "model.onnx", "report.html", "report.json",
              "inputs.json")
#: Written last at a commit: the file that makes a folder a loadable build.
COMMIT_LAST = "manifest.json"
FAILED_REPORT_SUFFIX = ".failed-report.json"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


class OutputFolder:
    """``with OutputFolder(outdir) as folder:`` write into ``folder.staging``, then call
    ``folder.commit()``; leaving the block without a commit leaves OUTDIR untouched.

    ``protect``: files (the input model) that are never moved or removed from OUTDIR.
    """

    def __init__(self, outdir: Path | str, *, protect: tuple[Path, ...] = ()) -> None:
        self.shown = Path(outdir)
        self.target = Path(os.path.realpath(outdir))
        self.protect = tuple(Path(p) for p in protect)
        self.staging: Path | None = None
        self.work = self.target.parent
        self.written: list[Path] = []
        self._lock_fd: int | None = None
        self._lock_path: Path | None = None

    # -- lock and staging -------------------------------------------------------------

    def __enter__(self) -> OutputFolder:
        if self.target.exists() and not self.target.is_dir():
            raise OutputError(f"{self.shown}: exists and is not a folder")
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.work = self._work_folder()
            self._lock()
            self._remove_stale_staging()
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.kiln-",
                                                 dir=self.work))
        except OSError as error:
            self._unlock()
            raise OutputError(f"{self.shown}: cannot write output "
                              f"({error.strerror or error})") from error
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.staging is not None and self.staging.exists():
                shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            self._unlock()

    def _work_folder(self) -> Path:
        """Where the lock and the staging folder go: beside OUTDIR, or inside it when OUTDIR
        is a mount point (a container's bind mount: a rename across filesystems fails) or
        its parent is not writable."""
        parent = self.target.parent
        if self.target.is_dir() and (os.stat(self.target).st_dev != os.stat(parent).st_dev
                                     or not os.access(parent, os.W_OK)):
            return self.target
        return parent

    def _remove_stale_staging(self) -> None:
        """Staging folders a killed run (SIGKILL, LLVM's fatal exit) left beside OUTDIR: no
        one else uses them while we hold the lock."""
        stale = re.compile(rf"\.{re.escape(self.target.name)}\.kiln-(old-)?[a-z0-9_]{{8}}")
        for entry in self.work.iterdir():
            if stale.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)

    def _lock(self) -> None:
        path = self.work / f".{self.target.name}.kiln-lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputError(f"{self.shown}: another kiln compile (pid {holder}) is "
                                  "writing this folder; wait for it or choose another "
                                  "-o OUTDIR") from None
            # The holder before us may have removed the file after we opened it.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd, self._lock_path = fd, path

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            if self._lock_path is not None:  # still locked: no one else can be using it
                self._lock_path.unlink(missing_ok=True)
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- what is in OUTDIR --------------------------------------------------------------

    def _protected(self, name: str) -> bool:
        return any(_same_file(self.target / name, p) for p in self.protect)

    def holds_build(self) -> bool:
        """OUTDIR holds kiln files of an earlier run (a failed run's report.json aside)."""
        for name in KILN_FILES:
            path = self.target / name
            if not path.is_file() or self._protected(name):
                continue
            if name != "report.json":
                return True
            try:
                failed = json.loads(path.read_text()).get("status") == "failed"
            except (OSError, ValueError, AttributeError):
                failed = False
            if not failed:
                return True
        return False

    @property
    def failed_report_path(self) -> Path:
        return self.target.with_name(self.target.name + FAILED_REPORT_SUFFIX)

    # -- the end of a run -----------------------------------------------------------

    def commit(self) -> list[Path]:
        """Move the staged files into OUTDIR (see the module docstring); returns them as
        ``shown / name`` (the files this run wrote), sorted."""
        assert self.staging is not None, "commit outside the with block"
        new = sorted(p.name for p in self.staging.iterdir() if not p.name.startswith("."))
        for name in new:
            if self._protected(name):
                raise OutputError(f"{self.shown / name}: is the input model; refusing to "
                                  "write over it (choose another -o OUTDIR)")
        with interrupt.deferred():
            stop = interrupt.pending()  # an interrupt before the first move: nothing moves
            if not stop:
                if not self.target.exists():
                    self._rename_whole()
                else:
                    self._swap_files(new)
                self.failed_report_path.unlink(missing_ok=True)
        if stop:  # (a signal held meanwhile has already been raised as the block ended)
            raise KeyboardInterrupt
        self.written = [self.shown / name for name in new]
        return self.written

    def _rename_whole(self) -> None:
        assert self.staging is not None
        os.chmod(self.staging, 0o777 & ~current_umask())  # mkdtemp made it 0700
        try:
            os.rename(self.staging, self.target)
        except OSError as error:
            raise write_error(self.shown, error) from error
        self.staging = None

    def _swap_files(self, new: list[str]) -> None:
        assert self.staging is not None
        old = [n for n in KILN_FILES if (self.target / n).is_file() and not self._protected(n)]
        incoming = sorted(new, key=lambda n: n == COMMIT_LAST)
        backup = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.kiln-old-",
                                       dir=self.work))
        moved_out: list[str] = []
        moved_in: list[str] = []
        current = ""
        try:
            for current in old:
                os.replace(self.target / current, backup / current)
                moved_out.append(current)
            for current in incoming:
                os.replace(self.staging / current, self.target / current)
                moved_in.append(current)
        except BaseException as error:  # OSError, or an interrupt not held off (Python API)
            for name in reversed(moved_in):
                os.replace(self.target / name, self.staging / name)
            for name in reversed(moved_out):
                os.replace(backup / name, self.target / name)
            shutil.rmtree(backup, ignore_errors=True)
            if isinstance(error, OSError):
                raise write_error(self.shown / current, error) from error
            raise
        shutil.rmtree(backup, ignore_errors=True)

    def write_failed_report(self, data: bytes) -> Path:
        """Write a failed compile's report: OUTDIR/report.json when OUTDIR holds no earlier
        build, else beside OUTDIR. Returns where (as the user named it)."""
        if self.holds_build():
            path = shown = self.failed_report_path
        else:
            path, shown = self.target / "report.json", self.shown / "report.json"
        try:
            write_atomic(path, data, protect=self.protect, mode=DEFAULT_MODE)
        except OSError as error:
            raise write_error(shown, error) from error
        return shown
