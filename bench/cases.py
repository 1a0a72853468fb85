"""The benchmark cases: each yields an ONNX model, its inputs, and optionally a torch callable.

Models are built lazily (the torch export and the OCR wheel fetch take seconds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

SEED = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreparedCase:
    """What one case gives the runner."""

    name: str
    onnx_path: Path  # the model ORT runs as is and kiln compiles
    input_shapes: dict[str, list[int]]
    inputs: dict[str, np.ndarray]
    torch_fn: Callable[[], object] | None = None  # runs eager once on the same inputs
    flops: float | None = None


def _random_inputs(shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _encoder(workdir: Path) -> PreparedCase:
    import torch

    from tests.torch_models import encoder

    model, (example,) = encoder()
    path = workdir / "encoder-fp32.onnx"
    if not path.exists():
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["x"])
        program.save(str(path))
    x = example.numpy()

    def run_torch():
        with torch.inference_mode():
            return model(example)

    return PreparedCase(name="encoder-fp32", onnx_path=path, input_shapes={"x": list(x.shape)},
                        inputs={"x": x}, torch_fn=run_torch)


def _rapidocr(which: str) -> Callable[[Path], PreparedCase]:
    def prepare(workdir: Path) -> PreparedCase:
        from tests.real_models import rapidocr_input_shape, rapidocr_model

        shapes = rapidocr_input_shape(which)
        return PreparedCase(name=f"ocr-{which}-fp32", onnx_path=rapidocr_model(which),
                            input_shapes=shapes, inputs=_random_inputs(shapes))

    return prepare


def _resnet50(workdir: Path) -> PreparedCase:
    from tests.real_models import light_model, light_model_io

    inputs, _ = light_model_io("resnet50")
    return PreparedCase(name="resnet50-fp32", onnx_path=light_model("resnet50"),
                        input_shapes={k: list(v.shape) for k, v in inputs.items()}, inputs=inputs)


def _matmul_case(name: str, m: int, k: int, n: int) -> Callable[[Path], PreparedCase]:
    """``Y = X @ W`` with a constant fp32 weight, written as a one-node ONNX model."""

    def prepare(workdir: Path) -> PreparedCase:
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(SEED)
        weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        path = workdir / f"{name}.onnx"
        if not path.exists():
            graph = helper.make_graph(
                [helper.make_node("MatMul", ["x", "w"], ["y"])], name,
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                initializer=[numpy_helper.from_array(weight, "w")])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            onnx.save(model, path)
        x = rng.standard_normal((m, k)).astype(np.float32)

        import torch

        tx, tw = torch.from_numpy(x), torch.from_numpy(weight)

        def run_torch():
            with torch.inference_mode():
                return torch.matmul(tx, tw)

        return PreparedCase(name=name, onnx_path=path, input_shapes={"x": [m, k]},
                            inputs={"x": x}, torch_fn=run_torch, flops=2.0 * m * k * n)

    return prepare


CASES: dict[str, Callable[[Path], PreparedCase]] = {
    "encoder-fp32": _encoder,
    "ocr-det-fp32": _rapidocr("det"),
    "ocr-rec-fp32": _rapidocr("rec"),
    "ocr-cls-fp32": _rapidocr("cls"),
    "resnet50-fp32": _resnet50,
    "gemv-fp32": _matmul_case("gemv-fp32", 1, 4096, 4096),
    "matmul-fp32": _matmul_case("matmul-fp32", 128, 1024, 256),
}

from bench.cases_quant import QUANT_CASES  # noqa: E402 (quantized cases; they use PreparedCase)
CASES.update(QUANT_CASES)
