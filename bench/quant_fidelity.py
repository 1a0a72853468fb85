"""int8 fidelity on real tasks: kiln's calibration methods and DFQ passes against ONNX
Runtime's ``quantize_static``, on PP-OCRv4 rec (rendered text lines) and det (rendered
text pages), with calibration and held-out samples kept apart.

    python -m bench.quant_fidelity                 # the table in bench/RESULTS_QUANT.md
    python -m bench.quant_fidelity --quick         # a small run, printed only

Every method starts from the same float graph: the shipped model as kiln loads it
(constant folding, static shapes) with BatchNormalization folded (``fold_batchnorm``),
raised to opset 13 (per-axis QDQ).
Weights are int8 per output channel, activations uint8 per tensor, in QDQ form on the
inputs of every Conv / MatMul / Gemm with a constant weight:

- kiln ``minmax | percentile | mse | search``: ``quantize`` with that activation
  calibration; ``+equalize``: ``equalize`` first; ``+smooth``: ``migrate_scales``
  (SmoothQuant, alpha 0.5) first; ``+bias``: ``bias_correction: true``; ``+gptq``:
  ``rounding: gptq`` (weight codes by GPTQ from the calibration inputs, see passes/quant/gptq);
- ORT ``MinMax | Entropy | Percentile``: ``onnxruntime.quantization.quantize_static``
  (QDQ, ``per_channel=True``, QUInt8 activations, QInt8 weights, ``nodes_to_quantize`` the
  Conv/MatMul/Gemm nodes with a constant weight, so both quantize the same layers) on the
  same calibration samples.
  Through ``quantize_static`` Entropy gets ORT's defaults, 128 histogram bins for 128
  quantized bins, so its threshold search has one candidate and it equals MinMax (all 190
  activation scales identical on rec); ``quantize_static`` passes no option to change that.

Each quantized model runs in ONNX Runtime (all graph optimizations, as an application
runs it) on the held-out samples. Columns: the output's SQNR vs the float model over all
held-out samples (one output each, so it is the worst output) and the task metric: rec, the
lines whose greedy CTC decode is identical to float's (margin spaces trimmed, as in
tests/passes/quant/test_rec_ctc.py); det, the pixels whose text mask (probability > 0.3,
RapidOCR's threshold) agrees with float's, and the IoU of the masks.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from PIL import Image

from kiln.compiler.core import graph as kir
from kiln.compiler.core.metrics import sqnr_db
from kiln.compiler.testing import textlines

RESULTS = Path(__file__).parent / "RESULTS_QUANT.md"
START, END = "<!-- quant_fidelity:start -->", "<!-- quant_fidelity:end -->"
DET_THRESHOLD = 0.3
DET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
DET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
KILN_METHODS = ("minmax", "percentile", "mse", "search", "search+bias", "search+smooth",
                "search+equalize", "search+equalize+bias", "search+gptq", "percentile+gptq")
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
INPUT = {"rec": "x", "det": "x", "yolox": "images"}
YOLO_SIDE = 416


@dataclass(frozen=True)
class Sizes:
    rec_calibration: int = 16
    rec_eval: int = 64
    det_calibration: int = 8
    det_eval: int = 8
    det_side: int = 480


FULL = Sizes()
QUICK = Sizes(rec_calibration=4, rec_eval=4, det_calibration=2, det_eval=2, det_side=160)


def rec_samples(count: int, seed: int) -> list[np.ndarray]:
    lines = textlines.text_lines(count, seed=seed)
    return [textlines.rec_input(textlines.render_line(t, seed=seed * 1000 + i))
            for i, t in enumerate(lines)]


def text_page(seed: int, side: int) -> np.ndarray:
    """A rendered page: seeded text lines pasted on paper, preprocessed like RapidOCR's det
    (``/255``, ImageNet mean/std, NCHW float32)."""
    rng = np.random.default_rng([seed, side])
    paper = int(rng.integers(215, 256))
    page = Image.new("RGB", (side, side), (paper, paper, paper))
    y = int(rng.integers(4, 20))
    for i, text in enumerate(textlines.text_lines(32, seed=seed)):
        line = textlines.render_line(text, seed=seed * 100 + i)
        scale = float(rng.uniform(0.45, 0.9))
        line = line.resize((max(1, int(line.width * scale)), max(1, int(line.height * scale))))
        if y + line.height > side:
            break
        x = int(rng.integers(0, max(1, side - line.width)))
        page.paste(line.crop((0, 0, min(line.width, side - x), line.height)), (x, y))
        y += line.height + int(rng.integers(2, 24))
    pixels = np.asarray(page, dtype=np.float32) / 255.0
    return np.ascontiguousarray(((pixels - DET_MEAN) / DET_STD).transpose(2, 0, 1)[None])


def yolo_page(seed: int, side: int) -> np.ndarray:
    """A rendered text page as ddddocr's YOLOX detector reads it: raw 0..255 RGB, NCHW."""
    page = text_page(seed, side) * DET_STD[:, None, None] + DET_MEAN[:, None, None]
    return np.ascontiguousarray(np.round(page * 255.0).astype(np.float32))


