"""Numerical verification: seeded inputs (or the spec's calibration samples), runs
with ONNX Runtime, and the error of every output (SQNR in dB, max abs error).

SQNR = 10 log10(sum(ref^2) / sum((ref - out)^2)) over all samples of an output
(``kiln.compiler.core.metrics``); identical outputs give +inf (written as null in
JSON, "exact" in tables).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from kiln.compiler.core import graph as kir
from kiln.compiler.core.errors import FrontendError, SpecError, VerificationError
from kiln.compiler.core.metrics import sqnr_db_from_sums
from kiln.compiler.core.spec import Spec
from kiln.compiler.core.spec.schema import FolderSource, NpzSource

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class ErrorMetrics:
    sqnr_db: float           # +inf when identical
    max_abs_err: float
    worst_output: str        # the output with the lowest SQNR
    ref_max_abs: float       # max |reference| of the worst output (for tolerances)
    within_tolerance: bool   # every output within atol + rtol * max|ref|

    def describe(self) -> str:
        sqnr = "exact" if math.isinf(self.sqnr_db) else f"{self.sqnr_db:.1f} dB"
        return f"SQNR {sqnr}, max abs error {self.max_abs_err:.3g} (output {self.worst_output!r})"


def _random_array(rng: np.random.Generator, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 4, size=shape).astype(dtype)
    raise SpecError(f"cannot make random inputs of dtype {dtype}")


def static_input_shapes(model: ir.Model) -> dict[str, tuple[list[int], np.dtype]]:
    shapes = {}
    for value in kir.graph_inputs(model):
        dims = kir.shape_list(value)
        if value.shape is None or any(not isinstance(d, int) or d <= 0 for d in dims):
            # A property of the model, not of a spec key (the driver locates SpecErrors).
            raise FrontendError(f"input {value.name!r} has dynamic shape {dims}: bind it with "
                                f"--input {value.name}=DxDx... or the spec's `inputs:`")
        shapes[value.name] = (list(dims), kir.numpy_dtype(value))
    return shapes


def _npz_samples(path: Path, shapes: dict[str, tuple[list[int], np.dtype]],
                 count: int) -> list[Feeds]:
    if not path.exists():
        raise SpecError(f"calibration file {str(path)!r} does not exist")
    try:
        data = np.load(path)
    except Exception as error:
        raise SpecError(f"calibration file {str(path)!r} is not a readable .npz ({error})") from None
    missing = [name for name in shapes if name not in data.files]
    if missing:
        raise SpecError(f"calibration file {str(path)!r} lacks inputs {missing} "
                        f"(has {data.files})")
    samples: list[Feeds] = []
    batches = {}
    for name, (shape, dtype) in shapes.items():
        array = data[name]
        if list(array.shape) == shape:
            array = array[None]
        if list(array.shape[1:]) != shape:
            raise SpecError(f"calibration input {name!r} has shape {list(array.shape)}, "
                            f"expected [N, {', '.join(map(str, shape))}] or {shape}")
        batches[name] = array.astype(dtype)
    n = min(len(a) for a in batches.values())
    for i in range(min(n, count)):
        samples.append({name: batches[name][i] for name in batches})
    return samples


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _folder_samples(folder: Path, recipe, shapes: dict[str, tuple[list[int], np.dtype]],
                    count: int, seed: int) -> list[Feeds]:
    """Images from a folder (sorted by name), preprocessed into the model's image input.

    Other inputs, if any, get seeded random values.
    """
    from PIL import Image

    if not folder.is_dir():
        raise SpecError(f"calibration folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SpecError(f"calibration folder {str(folder)!r} has no images "
                        f"({', '.join(IMAGE_SUFFIXES)})")
    name = recipe.input or next(iter(shapes))
    if name not in shapes:
        raise SpecError(f"preprocess.input {name!r} is not a model input ({', '.join(shapes)})")
    shape, dtype = shapes[name]
    height, width = recipe.size
    channels = 1 if recipe.color == "gray" else 3
    expected = [1, channels, height, width] if recipe.layout == "NCHW" else \
        [1, height, width, channels]
    if len(shape) != 4 or shape[1:] != expected[1:]:
        raise SpecError(f"preprocessed images are {expected[1:]} ({recipe.layout}), input "
                        f"{name!r} is {shape}")
    mean = np.asarray(recipe.mean, dtype=np.float32)
    std = np.asarray(recipe.std, dtype=np.float32)
    rng = np.random.default_rng(seed)
    samples: list[Feeds] = []
    for path in files[:count]:
        try:
            with Image.open(path) as image:
                image = image.convert("L" if channels == 1 else "RGB").resize(
                    (width, height), Image.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32)
        except OSError as error:
            raise SpecError(f"calibration image {str(path)!r} cannot be read ({error})") from None
        if channels == 1:
            pixels = pixels[..., None]
        elif recipe.color == "bgr":
            pixels = pixels[..., ::-1]
        pixels = (pixels * recipe.scale - mean) / std
        if recipe.layout == "NCHW":
            pixels = pixels.transpose(2, 0, 1)
        feeds = {other: _random_array(rng, s, d) for other, (s, d) in shapes.items()
                 if other != name}
        feeds[name] = np.ascontiguousarray(pixels[None]).astype(dtype)
        samples.append(feeds)
    return samples


def make_samples(model: ir.Model, spec: Spec, *, count: int | None = None,
                 seed: int | None = None) -> list[Feeds]:
    """Inputs for verification and calibration: the spec's npz samples or seeded random."""
    shapes = static_input_shapes(model)
    count = count or spec.verify.samples
    source = spec.calibration.source
    if isinstance(source, NpzSource):
        return _npz_samples(Path(source.path), shapes, count)
    if isinstance(source, FolderSource):
        return _folder_samples(Path(source.path), spec.calibration.preprocess, shapes, count,
                               spec.calibration.seed if seed is None else seed)
    rng = np.random.default_rng(spec.verify.seed if seed is None else seed)
    return [{name: _random_array(rng, shape, dtype) for name, (shape, dtype) in shapes.items()}
            for _ in range(count)]


