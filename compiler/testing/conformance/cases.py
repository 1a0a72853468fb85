"""ONNX's backend test cases, generated from the onnx wheel and cached on disk.

The wheel ships the node-test *generators* (``onnx/backend/test/case/node/``, one
module per op) but not their data, so :func:`node_cases_dir` runs them once
(``onnx.backend.test.case.node.collect_testcases``, the same machinery as onnx's
``cmd_tools generate-data``) and writes each case as onnx's runner lays it out
(``model.onnx`` + ``test_data_set_0/{input,output}_N.pb``) under
``~/.cache/kiln/conformance/onnx-<version>/node`` (``KILN_CACHE`` moves the root).
Generation takes a few seconds and happens under a lock into a temporary folder that
is renamed into place, so parallel test workers never see half a cache.

The wheel's model tests (``data/{simple,pytorch-converted,pytorch-operator}``) are read
where they lie; ``data/light`` models (real CNNs) get inputs the way onnx's runner makes
them (``generate_dummy_data``, seed 0) and the expected output the wheel ships.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

#: the model-test folders of the wheel, by kind
MODEL_KINDS = ("simple", "pytorch-converted", "pytorch-operator", "light")
#: element types of the headline figure (the issue's filter)
HEADLINE_DTYPES = frozenset({"bool", "float32", "int8", "int16", "int32", "int64", "uint8",
                             "uint16", "uint32", "uint64"})
#: element types of the second figure (the headline's plus half floats)
EXTENDED_DTYPES = HEADLINE_DTYPES | {"float16", "bfloat16"}
HEADLINE_MAX_OPSET = 21
#: the figures a case can count in (see :meth:`Case.in_figure`)
FIGURES = ("headline", "all-opsets", "extended")
#: onnx's backend runner compares with these unless a case says otherwise
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-7


@dataclass(frozen=True)
class Case:
    """One conformance case: a model and one data set of inputs and expected outputs."""

    name: str
    kind: str                     # node | simple | pytorch-converted | pytorch-operator | light
    op: str                       # the op under test (node tests), else the kind
    directory: str                # holds model.onnx (light: the wheel's .onnx file's folder)
    opset: int                    # the ai.onnx opset the model imports
    domains: tuple[str, ...]      # other op domains it imports
    input_types: tuple[str, ...]  # element type names, or "sequence"/"optional"/"map"
    output_types: tuple[str, ...]
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    model_file: str = "model.onnx"

    @property
    def model_path(self) -> Path:
        return Path(self.directory) / self.model_file

    @property
    def tensor_only(self) -> bool:
        return not any(t in ("sequence", "optional", "map", "sparse")
                       for t in self.input_types + self.output_types)

    def in_figure(self, figure: str) -> bool:
        """In a figure (:data:`FIGURES`): ``headline`` (headline dtypes, opset <= 21),
        ``all-opsets`` (headline dtypes, any opset: the issue's filter) or ``extended``
        (+ float16/bfloat16, any opset)."""
        if not self.tensor_only or self.domains:
            return False
        types = set(self.input_types + self.output_types)
        if figure == "headline":
            return types <= HEADLINE_DTYPES and self.opset <= HEADLINE_MAX_OPSET
        if figure == "all-opsets":
            return types <= HEADLINE_DTYPES
        return types <= EXTENDED_DTYPES

    @property
    def figures(self) -> list[str]:
        return [f for f in FIGURES if self.in_figure(f)]

    def load_data(self) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """(feeds by input name, expected outputs in graph order)."""
        model = onnx.load(self.model_path, load_external_data=False)
        inits = {i.name for i in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in inits]
        if self.kind == "light":
            return _light_data(self, model, inputs)
        data = Path(self.directory) / "test_data_set_0"
        feeds = {value.name: _read_tensor(data / f"input_{j}.pb")
                 for j, value in enumerate(inputs)}
        expected = [_read_tensor(data / f"output_{j}.pb")
                    for j in range(len(model.graph.output))]
        return feeds, expected


def _read_tensor(path: Path) -> np.ndarray:
    tensor = onnx.TensorProto()
    tensor.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(tensor)


def _light_data(case: Case, model: onnx.ModelProto, inputs) -> tuple[dict, list]:
    from onnx.backend.test.runner import Runner

    feeds = {value.name: Runner.generate_dummy_data(value, seed=0, name=case.name,
                                                    random=False) for value in inputs}
    prefix = case.model_path.with_suffix("")
    expected = [_read_tensor(Path(f"{prefix}_output_{j}.pb"))
                for j in range(len(model.graph.output))]
    return feeds, expected


def _type_name(value_type: onnx.TypeProto) -> str:
    which = value_type.WhichOneof("value")
    if which == "tensor_type":
        return onnx.helper.tensor_dtype_to_np_dtype(value_type.tensor_type.elem_type).name \
            if value_type.tensor_type.elem_type not in _SPECIAL_DTYPES else \
            _SPECIAL_DTYPES[value_type.tensor_type.elem_type]
    if which == "sparse_tensor_type":
        return "sparse"
    return {"sequence_type": "sequence", "optional_type": "optional",
            "map_type": "map"}.get(which or "", "unknown")


#: element types numpy names oddly (ml_dtypes) or not at all
_SPECIAL_DTYPES = {
    onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.STRING: "string",
    onnx.TensorProto.FLOAT8E4M3FN: "float8e4m3fn", onnx.TensorProto.FLOAT8E4M3FNUZ:
    "float8e4m3fnuz", onnx.TensorProto.FLOAT8E5M2: "float8e5m2",
    onnx.TensorProto.FLOAT8E5M2FNUZ: "float8e5m2fnuz", onnx.TensorProto.UINT4: "uint4",
    onnx.TensorProto.INT4: "int4", onnx.TensorProto.FLOAT4E2M1: "float4e2m1",
    onnx.TensorProto.COMPLEX64: "complex64", onnx.TensorProto.COMPLEX128: "complex128",
}
for _name in ("FLOAT8E8M0", "UINT2", "INT2"):
    if hasattr(onnx.TensorProto, _name):
        _SPECIAL_DTYPES[getattr(onnx.TensorProto, _name)] = _name.lower()


def _describe(model: onnx.ModelProto, name: str, kind: str, op: str, directory: Path,
              model_file: str = "model.onnx", rtol: float = DEFAULT_RTOL,
              atol: float = DEFAULT_ATOL) -> Case:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    domains = tuple(sorted(o.domain for o in model.opset_import
                           if o.domain not in ("", "ai.onnx")))
    inits = {i.name for i in model.graph.initializer}
    return Case(name=name, kind=kind, op=op, directory=str(directory), opset=opset,
                domains=domains,
                input_types=tuple(_type_name(i.type) for i in model.graph.input
                                  if i.name not in inits),
                output_types=tuple(_type_name(o.type) for o in model.graph.output),
                rtol=rtol, atol=atol, model_file=model_file)


def cache_root() -> Path:
    base = os.environ.get("KILN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kiln")
    return Path(base) / "conformance" / f"onnx-{onnx.__version__}"


def _write_case(case, root: Path) -> None:
    """One generated TestCase as onnx's runner lays it out (tensor data only; others
    keep their model, so they are listed and counted as out of the figure)."""
    folder = root / case.name
    data = folder / "test_data_set_0"
    data.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(case.model.SerializeToString())
    inputs, outputs = case.data_sets[0]
    graph = case.model.graph
    for prefix, values, infos in (("input", inputs, graph.input),
                                  ("output", outputs, graph.output)):
        for j, (value, info) in enumerate(zip(values, infos)):
            if not info.type.HasField("tensor_type"):
                continue
            proto = value if isinstance(value, onnx.TensorProto) else \
                numpy_helper.from_array(np.asarray(value), info.name)
            (data / f"{prefix}_{j}.pb").write_bytes(proto.SerializeToString())


def _generate(root: Path) -> None:
    import warnings

    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        generated = node.collect_testcases()
    ops = {}
    for case in generated:
        if len(case.model.graph.node) == 1 and "_expanded" not in case.name:
            ops[case.name] = case.model.graph.node[0].op_type
    index = []
    for case in generated:
        _write_case(case, root)
        base = case.name.split("_expanded")[0]
        op = ops.get(case.name) or ops.get(base) or "?"
        if "_expanded" in case.name:
            op = f"{op} (expanded)"
        described = _describe(case.model, case.name, "node", op, root / case.name,
                              rtol=case.rtol, atol=case.atol)
        entry = asdict(described)
        entry["directory"] = case.name  # relative: the cache may move
        index.append(entry)
    (root / "index.json").write_text(json.dumps(index, indent=0))


def node_cases_dir() -> Path:
    """The cached node-test folder (generated on first use, under a lock)."""
    final = cache_root() / "node"
    if (final / "index.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "index.json").exists():
            return final
        staging = Path(tempfile.mkdtemp(prefix=".node.", dir=final.parent))
        try:
            _generate(staging)
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return final


def node_cases() -> list[Case]:
    root = node_cases_dir()
    cases = []
    for entry in json.loads((root / "index.json").read_text()):
        entry["directory"] = str(root / entry["directory"])
        for key in ("domains", "input_types", "output_types"):
            entry[key] = tuple(entry[key])
        cases.append(Case(**entry))
    return cases


def _wheel_data() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data"


#: rtol of the light models where onnx's own list gives another (case/model/__init__.py)
_LIGHT_RTOL = {"densenet121": 2e-3}


def model_cases() -> list[Case]:
    """The wheel's model tests (simple, pytorch-converted, pytorch-operator, light)."""
    cases = []
    for kind in MODEL_KINDS:
        folder = _wheel_data() / kind
        if not folder.is_dir():
            continue
        if kind == "light":
            for path in sorted(folder.glob("light_*.onnx")):
                model = onnx.load(path, load_external_data=False)
                short = path.stem[len("light_"):]
                cases.append(_describe(model, f"test_{short}", kind, kind, folder,
                                       model_file=path.name,
                                       rtol=_LIGHT_RTOL.get(short, DEFAULT_RTOL)))
            continue
        for sub in sorted(p for p in folder.iterdir() if (p / "model.onnx").exists()):
            model = onnx.load(sub / "model.onnx", load_external_data=False)
            cases.append(_describe(model, sub.name, kind, kind, sub))
    return cases


@cache
def all_cases() -> tuple[Case, ...]:
    return tuple(node_cases() + model_cases())


def select(names: list[str] | None = None, ops: list[str] | None = None,
           kinds: list[str] | None = None) -> list[Case]:
    """Cases named in ``names`` or of an op in ``ops`` (``Resize`` also takes its expanded
    cases), or every case when neither is given; ``kinds`` then keeps those kinds."""
    chosen = list(all_cases())
    if names or ops:
        wanted = set(names or ())
        keep = {o.lower() for o in ops or ()}
        missing = wanted - {c.name for c in chosen}
        if missing:
            raise ValueError(f"no conformance case named {sorted(missing)}")
        chosen = [c for c in chosen if c.name in wanted or c.op.split(" ")[0].lower() in keep]
    if kinds:
        chosen = [c for c in chosen if c.kind in kinds]
    return chosen
