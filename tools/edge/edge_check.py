"""Edge check: build small models for arm64, run them on an emulated arm64 Linux, and
compare with the host build.

    .venv/bin/python tools/edge/edge_check.py [--model compiler/core/examples/tiny_cnn.onnx]
                                              [--no-quantized]

Two models: the fp32 ``--model`` and an int4 weight-only one (:func:`quantized_model`:
a conv and a MatMul quantized by kiln's ``quantize`` pass, int4 with a scale per 32
input channels), whose arm64 kernels read the packed weights (kiln's ``decode_conv``
and grouped-GEMV ``decode_contraction`` rules, checked in the build report).

Steps (what docs/environment.md describes; no binfmt or chroot needed):
1. build each model for ``host`` and ``arm64`` (linked with aarch64-linux-gnu-gcc);
2. an arm64 Debian rootfs: ``debootstrap --foreign --arch=arm64 --variant=minbase
   --include=python3 bookworm``, then ``dpkg -x`` of every downloaded .deb;
3. aarch64 wheels (numpy, ml_dtypes, typing_extensions, apache-tvm-ffi,
   apache-tvm) from ``pip download --only-binary=:all:``, unzipped into one folder;
4. ``qemu-aarch64-static -L ROOTFS ROOTFS/usr/bin/python3.11 run_on_target.py``
   with TVM's runtime-only mode (one emulated process runs every model: its start-up
   is most of the emulated time), then compare the outputs (relative to the
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
DEFAULT_MODEL = REPO / "compiler" / "core" / "examples" / "tiny_cnn.onnx"
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


#: Rules of the kernels that read compressed weights (kiln.backends.tvm.schedules).
DECODE_RULES = ("decode_conv", "decode_contraction")


def quantized_model(seed: int = 0):
    """x[1, 32, 12, 12] -> Conv(64, 3x3) + bias -> Relu -> GlobalAveragePool -> Flatten
    -> MatMul(w[64, 96]) -> y[1, 96], weights int4 with a scale per 32 input channels.

    On arm64 the conv is one ``decode_conv`` kernel (panels decoded from 32-column
    nibble tiles) and the one-row MatMul kiln's grouped GEMV: both read packed int4.
    """
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from kiln.passes.quant.quantize import Quantize, QuantizeConfig

    rng = np.random.default_rng(seed)

    def init(name, shape, scale):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32),
                                       name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "w2"], ["y"], name="fc")]
    graph = helper.make_graph(
        nodes, "edge_int4",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 96])],
        initializer=[init("w1", (64, 32, 3, 3), 0.1), init("b1", (64,), 0.1),
                     init("w2", (64, 96), 0.1)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    model = ir.serde.deserialize_model(proto)
    Quantize(QuantizeConfig(weights={"dtype": "int4", "granularity": {"group": 32}}))(model)
    return model


def build(model, work: Path, *, compressed: bool = False) -> tuple[Path, Path, Path, float]:
    """Host and arm64 artifacts of ``model`` (an ``onnx_ir.Model``) plus a seeded input .npz.

    ``compressed``: the arm64 build must have kernels that read compressed weights.
    """
    from kiln.backends.tvm import build_artifact
    from kiln.compiler.core.graph import graph_inputs, model_digest

    digest = model_digest(model)
    host = build_artifact(model, "host", work / "host", model_hash=digest)
    arm = build_artifact(model, "arm64", work / "arm64", model_hash=digest)
    log.info("built %s: host %.1f s, arm64 %.1f s (%s)", work.name, host.seconds, arm.seconds,
             arm.binary)
    if compressed:
        decoding = sorted(name for name, rule in arm.rules.items() if rule in DECODE_RULES)
        if not decoding:
            raise EdgeCheckError(f"the arm64 build of {work.name} has no kernel that reads "
                                 f"compressed weights (rules: {arm.rules})")
        log.info("%s: compressed-weight kernels on arm64: %s", work.name, ", ".join(
            f"{name} ({arm.rules[name]})" for name in decoding))
    rng = np.random.default_rng(0)
    feeds = {v.name: rng.standard_normal([int(d) for d in v.shape]).astype(v.dtype.numpy())
             for v in graph_inputs(model)}
    inputs = work / "inputs.npz"
    np.savez(inputs, **feeds)
    return host.library.parent, arm.library.parent, inputs, host.seconds + arm.seconds


def run_emulated(rootfs: Path, site: Path, work: Path,
                 runs: list[tuple[Path, Path, Path]]) -> None:
    """Run each (artifact, inputs, outputs) in one emulated Python process."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TVM_USE_RUNTIME_LIB": "1",
           "PYTHONPATH": f"{site}:{kiln_path(work)}", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = ["qemu-aarch64-static", "-L", str(rootfs),
           str(rootfs / "usr" / "bin" / f"python{TARGET_PYTHON}"),
           str(Path(__file__).with_name("run_on_target.py"))]
    for artifact, inputs, output in runs:
        cmd += [str(artifact), str(inputs), str(output)]
    _run(cmd, env=env)


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
    parser.add_argument("--no-quantized", dest="quantized", action="store_false",
                        help="skip the int4 weight-only model")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    # kiln's per-step build log and onnxscript's folding notes are noise here
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="edge_check: %(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    start = time.perf_counter()
    try:
        from kiln.compiler.core.frontend import load_model

        check_tools()
        root = cache_root()
        work = Path(tempfile.mkdtemp(prefix="run-", dir=root))
        cases = {args.model.stem: build(load_model(str(args.model)), work / args.model.stem)}
        if args.quantized:
            cases["int4-weights"] = build(quantized_model(), work / "int4-weights",
                                          compressed=True)
        built = time.perf_counter()
        rootfs = ensure_rootfs(root)
        site = ensure_site(root)
        prepared = time.perf_counter()
        outputs = {name: work / name / "arm64_outputs.npz" for name in cases}
        run_emulated(rootfs, site, work, [(arm, inputs, outputs[name])
                                          for name, (_, arm, inputs, _) in cases.items()])
        emulated = time.perf_counter()
        errors = {name: compare(host, inputs, outputs[name])
                  for name, (host, _, inputs, _) in cases.items()}
    except EdgeCheckError as err:
        log.error("%s", err)
        return 1
    log.info("timings: build %.1f s, rootfs+wheels %.1f s, emulated run %.1f s, total %.1f s",
             built - start, prepared - built, emulated - prepared, time.perf_counter() - start)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    failed = {name: error for name, error in errors.items() if error > REL_TOL}
    for name, error in errors.items():
        if name not in failed:
            log.info("%s: arm64 output matches the host's (max relative error %.2e)", name, error)
    for name, error in failed.items():
        log.error("%s: arm64 output differs from the host's: max relative error %.2e",
                  name, error)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
