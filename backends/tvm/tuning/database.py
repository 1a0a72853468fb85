"""Tuning records: where they live, which ones a build for a target reads, and the pass
that applies them (see the package docstring for the lookup order)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import tvm
from tvm import relax, tirx
from tvm.target.codegen import target_has_features

from kiln.backends.tvm.schedules.registry import RULE_ATTR, SCHEDULED_ATTR
from kiln.backends.tvm.targets import ResolvedTarget

log = logging.getLogger(__name__)

TUNED_RULE = "tuned"
SHIPPED_ROOT = Path(__file__).resolve().parent.parent / "tuning_db"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"

# ---------------------------------------------------------------------------------- keys


def target_key(target: ResolvedTarget | dict) -> str:
    """Directory name for a target's records: code generator + CPU (``llvm-znver4``)."""
    spec = target.target if isinstance(target, ResolvedTarget) else target
    kind = str(spec.get("kind", "llvm"))
    if kind == "cuda":
        return f"cuda-{spec.get('arch', 'generic')}"
    if spec.get("mcpu"):
        return f"{kind}-{spec['mcpu']}"
    triple = str(spec.get("mtriple", ""))
    return f"{kind}-{triple.split('-')[0] if triple else 'generic'}"


def _isa_class(key: str) -> str | None:
    """``<arch>-<widest vector ISA>`` of an LLVM key (which records may stand in for which)."""
    if not key.startswith("llvm-"):
        return None
    cpu = key[len("llvm-"):]
    if cpu == "aarch64" or cpu.startswith(("cortex", "neoverse", "apple")):
        return "aarch64-neon"
    spec: dict = {"kind": "llvm"} if cpu == "generic" else {"kind": "llvm", "mcpu": cpu}
    try:
        target = tvm.target.Target(spec)
        for isa in ("avx512f", "avx2"):
            if target_has_features(isa, target):
                return f"x86_64-{isa}"
    except Exception:  # noqa: BLE001 - an unknown CPU name: no stand-in
        return None
    return "x86_64-sse"


def user_root(tuning_db: Path | None = None) -> Path:
    """The writable root of tuning databases (see the module docstring)."""
    if tuning_db is not None:
        return Path(tuning_db)
    if os.environ.get("KILN_TUNING_DIR"):
        return Path(os.environ["KILN_TUNING_DIR"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("kiln")) / "tuning"


def has_records(path: Path) -> bool:
    """Whether ``path`` holds a database with at least one record."""
    record = path / RECORD_FILE
    return record.is_file() and record.stat().st_size > 0


def database_dirs(target: ResolvedTarget, tuning_db: Path | None = None,
                  *, shipped_root: Path = SHIPPED_ROOT) -> list[Path]:
    """The databases a build for ``target`` reads, most trusted first (may be empty)."""
    key = target_key(target)
    dirs = [d for d in (user_root(tuning_db) / key, shipped_root / key) if has_records(d)]
    if not (shipped_root / key).is_dir() and shipped_root.is_dir():
        cls = _isa_class(key)
        if cls is not None:
            dirs += sorted(d for d in shipped_root.iterdir()
                           if d.is_dir() and has_records(d) and _isa_class(d.name) == cls)
    return dirs


def open_database(dirs: list[Path]):
    """One MetaSchedule database over ``dirs`` (first match wins), or None if none."""
    from tvm.s_tir import meta_schedule as ms

    dbs = [ms.database.JSONDatabase(work_dir=str(d), allow_missing=False) for d in dirs]
    if not dbs:
        return None
    return dbs[0] if len(dbs) == 1 else ms.database.OrderedUnionDatabase(*dbs)


# -------------------------------------------------------------------------- applying


def _scheduled_names(mod: tvm.IRModule) -> set[str]:
    return {gv.name_hint for gv, f in mod.functions.items()
            if isinstance(f, tirx.PrimFunc) and f.attrs and f.attrs.get(SCHEDULED_ATTR)}


def apply_tuning_records(database) -> tvm.transform.Pass:
    """Schedule every kernel that has a record in ``database`` (tagged rule ``tuned``).

    Runs MetaSchedule's ``MetaScheduleApplyDatabase`` with ``database`` as the current
    one; must run under the target (the build pipeline enters it). The count of kernels
    it scheduled is logged, since a database that silently matches nothing looks the
    same as one that applied.
    """

    @tvm.transform.module_pass(opt_level=0, name="kiln.ApplyTuningRecords")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if database is None:
            return mod
        before = _scheduled_names(mod)
        with database, tvm.transform.PassContext(opt_level=3):
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        tuned = sorted(_scheduled_names(mod) - before)
        for name in tuned:
            gvar = mod.get_global_var(name)
            mod[gvar] = mod[gvar].with_attr(RULE_ATTR, TUNED_RULE)
        log.info("tuning records applied to %d kernels: %s", len(tuned), ", ".join(tuned))
        return mod

    return _pass


def drop_records(db_dir: Path, workloads: list[tvm.IRModule]) -> None:
    """Rewrite the database at ``db_dir`` without the records of ``workloads``."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    old = ms.database.JSONDatabase(work_dir=str(db_dir), allow_missing=False)
    with tempfile.TemporaryDirectory(prefix="kiln-db-", dir=db_dir.parent) as tmp:
        new = ms.database.JSONDatabase(work_dir=tmp, allow_missing=True)
        for record in old.get_all_tuning_records():
            mod = record.workload.mod
            if any(tvm_ffi.structural_equal(mod, w) for w in workloads):
                continue
            workload = new.commit_workload(mod)
            new.commit_tuning_record(ms.database.TuningRecord(
                record.trace, workload, record.run_secs, record.target, record.args_info))
        del new
        for name in (WORKLOAD_FILE, RECORD_FILE):
            os.replace(Path(tmp) / name, db_dir / name)
