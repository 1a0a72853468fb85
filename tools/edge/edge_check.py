"""Edge check: build a small model for arm64, run it on an emulated arm64 Linux, and
compare with the host build.

    .venv/bin/python tools/edge/edge_check.py [--model compiler/examples/tiny_cnn.onnx]

Steps (what ENVIRONMENT.md found to work; no binfmt or chroot needed):
1. build the model for ``host`` and ``arm64`` (linked with aarch64-linux-gnu-gcc);
2. an arm64 Debian rootfs: ``debootstrap --foreign --arch=arm64 --variant=minbase
   --include=python3 bookworm``, then ``dpkg -x`` of every downloaded .deb;
3. aarch64 wheels (numpy, ml_dtypes, typing_extensions, apache-tvm-ffi,
   apache-tvm) from ``pip download --only-binary=:all:``, unzipped into one folder;
4. ``qemu-aarch64-static -L ROOTFS ROOTFS/usr/bin/python3.11 run_on_target.py``
   with TVM's runtime-only mode, then compare the outputs (relative to the
   reference's max abs value).

The rootfs and wheels are cached under ``~/.cache/kiln-edge`` (``KILN_EDGE_CACHE``),
so only the first run downloads. Exit code 0 when the outputs match.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "compiler" / "examples" / "tiny_cnn.onnx"
SUITE = "bookworm"
TARGET_PYTHON = "3.11"  # bookworm's python3
WHEELS = ("numpy", "ml_dtypes", "typing_extensions", "apache-tvm-ffi==0.1.14.post1",
          "apache-tvm==0.27.0.post1")
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64",
             "manylinux2014_aarch64")
#: Same code, two ISAs: FMA contraction and vector widths differ, results should not much.
REL_TOL = 1e-4
TOOLS = {"qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap",
         "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu", "dpkg": "dpkg"}

log = logging.getLogger("edge_check")


class EdgeCheckError(Exception):
    """A step failed; the message says which and what to do."""


def cache_root() -> Path:
    root = Path(os.environ.get("KILN_EDGE_CACHE") or Path.home() / ".cache" / "kiln-edge")
    root.mkdir(parents=True, exist_ok=True)
    return root


def check_tools() -> None:
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise EdgeCheckError("missing tools: apt-get install " + " ".join(sorted(set(missing)))
                             + " (tools/edge/edge_check.sh installs them)")


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    log.debug("$ %s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise EdgeCheckError(f"{cmd[0]} failed ({result.returncode}): " + " | ".join(tail))
    return result


def ensure_rootfs(root: Path) -> Path:
    """An arm64 bookworm rootfs with python3 unpacked (cached; marker file when complete)."""
    rootfs = root / f"rootfs-{SUITE}-arm64"
    marker = rootfs / ".kiln-ready"
    if marker.exists():
        return rootfs
    if rootfs.exists():
        shutil.rmtree(rootfs)  # a half-made one from an interrupted run
    log.info("debootstrap (first stage) of %s arm64 into %s", SUITE, rootfs)
    _run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase",
          "--include=python3", SUITE, str(rootfs)])
    debs = sorted((rootfs / "var" / "cache" / "apt" / "archives").glob("*.deb"))
    log.info("unpacking %d packages", len(debs))
    for deb in debs:
        _run(["dpkg", "-x", str(deb), str(rootfs)])
    python = rootfs / "usr" / "bin" / f"python{TARGET_PYTHON}"
    if not python.exists():
        raise EdgeCheckError(f"the rootfs has no {python.name} after unpacking")
    marker.write_text("ok\n")
    return rootfs


def ensure_site(root: Path) -> Path:
    """aarch64 wheels for the target's Python, unzipped into one folder (cached)."""
    site = root / f"site-aarch64-py{TARGET_PYTHON}"
    marker = site / ".kiln-ready"
    if marker.exists():
        return site
    wheels = root / "wheels-aarch64"
    wheels.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", TARGET_PYTHON, "-d", str(wheels)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    log.info("downloading aarch64 wheels: %s", ", ".join(WHEELS))
    _run(cmd + list(WHEELS))
    if site.exists():
        shutil.rmtree(site)
    site.mkdir()
    seen: set[str] = set()
    for wheel in sorted(wheels.glob("*.whl"), reverse=True):  # newest version of each first
        project = wheel.name.split("-")[0].lower()
        if project in seen:
            continue
        seen.add(project)
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    marker.write_text("ok\n")
    return site