def float_graph(which: str, shape: list[int]) -> ir.Model:
    from kiln.compiler.core.frontend import load_model
    from kiln.compiler.core.opset import PER_AXIS_OPSET, ensure_opset
    from kiln.compiler.testing.real_models import held_out_model, rapidocr_model
    from kiln.passes.reparam.fold_batchnorm import FoldBatchNorm

    path = held_out_model("yolox-det") if which == "yolox" else rapidocr_model(which)
    model = load_model(path, input_shapes={INPUT[which]: shape})
    FoldBatchNorm()(model)
    ensure_opset(model, PER_AXIS_OPSET, pass_name="quant_fidelity")  # per-axis QDQ for ORT too
    return model


def _name(model: ir.Model | onnx.ModelProto) -> str:
    graph = model.graph
    return graph.input[0].name if isinstance(model, onnx.ModelProto) else graph.inputs[0].name


def kiln_quantized(model: ir.Model, calibration: list[np.ndarray], method: str,
                   reduce_range: bool = False) -> ir.Model:
    from kiln.backends.ort import collect_activations
    from kiln.compiler.core.pass_api import CalibrationContext
    from kiln.passes.quant.config import ActivationQuant, IntWeights, QuantizeConfig
    from kiln.passes.quant.equalize import Equalize
    from kiln.passes.quant.migrate_scales import MigrateScales
    from kiln.passes.quant.quantize import Quantize

    model = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    samples = [{_name(model): x} for x in calibration]
    context = CalibrationContext(samples, lambda m, names: collect_activations(m, names, samples))
    parts = method.split("+")
    if "equalize" in parts:
        Equalize()(model)
    if "smooth" in parts:     # SmoothQuant: outlier channels of x move into the weights
        MigrateScales(calibration=context)(model)
    config = QuantizeConfig(weights=IntWeights(dtype="int8", reduce_range=reduce_range),
                            activations=ActivationQuant(dtype="uint8", calibration=parts[0]),
                            bias_correction="bias" in parts,
                            rounding="gptq" if "gptq" in parts else "nearest")
    Quantize(config, calibration=context)(model)
    return model


def ort_quantized(model: ir.Model, calibration: list[np.ndarray], method: str,
                  folder: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._left = iter([{_name(model): x} for x in calibration])

        def get_next(self):
            return next(self._left, None)

    source, target = folder / "float.onnx", folder / f"ort-{method}.onnx"
    onnx.save(kir.to_proto(model), source)
    # the layers kiln quantizes: a constant weight (not the attention's activation products)
    layers = [n.name for n in model.graph if n.op_type in ("Conv", "MatMul", "Gemm")
              and len(n.inputs) > 1 and kir.constant_tensor(n.inputs[1]) is not None]
    quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                    nodes_to_quantize=layers, calibrate_method=getattr(CalibrationMethod, method))
    return onnx.load(target)


def run_all(model: ir.Model | onnx.ModelProto, inputs: list[np.ndarray]) -> list[np.ndarray]:
    from kiln.backends.ort import ReferenceRunner

    runner = ReferenceRunner(model, optimize="all")
    return [runner.run({_name(model): x})[0] for x in inputs]


def rec_metric(reference: list[np.ndarray], outputs: list[np.ndarray]) -> str:
    from kiln.compiler.testing.real_models import rapidocr_model

    space = len(textlines.rec_characters(rapidocr_model("rec"))) - 1
    same = sum(textlines.trim_spaces(textlines.greedy_ctc(a[0]), space)
               == textlines.trim_spaces(textlines.greedy_ctc(b[0]), space)
               for a, b in zip(reference, outputs))
    return f"{same}/{len(reference)} lines ({100 * same / len(reference):.1f}%)"


def det_metric(reference: list[np.ndarray], outputs: list[np.ndarray]) -> str:
    ref = np.concatenate([r.reshape(-1) for r in reference]) > DET_THRESHOLD
    got = np.concatenate([o.reshape(-1) for o in outputs]) > DET_THRESHOLD
    agree = float(np.mean(ref == got))
    iou = float(np.sum(ref & got) / max(1, np.sum(ref | got)))
    return f"{100 * agree:.2f}% pixels, IoU {iou:.3f}"


def yolo_metric(reference: list[np.ndarray], outputs: list[np.ndarray]) -> str:
    """Anchors whose score (objectness x class) passes 0.3 in both, as det's masks."""
    def scores(outs):
        return [o[..., 4:5] * o[..., 5:] for o in outs]
    return det_metric(scores(reference), scores(outputs)).replace("pixels", "anchors")


