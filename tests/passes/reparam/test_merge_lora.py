"""merge_lora: torch LoRA-wrapped Linears (scaled, SoRA-gated) merged in the graph through
the pipeline vs ORT; peft-style safetensors adapters mapped by module path; refusals."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.numpy import load_file, save_file

from kiln.compiler.core import graph as kir
from kiln.compiler.core.errors import KilnError
from kiln.compiler.core.frontend import load_model
from kiln.passes.reparam.merge_lora import MergeLora, MergeLoraConfig

# float32 rounding of W + s A B against the unmerged sum, relative to |y|
RTOL = 1e-5


def _run(model, x):
    session = ort.InferenceSession(kir.model_bytes(model), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _export(module, args, path):
    torch.onnx.export(module, args, path, dynamo=True)
    return path


@pytest.mark.parametrize("gated", [False, True])
def test_graph_adapters_merge_through_the_pipeline(tmp_path, gated):
    from kiln.compiler.driver.compile import compile_model
    from kiln.compiler.driver.specs import spec_from_text
    from kiln.compiler.testing.reparam_models import lora_mlp

    module, args = lora_mlp(gated=gated)
    source = _export(module, args, tmp_path / "lora.onnx")
    result = compile_model(source, spec_from_text("kiln: 1\npasses:\n  - merge_lora: {}\n"))
    report = next(p for p in result.report.passes if p.name == "merge_lora")
    assert report.matched == 2
    assert [n.op_type for n in result.model.graph] == ["MatMul", "Add", "Relu", "MatMul", "Add"]
    assert ("2 gated rank(s) dropped" in report.note) == gated
    expected = module(*args).detach().numpy()
    reference = _run(load_model(source), args[0].numpy())
    got = _run(result.model, args[0].numpy())
    np.testing.assert_allclose(got, reference, atol=RTOL * np.abs(expected).max())
    np.testing.assert_allclose(got, expected, atol=RTOL * np.abs(expected).max())
    assert result.report.passes[-1].params_after < result.report.params_source


def test_conv_lora_merges(tmp_path):
    from kiln.compiler.testing.reparam_models import lora_conv

    module, args = lora_conv()
    model = load_model(_export(module, args, tmp_path / "conv.onnx"))
    x = args[0].numpy()
    before = _run(model, x)
    merge = MergeLora()
    assert merge(model).modified
    assert [n.op_type for n in model.graph] == ["Conv"]
    expected = module(*args).detach().numpy()
    np.testing.assert_allclose(_run(model, x), before, atol=RTOL * np.abs(expected).max())
    np.testing.assert_allclose(_run(model, x), expected, atol=RTOL * np.abs(expected).max())


def test_safetensors_adapters_by_module_path(tmp_path):
    from kiln.compiler.testing.reparam_models import plain_mlp

    module, args = plain_mlp()
    model = load_model(_export(module, args, tmp_path / "mlp.onnx"))
    rng = np.random.default_rng(0)
    a1, b1 = rng.standard_normal((4, 16)), rng.standard_normal((32, 4))
    a2, b2 = rng.standard_normal((2, 32)), rng.standard_normal((8, 2))
    gate = np.array([0.0, 1.0])
    tensors = {"base_model.model.fc1.lora_A.weight": a1, "base_model.model.fc1.lora_B.weight": b1,
               "fc2.lora_A.weight": a2, "fc2.lora_B.weight": b2, "fc2.lora_gate": gate}
    path = tmp_path / "adapter.safetensors"
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(path))
    alpha = 8.0
    with torch.no_grad():
        module.fc1.weight += torch.tensor(alpha / 4 * b1 @ a1, dtype=torch.float32)
        module.fc2.weight += torch.tensor(alpha / 2 * (b2 * gate) @ a2, dtype=torch.float32)
    merge = MergeLora(MergeLoraConfig(adapters=str(path), alpha=alpha))
    assert merge(model).modified
    assert len(merge.last_candidates) == 2 and all(c.accepted for c in merge.last_candidates)
    assert "1 gated rank(s) dropped" in merge.note
    expected = module(*args).detach().numpy()
    np.testing.assert_allclose(_run(model, args[0].numpy()), expected,
                               atol=RTOL * np.abs(expected).max())


def test_unknown_adapter_and_bad_shapes_are_errors(tmp_path):
    from kiln.compiler.testing.reparam_models import plain_mlp

    module, args = plain_mlp()
    source = _export(module, args, tmp_path / "mlp.onnx")
    path = tmp_path / "adapter.safetensors"
    save_file({"fc9.lora_A.weight": np.zeros((2, 16), np.float32),
               "fc9.lora_B.weight": np.zeros((32, 2), np.float32)}, str(path))
    with pytest.raises(KilnError, match="'fc9'.*matches no MatMul/Gemm.*fc1"):
        MergeLora(MergeLoraConfig(adapters=str(path)))(load_model(source))
    save_file({"fc1.lora_A.weight": np.zeros((2, 15), np.float32),
               "fc1.lora_B.weight": np.zeros((32, 2), np.float32)}, str(path))
    with pytest.raises(KilnError, match="do not fit"):
        MergeLora(MergeLoraConfig(adapters=str(path)))(load_model(source))


def test_adapter_value_used_elsewhere_is_refused(tmp_path):
    from kiln.compiler.testing.reparam_models import lora_mlp

    module, args = lora_mlp()
    model = load_model(_export(module, args, tmp_path / "lora.onnx"))
    # expose the first adapter's A output: merging would remove a value someone reads
    lora_a = next(n for n in model.graph if kir.module_path(n) == "fc1.lora_A")
    model.graph.outputs.append(lora_a.outputs[0])
    merge = MergeLora()
    merge(model)
    refused = [c for c in merge.last_candidates if not c.accepted]
    assert len(refused) == 1 and "used outside the adapter" in refused[0].reason
    clean = load_model(tmp_path / "lora.onnx")
    assert MergeLora()(clean).modified
    assert not MergeLora()(clean).modified  # idempotent: nothing left to merge


def _adapter_file(tmp_path, module, alpha: float):
    """fc1/fc2 adapters (peft keys) in a file, and the module with them merged as peft does
    (W + alpha / r * B A)."""
    rng = np.random.default_rng(2)
    a1, b1 = rng.standard_normal((4, 16)), 0.1 * rng.standard_normal((32, 4))
    a2, b2 = rng.standard_normal((2, 32)), 0.1 * rng.standard_normal((8, 2))
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v.astype(np.float32) for k, v in {
        "base_model.model.fc1.lora_A.weight": a1, "base_model.model.fc1.lora_B.weight": b1,
        "base_model.model.fc2.lora_A.weight": a2, "base_model.model.fc2.lora_B.weight": b2,
    }.items()}, str(path))
    with torch.no_grad():
        module.fc1.weight += torch.tensor(alpha / 4 * b1 @ a1, dtype=torch.float32)
        module.fc2.weight += torch.tensor(alpha / 2 * b2 @ a2, dtype=torch.float32)
    return path


def test_file_adapters_through_the_pipeline(tmp_path):
    """kiln compile with merge_lora's ``adapters``: the merged model differs from the one
    before the pass on purpose, so it is checked as a lossy pass (it failed the exact pass's
    float32 check), and computes what torch computes with the adapters merged."""
    from kiln.compiler.driver.compile import compile_model
    from kiln.compiler.driver.specs import spec_from_text
    from kiln.compiler.testing.reparam_models import plain_mlp

    module, args = plain_mlp()
    source = _export(module, args, tmp_path / "mlp.onnx")
    path = _adapter_file(tmp_path, module, alpha=8.0)
    spec = spec_from_text(f"kiln: 1\npasses:\n  - merge_lora: {{adapters: '{path}', alpha: 8}}\n")
    result = compile_model(source, spec)
    [report] = result.report.passes
    assert report.matched == 2 and not report.exact and report.sqnr_db < 30
    expected = module(*args).detach().numpy()
    np.testing.assert_allclose(_run(result.model, args[0].numpy()), expected,
                               atol=RTOL * np.abs(expected).max())
    graph_spec = spec_from_text("kiln: 1\npasses:\n  - merge_lora: {}\n")
    assert compile_model(source, graph_spec).report.passes[0].exact


def test_file_adapters_by_torchscript_node_names(tmp_path):
    """A TorchScript export keeps no module metadata and stores transposed MatMul weights
    under generated names: the module path comes from the node names (/fc1/MatMul)."""
    from kiln.compiler.testing.reparam_models import plain_mlp

    module, args = plain_mlp()
    source = tmp_path / "mlp_ts.onnx"
    torch.onnx.export(module, args, source, dynamo=False, input_names=["x"])
    path = _adapter_file(tmp_path, module, alpha=4.0)
    model = load_model(source)
    merge = MergeLora(MergeLoraConfig(adapters=str(path), alpha=4.0))
    assert merge(model).modified and len(merge.last_candidates) == 2
    expected = module(*args).detach().numpy()
    np.testing.assert_allclose(_run(model, args[0].numpy()), expected,
                               atol=RTOL * np.abs(expected).max())


@pytest.mark.parametrize("rslora", [False, True])
def test_scale_from_peft_adapter_config(tmp_path, rslora):
    """adapter_config: peft's lora_alpha over r (sqrt(r) with use_rslora), an alpha_pattern
    entry for its module first."""
    import json

    from kiln.compiler.testing.reparam_models import plain_mlp

    module, args = plain_mlp()
    model = load_model(_export(module, args, tmp_path / "mlp.onnx"))
    reference = plain_mlp()[0]
    path = _adapter_file(tmp_path, reference, alpha=1.0)   # writes the file; reference unused
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"r": 4, "lora_alpha": 16, "alpha_pattern": {"fc2": 3},
                                  "use_rslora": rslora}))
    a = {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}
    p = "base_model.model."
    rank = {"fc1": 4, "fc2": 2}
    with torch.no_grad():
        for name, alpha in (("fc1", 16.0), ("fc2", 3.0)):
            scale = alpha / (np.sqrt(rank[name]) if rslora else rank[name])
            delta = scale * a[f"{p}{name}.lora_B.weight"] @ a[f"{p}{name}.lora_A.weight"]
            getattr(module, name).weight += torch.tensor(delta, dtype=torch.float32)
    merge = MergeLora(MergeLoraConfig(adapters=str(path), adapter_config=str(config)))
    assert merge(model).modified
    expected = module(*args).detach().numpy()
    np.testing.assert_allclose(_run(model, args[0].numpy()), expected,
                               atol=RTOL * np.abs(expected).max())
    with pytest.raises(ValueError, match="instead of alpha"):
        MergeLoraConfig(adapters=str(path), adapter_config=str(config), alpha=2.0)


@pytest.mark.parametrize("content, match", [
    ('{"lora_alpha": 16, "alpha_pattern": {"fc[": 3}}', "alpha_pattern"),
    ('{"lora_alpha": "sixteen"}', "lora_alpha"),
    ("[1, 2]", "no JSON object"),
    ("{not json", "not a JSON file"),
])
def test_bad_adapter_config_is_one_clear_error(tmp_path, content, match):
    from kiln.compiler.testing.reparam_models import plain_mlp

    module, args = plain_mlp()
    model = load_model(_export(module, args, tmp_path / "mlp.onnx"))
    path = _adapter_file(tmp_path, plain_mlp()[0], alpha=1.0)
    config = tmp_path / "adapter_config.json"
    config.write_text(content)
    merge = MergeLora(MergeLoraConfig(adapters=str(path), adapter_config=str(config)))
    with pytest.raises(KilnError, match=match):
        merge(model)