def kiln_path(work: Path) -> Path:
    """A folder where ``import kiln.backends`` / ``kiln.compiler`` resolve to this checkout."""
    path = work / "kiln-path" / "kiln"
    path.mkdir(parents=True, exist_ok=True)
    for package in ("compiler", "backends"):
        link = path / package
        if not link.exists():
            link.symlink_to(REPO / package)
    return path.parent


def build(model_path: Path, work: Path) -> tuple[Path, Path, Path, float]:
    """Host and arm64 artifacts of ``model_path`` plus a seeded input .npz."""
    from kiln.backends.tvm import build_artifact
    from kiln.compiler.frontend import load_model
    from kiln.compiler.ir import graph_inputs, model_digest

    model = load_model(str(model_path))
    digest = model_digest(model)
    host = build_artifact(model, "host", work / "host", model_hash=digest)
    arm = build_artifact(model, "arm64", work / "arm64", model_hash=digest)
    log.info("built: host %.1f s, arm64 %.1f s (%s)", host.seconds, arm.seconds, arm.binary)
    rng = np.random.default_rng(0)
    feeds = {v.name: rng.standard_normal([int(d) for d in v.shape]).astype(v.dtype.numpy())
             for v in graph_inputs(model)}
    inputs = work / "inputs.npz"
    np.savez(inputs, **feeds)
    return host.library.parent, arm.library.parent, inputs, host.seconds + arm.seconds


def run_emulated(rootfs: Path, site: Path, work: Path, artifact: Path, inputs: Path) -> Path:
    output = work / "arm64_outputs.npz"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TVM_USE_RUNTIME_LIB": "1",
           "PYTHONPATH": f"{site}:{kiln_path(work)}", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = ["qemu-aarch64-static", "-L", str(rootfs),
           str(rootfs / "usr" / "bin" / f"python{TARGET_PYTHON}"),
           str(Path(__file__).with_name("run_on_target.py")), str(artifact), str(inputs),
           str(output)]
    _run(cmd, env=env)
    return output


def compare(host_dir: Path, inputs: Path, arm_outputs: Path) -> float:
    from kiln.backends.tvm import run_artifact

    expected = run_artifact(host_dir, inputs)
    with np.load(arm_outputs) as data:
        got = [data[key] for key in data.files]
    if len(got) != len(expected):
        raise EdgeCheckError(f"arm64 run gave {len(got)} outputs, host {len(expected)}")
    worst = 0.0
    for out, ref in zip(got, expected, strict=True):
        if out.shape != ref.shape:
            raise EdgeCheckError(f"arm64 output shape {out.shape} != host {ref.shape}")
        scale = float(np.max(np.abs(ref))) or 1.0
        worst = max(worst, float(np.max(np.abs(out - ref))) / scale)
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="ONNX model with static input shapes (default: the tiny CNN example)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    # kiln's per-step build log and onnxscript's folding notes are noise here
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="edge_check: %(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    start = time.perf_counter()
    try:
        check_tools()
        root = cache_root()
        work = Path(tempfile.mkdtemp(prefix="run-", dir=root))
        host_dir, arm_dir, inputs, _ = build(args.model, work)
        built = time.perf_counter()
        rootfs = ensure_rootfs(root)
        site = ensure_site(root)
        prepared = time.perf_counter()
        arm_outputs = run_emulated(rootfs, site, work, arm_dir, inputs)
        emulated = time.perf_counter()
        error = compare(host_dir, inputs, arm_outputs)
    except EdgeCheckError as err:
        log.error("%s", err)
        return 1
    log.info("timings: build %.1f s, rootfs+wheels %.1f s, emulated run %.1f s, total %.1f s",
             built - start, prepared - built, emulated - prepared, time.perf_counter() - start)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if error > REL_TOL:
        log.error("arm64 output differs from the host's: max relative error %.2e", error)
        return 1
    log.info("arm64 output matches the host's (max relative error %.2e)", error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
