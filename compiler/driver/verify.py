"""Numerical verification: seeded inputs (or the spec's calibration samples), runs
with ONNX Runtime, and the error of every output (SQNR in dB, max abs error).

SQNR = 10 log10(sum(ref^2) / sum((ref - out)^2)) over all samples of an output
(``kiln.compiler.core.metrics``); identical outputs give +inf (written as null in
JSON, "exact" in tables). NaN where the reference has NaN, and the same infinity where
it has one, count as equal; any other non-finite difference is an infinite error.

Random inputs are drawn where they mean something to the ops that read them
(:mod:`.input_ranges`: indices within the dimension, valid axes, real shapes, ...);
``verify.inputs: npz:PATH`` gives verification inputs instead. When ONNX Runtime cannot
run the reference on them, verification "could not be done" (:func:`unverifiable`), which
is never reported as the model being wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from kiln.compiler.core import graph as kir
from kiln.compiler.core.errors import FrontendError, KilnError, SpecError, VerificationError
from kiln.compiler.core.metrics import equal_nonfinite, sqnr_db_from_sums
from kiln.compiler.core.spec import Spec
from kiln.compiler.core.spec.schema import CallableSource, FolderSource, NpzSource
from kiln.compiler.driver import symbolic

from .callable_source import callable_samples
from .input_ranges import Draw, input_draws

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class ErrorMetrics:
    sqnr_db: float           # +inf when identical
    max_abs_err: float
    worst_output: str        # the output with the lowest SQNR
    ref_max_abs: float       # max |reference| of the worst output (for tolerances)
    within_tolerance: bool   # every output within atol + rtol * max|ref|
    per_output: dict[str, float] = field(default_factory=dict)  # output name -> SQNR dB

    def describe(self) -> str:
        if self.sqnr_db == math.inf:
            sqnr = "exact"
        elif self.sqnr_db == -math.inf:
            sqnr = "-inf dB (NaN/inf where the reference differs)" \
                if not math.isfinite(self.max_abs_err) else "-inf dB"
        else:
            sqnr = f"{self.sqnr_db:.1f} dB"
        return f"SQNR {sqnr}, max abs error {self.max_abs_err:.3g} (output {self.worst_output!r})"


VERIFY_HINT = "give inputs with verify.inputs: npz:PATH (or set verify.enabled: false)"


def unverifiable(why: str) -> VerificationError:
    """The error for a model kiln could not check (never "the model is wrong")."""
    return VerificationError(f"verification could not be done: {why}; {VERIFY_HINT}")


def _random_array(rng: np.random.Generator, shape: Sequence[int], dtype: np.dtype,
                  name: str = "?", draw: Draw | None = None) -> np.ndarray:
    # np.asarray: a 0-d draw is a numpy scalar, which ONNX Runtime does not take as a tensor
    if draw is not None:
        return np.asarray(draw(rng, list(shape), dtype), dtype=dtype)
    if np.issubdtype(dtype, np.floating) or dtype.name in ("bfloat16", "float8_e4m3fn",
                                                           "float8_e5m2"):
        return np.asarray(rng.standard_normal(shape), dtype=dtype)
    if dtype == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)
    if np.issubdtype(dtype, np.integer):
        return np.asarray(rng.integers(0, 4, size=shape), dtype=dtype)
    raise unverifiable(f"kiln cannot make random values of dtype {dtype} (input {name!r})")


def static_input_shapes(model: ir.Model) -> dict[str, tuple[list[int], np.dtype]]:
    """Shape and dtype of every graph input; a zero-length dimension is static."""
    shapes = {}
    sizes = {name: lo for name, (lo, _hi) in symbolic.model_ranges(model).items()}
    for value in kir.graph_inputs(model):
        dims = kir.shape_list(value)
        if value.shape is not None and sizes:  # a symbolic build verifies at the low end
            dims = [sizes.get(str(d), d) if not isinstance(d, int) else d for d in dims]
        if value.shape is None or any(not isinstance(d, int) or d < 0 for d in dims):
            raise FrontendError(f"input {value.name!r} has dynamic shape {dims}: bind it with "
                                f"--input {value.name}=DxDx... (a symbol: --dim NAME=LO..HI) "
                                "or the spec's `inputs:`",
                                input_key=value.name)
        try:
            dtype = kir.numpy_dtype(value)
        except Exception as error:
            raise unverifiable(f"input {value.name!r} has type {value.dtype}, which numpy "
                               f"cannot hold ({error})") from None
        shapes[value.name] = (list(dims), dtype)
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
        feeds = {other: _random_array(rng, s, d, other) for other, (s, d) in shapes.items()
                 if other != name}
        feeds[name] = np.ascontiguousarray(pixels[None]).astype(dtype)
        samples.append(feeds)
    return samples


def make_samples(model: ir.Model, spec: Spec, *, count: int | None = None,
                 seed: int | None = None) -> list[Feeds]:
    """Inputs for verification and calibration: the spec's npz or folder samples, or seeded
    random inputs drawn where the graph says they are valid (:mod:`.input_ranges`)."""
    shapes = static_input_shapes(model)
    count = count or spec.verify.samples
    source = spec.calibration.source
    if isinstance(source, NpzSource):
        return _npz_samples(Path(source.path), shapes, count)
    if isinstance(source, FolderSource):
        return _folder_samples(Path(source.path), spec.calibration.preprocess, shapes, count,
                               spec.calibration.seed if seed is None else seed)
    if isinstance(source, CallableSource):
        return callable_samples(source, shapes, count, spec.source)
    return random_samples(model, shapes, count, spec.verify.seed if seed is None else seed)


def random_samples(model: ir.Model, shapes: dict[str, tuple[list[int], np.dtype]], count: int,
                   seed: int) -> list[Feeds]:
    rng = np.random.default_rng(seed)
    draws = input_draws(model)
    return [{name: _random_array(rng, shape, dtype, name, draws.get(name))
             for name, (shape, dtype) in shapes.items()} for _ in range(count)]


def verification_samples(model: ir.Model, spec: Spec) -> list[Feeds]:
    """The verification inputs: ``verify.inputs`` when the spec gives them (errors point at
    that key), else :func:`make_samples` (errors about a calibration file point at
    ``calibration.source``; errors about the model itself point nowhere in the spec)."""
    given = spec.verify.inputs
    if given is not None:
        shapes = static_input_shapes(model)
        try:
            return _npz_samples(Path(given.path), shapes, spec.verify.samples)
        except SpecError as error:
            raise spec.error(("verify", "inputs"), error.detail) from None
    if isinstance(spec.calibration.source, NpzSource | FolderSource | CallableSource):
        try:
            return make_samples(model, spec)
        except SpecError as error:
            if error.file is None and error.line is None:
                raise spec.error(("calibration", "source"), error.detail) from None
            raise
    return make_samples(model, spec)


def reference_outputs(run, model: ir.Model) -> list:
    """``run(model)`` (ONNX Runtime on the verification inputs); when ONNX Runtime cannot
    load or run the model on them, verification could not be done (a clean error)."""
    try:
        return run(model)
    except VerificationError as error:
        raise unverifiable(f"ONNX Runtime cannot run the reference on kiln's inputs "
                           f"({str(error).split(': ', 1)[-1]})") from None
    except KilnError:
        raise


def compare(reference: Sequence[Sequence[np.ndarray]], actual: Sequence[Sequence[np.ndarray]],
            output_names: Sequence[str], *, rtol: float, atol: float) -> ErrorMetrics:
    """Error of ``actual`` against ``reference``: per sample, per output. An output whose
    shape or dtype differs from the reference's is a VerificationError naming it."""
    worst_sqnr = math.inf
    worst_name = output_names[0] if output_names else "?"
    worst_ref = 0.0
    max_err = 0.0
    ok = True
    per_output: dict[str, float] = {}
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
            if ref.dtype != act.dtype:  # an int32 Indices where ONNX says int64 is wrong too
                raise VerificationError(f"output {name!r} changed dtype from {ref.dtype} "
                                        f"(reference) to {act.dtype}", output=name)
            if ref.dtype.kind in "biu":
                diff = (ref != act).astype(np.float64)
                ref64 = ref.astype(np.float64)
            else:
                ref64 = ref.astype(np.float64)
                act64 = act.astype(np.float64)
                same = equal_nonfinite(ref64, act64)
                ref64 = np.where(same, 0.0, ref64)
                diff = np.where(same, 0.0, ref64 - np.where(same, 0.0, act64))
            if not np.all(np.isfinite(diff)):
                noise = math.inf
                out_err = math.inf
                continue
            signal += float(np.sum(ref64 ** 2))
            noise += float(np.sum(diff ** 2))
            ref_max = max(ref_max, float(np.max(np.abs(ref64))) if ref64.size else 0.0)
            out_err = max(out_err, float(np.max(np.abs(diff))) if diff.size else 0.0)
        sqnr = sqnr_db_from_sums(signal, noise)
        per_output[name] = sqnr
        if out_err > atol + rtol * ref_max:
            ok = False
        if sqnr < worst_sqnr or (worst_sqnr == math.inf and k == 0):
            worst_sqnr, worst_name, worst_ref = sqnr, name, ref_max
        max_err = max(max_err, out_err)
    return ErrorMetrics(worst_sqnr, max_err, worst_name, worst_ref, ok, per_output)
