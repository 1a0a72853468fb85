"""Selectors over op types, node names, module paths (globs and regexes) and weights."""

from __future__ import annotations

import pytest

from kiln.compiler.core.frontend import load_model
from kiln.compiler.core.selectors import select_nodes
from kiln.compiler.core.spec import Selector


@pytest.fixture(scope="module")
def example():
    return load_model("compiler/core/examples/tiny_cnn.onnx")


@pytest.fixture(scope="module")
def torch_cnn():
    return load_model("kiln.compiler.testing.torch_models:cnn_with_batchnorm")


def _names(model, **selector):
    return [n.name for n in select_nodes(model, Selector(**selector))]


def test_op_and_name_globs(example):
    assert _names(example, op="Conv") == ["stem.conv", "left.conv", "right.conv"]
    assert _names(example, op=["Conv", "Gemm"], name="*t.conv") == ["left.conv", "right.conv"]
    assert _names(example, name="head.*") == ["head.fc", "head.scale", "head.shift"]


def test_regex_is_a_full_match(example):
    assert _names(example, name=r"re:(left|right)\.conv") == ["left.conv", "right.conv"]
    assert _names(example, name=r"re:left") == []


def test_exclude_and_param(example):
    assert _names(example, op="Conv", exclude={"name": "stem.*"}) == ["left.conv", "right.conv"]
    assert _names(example, param={"min_elements": 2000}) == ["left.conv", "right.conv"]
    assert _names(example, op="Gemm", param={"ndim": 2}) == ["head.fc"]
    assert _names(example, op="Relu", param={"ndim": 2}) == []


def test_module_paths_from_pytorch(torch_cnn):
    assert _names(torch_cnn, module="stem.*") != []
    convs = select_nodes(torch_cnn, Selector(op="Conv", module="block.*"))
    assert len(convs) == 1
    assert _names(torch_cnn, module="head") == [n.name for n in torch_cnn.graph
                                               if n.op_type == "Gemm"]
    assert _names(torch_cnn, op="Conv", module="re:(stem|block)\\.\\d+") != []
