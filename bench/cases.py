"""The benchmark cases by name: each yields an ONNX model, its inputs, and optionally a
torch callable (:class:`bench.case.PreparedCase`); the quantized ones are
``bench.cases_quant``'s.

Models are built lazily (the torch export and the OCR wheel fetch take seconds).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.case import SEED, PreparedCase, random_inputs
from bench.cases_blocks import BLOCK_CASES
from bench.cases_llm import LLM_CASES
from bench.cases_moe import MOE_CASES
from bench.cases_prune import PRUNE_CASES
from bench.cases_quant import QUANT_CASES
from bench.cases_sparse import SPARSE_CASES


def _encoder(workdir: Path) -> PreparedCase:
    import torch

    from kiln.compiler.testing.torch_models import encoder

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
        from kiln.compiler.testing.real_models import rapidocr_input_shape, rapidocr_model

        shapes = rapidocr_input_shape(which)
        return PreparedCase(name=f"ocr-{which}-fp32", onnx_path=rapidocr_model(which),
                            input_shapes=shapes, inputs=random_inputs(shapes))

    return prepare


def _ocr_rec_dynamic_width(workdir: Path) -> PreparedCase:
    """PP-OCRv4 rec built once for every line width W=16..1024 (a symbolic dim), run at
    W=320: compare with ocr-rec-fp32 (built for W=320 alone); the goal is within 1.2x."""
    from kiln.compiler.testing.real_models import rapidocr_model

    return PreparedCase(name="ocr-rec-dynamic-width", onnx_path=rapidocr_model("rec"),
                        input_shapes={"x": [1, 3, 48, "W=16..1024"]},
                        inputs=random_inputs({"x": [1, 3, 48, 320]}))


def _held_out(name: str) -> Callable[[Path], PreparedCase]:
    """A real model from a PyPI wheel that kiln's rules were never tuned on."""
    def prepare(workdir: Path) -> PreparedCase:
        from kiln.compiler.testing.real_models import held_out_input_shape, held_out_model

        shapes = held_out_input_shape(name)
        return PreparedCase(name=f"{name}-fp32", onnx_path=held_out_model(name),
                            input_shapes=shapes, inputs=random_inputs(shapes))

    return prepare


def _resnet50(workdir: Path) -> PreparedCase:
    from kiln.compiler.testing.real_models import light_model, light_model_io

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
    "ocr-rec-dynamic-width": _ocr_rec_dynamic_width,  # one build for W=16..1024, run at 320
    "resnet50-fp32": _resnet50,
    "gemv-fp32": _matmul_case("gemv-fp32", 1, 4096, 4096),
    "matmul-fp32": _matmul_case("matmul-fp32", 128, 1024, 256),
    # one step of an LSTM with 512 hidden units: the weights fit in cache
    "gemv-cached-fp32": _matmul_case("gemv-cached-fp32", 1, 512, 2048),
    # held out: never used to tune kiln's rules
    "yolox-det-fp32": _held_out("yolox-det"),
    "lcnet-orientation-fp32": _held_out("lcnet-orientation"),
    "picodet-layout-fp32": _held_out("picodet-layout"),
    **QUANT_CASES,
    **MOE_CASES,
    **SPARSE_CASES,
    **BLOCK_CASES,
    **PRUNE_CASES,
    **LLM_CASES,
}
