"""Frontends: bring a model into kiln's one IR (``onnx_ir.Model``).

Accepted sources:
- an ``.onnx`` file (external data next to it is supported);
- a ``.pt2`` file written by ``torch.export.save``;
- ``package.module:callable`` or ``path/to/file.py:callable`` returning
  ``(torch.nn.Module, example_inputs)``;
- a Hugging Face checkpoint folder (``config.json``, a Llama-style decoder): one decoder
  step with a KV cache (:mod:`kiln.compiler.core.llm_export`, docs/llm.md).

PyTorch models go through ``torch.onnx.export(..., dynamo=True)``, which
returns an ``onnx_ir`` model whose nodes keep their module paths. Then input
shapes are bound (``--input`` / the spec's ``inputs:``) and constants folded
with ``onnxscript.optimizer`` so that dynamic Reshape/Resize become static.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import os
import sys
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx_ir as ir

from kiln.compiler.core import llm_export
from kiln.compiler.core.errors import FrontendError

logger = logging.getLogger(__name__)

InputShapes = Mapping[str | int, Sequence[int]]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def parse_input_binding(text: str) -> tuple[str, list[int]]:
    """``NAME=1x3x640x640`` -> ('NAME', [1, 3, 640, 640])."""
    name, sep, dims = text.partition("=")
    if not sep or not name or not dims:
        raise FrontendError(f"--input {text!r}: expected NAME=DIMxDIMx... (e.g. x=1x3x224x224)")
    try:
        shape = [int(d) for d in dims.lower().split("x")]
    except ValueError:
        raise FrontendError(f"--input {text!r}: dims must be integers separated by 'x'") from None
    if any(d <= 0 for d in shape):
        raise FrontendError(f"--input {text!r}: dims must be positive")
    return name, shape


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Fail early, naming the tensor and file, when external data is missing or short."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            location = Path(tensor.base_dir or path.parent) / tensor.location
            if not location.exists():
                raise FrontendError(
                    f"{path}: initializer {value.name!r} needs external data file "
                    f"{tensor.location!r}, which is missing")
            end = (tensor.offset or 0) + (tensor.length or 0)
            if tensor.length is not None and location.stat().st_size < end:
                raise FrontendError(
                    f"{path}: external data file {tensor.location!r} is too short for "
                    f"initializer {value.name!r} (needs {end} bytes)")


def load_onnx(path: Path) -> ir.Model:
    if not path.exists():
        raise FrontendError(f"{path}: no such file")
    if path.is_dir():
        raise FrontendError(f"{path}: is a folder, expected an .onnx file")
    try:
        model = ir.load(path)
    except Exception as error:  # protobuf decode errors have no common base class
        raise FrontendError(f"{path}: not a readable ONNX model ({_first_line(error)})") from error
    if len(model.graph) == 0 and not model.graph.outputs:
        raise FrontendError(f"{path}: not a readable ONNX model (empty graph)")
    _check_external_data(model, path)
    # Bring external tensors into memory so outputs never depend on the input's folder.
    try:
        ir.external_data.load_to_model(model)
    except Exception as error:
        raise FrontendError(f"{path}: cannot read external data ({_first_line(error)})") from error
    return model


def _export_torch(module, args, source: str) -> ir.Model:
    try:
        import torch
    except ImportError:
        raise FrontendError(f"{source}: PyTorch is not installed (pip install torch)") from None
    if not isinstance(args, tuple):
        args = tuple(args) if isinstance(args, list) else (args,)
    buffer = io.StringIO()
    # The exporter logs progress to stdout and warns about missing torchvision ops.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buffer), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # optimize=False: the exporter would fold BatchNorm itself; that is a pass the
            # spec chooses (fold_batchnorm). kiln folds constants in fold_constants().
            program = torch.onnx.export(module, args, dynamo=True, verbose=False,
                                        optimize=False)
    except Exception as error:
        raise FrontendError(f"{source}: torch.onnx.export failed ({_first_line(error)})") from error
    if program is None:
        raise FrontendError(f"{source}: torch.onnx.export returned no program")
    return program.model


class _CollectRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def load_pt2(path: Path) -> ir.Model:
    if not path.exists():
        raise FrontendError(f"{path}: no such file")
    if path.is_dir():
        raise FrontendError(f"{path}: is a folder, expected a .pt2 file")
    if not zipfile.is_zipfile(path):
        # torch.export.load would log a traceback before failing on a non-archive.
        raise FrontendError(f"{path}: not a torch.export program (not a .pt2 zip archive)")
    try:
        import torch
    except ImportError:
        raise FrontendError(f"{path}: PyTorch is not installed (pip install torch)") from None
    # torch.export.load logs the real failure (with a traceback) as a warning, then raises
    # "check the warnings above": keep the log record and report its error instead.
    export_log = logging.getLogger("torch.export")
    collected = _CollectRecords()
    handlers, propagate = export_log.handlers[:], export_log.propagate
    export_log.handlers, export_log.propagate = [collected], False
    try:
        program = torch.export.load(str(path))
    except Exception as error:
        cause = next((r.exc_info[1] for r in collected.records if r.exc_info), None) or error
        raise FrontendError(f"{path}: not a torch.export program ({_first_line(cause)})") from error
    finally:
        export_log.handlers, export_log.propagate = handlers, propagate
    return _export_torch(program, (), str(path))


def _import_callable(source: str):
    target, _, attr = source.rpartition(":")
    if not target or not attr:
        raise FrontendError(f"{source}: expected MODULE:CALLABLE")
    try:
        if target.endswith(".py"):
            file = Path(target)
            if not file.exists():
                raise FrontendError(f"{source}: no such file {target!r}")
            spec = importlib.util.spec_from_file_location(file.stem, file)
            if spec is None or spec.loader is None:
                raise FrontendError(f"{source}: cannot import {target!r}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except FrontendError:
        raise
    except Exception as error:
        raise FrontendError(f"{source}: cannot import {target!r} ({_first_line(error)})") from error
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise FrontendError(f"{source}: {target!r} has no callable {attr!r}")
    return factory


def load_callable(source: str) -> ir.Model:
    factory = _import_callable(source)
    try:
        result = factory()
    except Exception as error:
        raise FrontendError(f"{source}: calling it failed ({_first_line(error)})") from error
    if not (isinstance(result, tuple) and len(result) == 2):
        raise FrontendError(f"{source}: must return (torch.nn.Module, example_inputs)")
    module, args = result
    if hasattr(module, "eval"):
        module.eval()
    return _export_torch(module, args, source)


def bind_inputs(model: ir.Model, shapes: InputShapes, *, source: str = "model") -> None:
    """Give graph inputs static shapes; keys are input names or positions."""
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    by_name = {v.name or "": v for v in inputs}
    for key, dims in shapes.items():
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit() and key not in by_name):
            index = int(key)
            if index >= len(inputs):
                raise FrontendError(f"{source}: input #{index} does not exist "
                                    f"(the model has {len(inputs)} inputs)")
            value = inputs[index]
        elif key in by_name:
            value = by_name[key]
        else:
            names = ", ".join(by_name) or "none"
            raise FrontendError(f"{source}: no input named {key!r} (inputs: {names})",
                                input_key=key)
        # a str dim is a symbol (kiln.compiler.driver.symbolic): it stays symbolic
        dims = [d if isinstance(d, str) else int(d) for d in dims]
        if value.shape is not None and len(value.shape) != len(dims):
            raise FrontendError(f"{source}: input {value.name!r} has rank {len(value.shape)}, "
                                f"got shape {dims}")
        if value.shape is not None:
            for axis, (old, new) in enumerate(zip(value.shape.dims, dims)):
                if isinstance(old, int) and old > 0 and old != new:
                    raise FrontendError(f"{source}: input {value.name!r} dim {axis} is fixed at "
                                        f"{old}, got {new}")
        value.shape = ir.Shape(dims)


def fold_constants(model: ir.Model) -> None:
    """Shape inference and constant folding, in place, so later stages see static shapes.

    Only folding and clean-up: no pattern rewrites (onnxscript's default rules fuse
    BatchNorm and dedupe initializers, which are kiln passes the spec chooses).
    """
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants as fold

    try:
        common.InlinePass()(model)
        for _ in range(2):
            result = fold(model, onnx_shape_inference=True, input_size_limit=1 << 22,
                          output_size_limit=1 << 26)
            common.RemoveUnusedNodesPass()(model)
            if not result.modified:
                break
        common.RemoveUnusedFunctionsPass()(model)
        common.RemoveUnusedOpsetsPass()(model)
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        common.OutputFixPass()(model)
        common.NameFixPass()(model)
    except Exception as error:
        raise FrontendError(f"constant folding failed ({_first_line(error)})") from error


def load_model(source: str | os.PathLike, *, input_shapes: InputShapes | None = None,
               fold: bool = True) -> ir.Model:
    """Load any supported source into an ``onnx_ir.Model`` (shapes bound, constants folded)."""
    text = os.fspath(source)
    path = Path(text)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        model = load_onnx(path)
    elif suffix == ".pt2":
        model = load_pt2(path)
    elif ":" in text and not path.exists():
        model = load_callable(text)
    elif llm_export.is_llm_folder(path):
        model = llm_export.export_decoder(path)
    elif path.exists():
        # An ONNX file with another extension: try it, with a clear error if it is not ONNX.
        model = load_onnx(path)
    else:
        raise FrontendError(f"{text}: no such file (expected .onnx, .pt2, MODULE:CALLABLE or a "
                            "checkpoint folder)")
    if input_shapes:
        bind_inputs(model, input_shapes, source=text)
    if fold:
        fold_constants(model)
    return model
