"""Calibration samples from a Python callable: ``calibration.source: module:function`` (an
importable module) or ``file.py:function`` (a file, relative to the working folder or to
the spec's folder).

The function is called as ``function(count)`` when it takes an argument (the number of
samples kiln wants), else as ``function()``; it returns or yields dicts of input name ->
array. Each array has the input's shape, or that shape without its leading batch 1; it
is cast to the input's dtype. Any problem is a SpecError naming the source.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kiln.compiler.core.errors import SpecError
from kiln.compiler.core.spec.schema import CallableSource

Feeds = dict[str, np.ndarray]


def _load_file(path: Path, text: str):
    name = f"kiln_calibration_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"calibration source {text!r}: {str(path)!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise SpecError(f"calibration source {text!r}: {path} failed to import "
                        f"({type(error).__name__}: {error})") from None
    return module


def resolve(source: CallableSource, spec_file: str | None = None):
    """The function a callable source names (SpecError if it cannot be found)."""
    text = source.yaml_form()
    if source.module.endswith(".py"):
        path = Path(source.module)
        candidates = [path] + ([Path(spec_file).parent / path]
                               if spec_file and not path.is_absolute() else [])
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise SpecError(f"calibration source {text!r}: file {source.module!r} does not exist")
        module = _load_file(found, text)
    else:
        try:
            module = importlib.import_module(source.module)
        except Exception as error:
            raise SpecError(f"calibration source {text!r}: cannot import module "
                            f"{source.module!r} ({type(error).__name__}: {error})") from None
    function = getattr(module, source.function, None)
    if not callable(function):
        raise SpecError(f"calibration source {text!r}: {source.module!r} has no function "
                        f"{source.function!r}")
    return function


def _takes_count(function) -> bool:
    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
               for p in params)


def _feeds(sample: Any, index: int, shapes: dict[str, tuple[list[int], np.dtype]],
           text: str) -> Feeds:
    if not isinstance(sample, Mapping):
        raise SpecError(f"calibration source {text!r}: sample {index} is a "
                        f"{type(sample).__name__}, not a dict of input name -> array")
    missing = [name for name in shapes if name not in sample]
    if missing:
        raise SpecError(f"calibration source {text!r}: sample {index} lacks inputs {missing} "
                        f"(has {sorted(map(str, sample))})")
    feeds: Feeds = {}
    for name, (shape, dtype) in shapes.items():
        array = np.asarray(sample[name])
        if list(array.shape) != shape and shape[:1] == [1] and list(array.shape) == shape[1:]:
            array = array[None]
        if list(array.shape) != shape:
            raise SpecError(f"calibration source {text!r}: sample {index} input {name!r} has "
                            f"shape {list(array.shape)}, expected {shape}")
        feeds[name] = np.ascontiguousarray(array.astype(dtype, copy=False))
    return feeds


def callable_samples(source: CallableSource, shapes: dict[str, tuple[list[int], np.dtype]],
                     count: int, spec_file: str | None = None) -> list[Feeds]:
    """Up to ``count`` samples from the callable (fewer if it yields fewer; none is an error)."""
    text = source.yaml_form()
    function = resolve(source, spec_file)
    try:
        produced = function(count) if _takes_count(function) else function()
        if isinstance(produced, Mapping):
            produced = [produced]
        raw = list(itertools.islice(iter(produced), count))
    except SpecError:
        raise
    except Exception as error:
        raise SpecError(f"calibration source {text!r} failed: {type(error).__name__}: "
                        f"{error}") from None
    if not raw:
        raise SpecError(f"calibration source {text!r} yielded no samples")
    return [_feeds(sample, i, shapes, text) for i, sample in enumerate(raw)]
