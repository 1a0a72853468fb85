"""Channel-pruned benchmark cases: a model with half its channels removed by kiln's
``prune_channels`` (``amount: 0.5``, l1, no fine-tuning) next to the dense original, so the
runner gives kiln's and ONNX Runtime's latency and the built size of both:

channel-dense-cnn / channel-pruned-cnn  ``prune_models.coupled_cnn`` at width 64 on a
    1x4x32x32 input (residual add, depthwise conv + BatchNorm, concat, grouped conv,
    pooled Gemm head): 64 -> 32 coupled channels, the grouped conv keeps 1 of its 2 groups.
channel-dense-mlp / channel-pruned-mlp  ``prune_models.mlp`` 256 -> 1024 -> 1024 -> 10 on
    a batch of 32 (MatMul + bias, Gemm): 1024 -> 512 neurons in both hidden layers.

The pruned files are what ``kiln compile`` writes as model.onnx: shapes really shrink.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.case import SEED, PreparedCase

CNN = {"width": 64, "size": 32}
MLP = {"d_in": 256, "hidden": 1024, "d_out": 10, "batch": 32}
AMOUNT = 0.5


def _model(kind: str):
    from kiln.compiler.testing import prune_models

    if kind == "cnn":
        return prune_models.coupled_cnn(seed=SEED, **CNN)
    return prune_models.mlp(seed=SEED, **MLP)


def _case(kind: str, pruned: bool) -> Callable[[Path], PreparedCase]:
    name = f"channel-{'pruned' if pruned else 'dense'}-{kind}"

    def prepare(workdir: Path) -> PreparedCase:
        import onnx

        from kiln.compiler.core import graph as kir
        from kiln.passes.prune.prune_channels import PruneChannels, PruneChannelsConfig

        path = workdir / f"{name}.onnx"
        if not path.exists():
            model = _model(kind)
            if pruned:
                assert PruneChannels(PruneChannelsConfig(amount=AMOUNT))(model).modified
            workdir.mkdir(parents=True, exist_ok=True)
            onnx.save(kir.to_proto(model), path)
        shape = [1, 4, CNN["size"], CNN["size"]] if kind == "cnn" else [MLP["batch"],
                                                                         MLP["d_in"]]
        x = np.random.default_rng(SEED).standard_normal(shape).astype(np.float32)
        return PreparedCase(name=name, onnx_path=path, input_shapes={"x": shape}, inputs={"x": x})

    return prepare


PRUNE_CASES: dict[str, Callable[[Path], PreparedCase]] = {
    f"channel-{state}-{kind}": _case(kind, state == "pruned")
    for kind in ("cnn", "mlp") for state in ("dense", "pruned")}