def compare(reference: Sequence[Sequence[np.ndarray]], actual: Sequence[Sequence[np.ndarray]],
            output_names: Sequence[str], *, rtol: float, atol: float) -> ErrorMetrics:
    """Error of ``actual`` against ``reference``: per sample, per output."""
    worst_sqnr = math.inf
    worst_name = output_names[0] if output_names else "?"
    worst_ref = 0.0
    max_err = 0.0
    ok = True
    for k, name in enumerate(output_names):
        signal = 0.0
        noise = 0.0
        ref_max = 0.0
        out_err = 0.0
        for ref_outs, act_outs in zip(reference, actual):
            ref = np.asarray(ref_outs[k])
            act = np.asarray(act_outs[k])
            if ref.shape != act.shape:
                raise VerificationError(f"output {name!r} changed shape from {list(ref.shape)} "
                                        f"to {list(act.shape)}", output=name)
            if ref.dtype.kind not in "fc":
                diff = (ref != act).astype(np.float64)
                ref64 = ref.astype(np.float64)
            else:
                ref64 = ref.astype(np.float64)
                diff = ref64 - act.astype(np.float64)
            if not np.all(np.isfinite(diff)):
                noise = math.inf
                out_err = math.inf
                continue
            signal += float(np.sum(ref64 ** 2))
            noise += float(np.sum(diff ** 2))
            ref_max = max(ref_max, float(np.max(np.abs(ref64))) if ref64.size else 0.0)
            out_err = max(out_err, float(np.max(np.abs(diff))) if diff.size else 0.0)
        sqnr = sqnr_db_from_sums(signal, noise)
        if out_err > atol + rtol * ref_max:
            ok = False
        if sqnr < worst_sqnr or (worst_sqnr == math.inf and k == 0):
            worst_sqnr, worst_name, worst_ref = sqnr, name, ref_max
        max_err = max(max_err, out_err)
    return ErrorMetrics(worst_sqnr, max_err, worst_name, worst_ref, ok)