def evaluate(which: str, sizes: Sizes, say: Callable[[str], None],
             kiln_methods: tuple[str, ...] = KILN_METHODS,
             ort_methods: tuple[str, ...] = ORT_METHODS) -> list[tuple[str, float, str]]:
    """(method, SQNR dB over the held-out samples, task metric) for float and each method."""
    if which == "rec":
        shape = [1, 3, *textlines.REC_SIZE]
        calibration = rec_samples(sizes.rec_calibration, seed=11)
        held_out = rec_samples(sizes.rec_eval, seed=0)
        metric = rec_metric
    elif which == "det":
        shape = [1, 3, sizes.det_side, sizes.det_side]
        calibration = [text_page(i, sizes.det_side) for i in range(sizes.det_calibration)]
        held_out = [text_page(1000 + i, sizes.det_side) for i in range(sizes.det_eval)]
        metric = det_metric
    else:
        side = YOLO_SIDE          # the model's input is fixed at 416x416
        shape = [1, 3, side, side]
        calibration = [yolo_page(i, side) for i in range(sizes.det_calibration)]
        held_out = [yolo_page(1000 + i, side) for i in range(sizes.det_eval)]
        metric = yolo_metric
    model = float_graph(which, shape)
    reference = run_all(model, held_out)
    rows = [("float", math.inf, metric(reference, reference))]

    def row(name: str, quantized) -> None:
        outputs = run_all(quantized, held_out)
        sqnr = sqnr_db(np.concatenate([r.reshape(-1) for r in reference]),
                       np.concatenate([o.reshape(-1) for o in outputs]))
        rows.append((name, sqnr, metric(reference, outputs)))
        say(f"{which} {name}: {sqnr:.2f} dB, {rows[-1][2]}")

    for method in kiln_methods:
        started = time.perf_counter()
        quantized = kiln_quantized(model, calibration, method)
        say(f"{which} kiln {method}: quantized in {time.perf_counter() - started:.0f} s")
        row(f"kiln {method}", quantized)
    with tempfile.TemporaryDirectory(prefix="kiln-ortq-") as folder:
        for method in ort_methods:
            row(f"ORT {method}", ort_quantized(model, calibration, method, Path(folder)))
    return rows


def table(which: str, rows: list[tuple[str, float, str]], sizes: Sizes) -> str:
    if which == "rec":
        head = (f"PP-OCRv4 rec, 1x3x48x320: {sizes.rec_calibration} calibration lines, "
                f"{sizes.rec_eval} held-out lines")
        task = "greedy CTC identical to float"
    elif which == "det":
        head = (f"PP-OCRv4 det, 1x3x{sizes.det_side}x{sizes.det_side}: "
                f"{sizes.det_calibration} calibration pages, {sizes.det_eval} held-out pages")
        task = "text mask agreement with float"
    else:
        head = (f"YOLOX (ddddocr common_det), 1x3x{YOLO_SIDE}x{YOLO_SIDE}: {sizes.det_calibration} "
                f"calibration pages, {sizes.det_eval} held-out pages")
        task = "detections (score > 0.3) agreeing with float"
    best_ort = max((s for n, s, _ in rows if n.startswith("ORT")), default=math.nan)
    lines = [f"**{head}**", "", f"| method | SQNR dB (worst output) | vs best ORT | {task} |",
             "|---|---|---|---|"]
    for name, sqnr, text in rows:
        shown = "exact" if math.isinf(sqnr) else f"{sqnr:.2f}"
        delta = "" if math.isinf(sqnr) else f"{sqnr - best_ort:+.2f}"
        lines.append(f"| {name} | {shown} | {delta} | {text} |")
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) this script's section of RESULTS_QUANT.md, atomically."""
    from kiln.compiler.core.atomic import write_atomic

    current = path.read_text() if path.exists() else ""
    block = f"{START}\n{text.rstrip()}\n{END}\n"
    if START in current and END in current:
        before, rest = current.split(START, 1)
        after = rest.split(END, 1)[1].lstrip("\n")
        new = before + block + ("\n" + after if after else "")
    else:
        new = current.rstrip("\n") + "\n\n" + block
    write_atomic(path, new.encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run, printed only")
    parser.add_argument("--models", nargs="+", default=["rec", "det", "yolox"],
                        choices=["rec", "det", "yolox"])
    parser.add_argument("--methods", nargs="+", default=list(KILN_METHODS),
                        help="kiln methods (calibration[+equalize][+smooth][+bias][+gptq])")
    parser.add_argument("--ort", nargs="*", default=list(ORT_METHODS), choices=ORT_METHODS)
    parser.add_argument("--print-only", action="store_true", help="do not write the table")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    started = time.perf_counter()
    parts = []
    for which in args.models:
        rows = evaluate(which, sizes, print, tuple(args.methods), tuple(args.ort))
        parts.append(table(which, rows, sizes))
    text = ("## int8 methods vs ONNX Runtime's quantize_static on real tasks\n\n"
            "Written by `python -m bench.quant_fidelity` (see its docstring for the setup); "
            f"{time.perf_counter() - started:.0f} s on this machine.\n\n" + "\n".join(parts))
    print(text)
    if not args.quick and not args.print_only:
        write_section(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
