"""The backend's ONNX copy before import (importer.prepare, importer.packed_weights):
4-bit weights packed, codebook weights kept as index + table, index masks evaluated.

The kiln.UnpackBits test runs every place that gives the op a meaning on the same bytes:
ONNX Runtime on the function body the passes store (kiln_ops), the numpy evaluation the
importer does before import (prepare.fold_index_unpacks -> core.packing.unpack_bits),
and the TVM kernel the importer's converter emits; they must agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tvm.importer import internal_ops
from kiln.backends.tvm.importer.nibbles import pack_nibbles_tiled
from kiln.backends.tvm.importer.packed_weights import (
    codebook_weights,
    four_bit_misuse,
    pack_four_bit_weights,
)
from kiln.backends.tvm.importer.prepare import fold_index_unpacks, prepare_onnx
from kiln.compiler.core.packing import pack_bits, unpack_bits
from kiln.compiler.testing.kiln_op_models import unpack_bits_model
from kiln.compiler.testing.onnx_models import blocked_int4_matmul, to_ir


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_blocked_int4_weight_becomes_packed_tiles():
    model = blocked_int4_matmul(k=128, n=64)
    codes = numpy_helper.to_array(model.graph.initializer[0]).view(np.uint8) & 15
    assert pack_four_bit_weights(model) == 1
    (dq,) = [n for n in model.graph.node if n.domain == internal_ops.DOMAIN]
    assert dq.op_type == internal_ops.PACKED_DEQUANTIZE
    attrs = _attrs(dq)
    assert attrs["element"] == b"int4" and attrs["layout"] == 1 and attrs["shape"] == [128, 64]
    assert attrs["axis"] == 0 and attrs["block_size"] == 32
    inits = {t.name: t for t in model.graph.initializer}
    assert "w_q" not in inits  # the 4-bit tensor is gone, only its packed form is read
    packed = numpy_helper.to_array(inits[dq.input[0]])
    np.testing.assert_array_equal(packed, pack_nibbles_tiled(codes, 1))
    assert inits[dq.input[2]].data_type == TensorProto.INT8  # the zero point, widened
    assert any(o.domain == internal_ops.DOMAIN for o in model.opset_import)
    assert four_bit_misuse(model) == {}


def test_a_weight_read_twice_is_packed_once():
    model = blocked_int4_matmul(k=64, n=32)
    graph = model.graph
    graph.node.append(helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w2"],
                                       axis=0, block_size=32, name="second"))
    graph.node.append(helper.make_node("MatMul", ["x", "w2"], ["y2"], name="matmul2"))
    graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [4, 32]))
    assert pack_four_bit_weights(model) == 2
    packed = {n.input[0] for n in graph.node if n.op_type == internal_ops.PACKED_DEQUANTIZE}
    assert len(packed) == 1


def test_a_4bit_weight_read_by_another_op_is_reported():
    model = blocked_int4_matmul(k=64, n=32)
    model.graph.node.append(helper.make_node("Cast", ["w_q"], ["w_f"], to=TensorProto.FLOAT,
                                             name="cast_raw"))
    pack_four_bit_weights(model)
    assert "w_q" in {t.name for t in model.graph.initializer}  # still read: kept
    assert four_bit_misuse(model) == {"Cast reading 4-bit tensor 'w_q'": "cast_raw"}


def _codebook_model(index_type=TensorProto.UINT8, extra_reader: bool = False):
    rng = np.random.default_rng(0)
    index = rng.integers(0, 16, 32).astype(np.uint8)
    inits = [numpy_helper.from_array(index, "index"),
             numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "codebook"),
             numpy_helper.from_array(np.array([8, 16], np.int64), "shape")]
    if index_type != TensorProto.UINT8:
        inits[0] = helper.make_tensor("index", index_type, [32], index.astype(np.int32))
    nodes = [helper.make_node("Cast", ["index"], ["index64"], to=TensorProto.INT64),
             helper.make_node("Gather", ["codebook", "index64"], ["runs"], axis=0),
             helper.make_node("Reshape", ["runs", "shape"], ["w"], name="w_decode"),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("index64", TensorProto.INT64, [32]))
    graph = helper.make_graph(nodes, "codebook",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_codebook_weight_becomes_one_internal_node():
    model = _codebook_model()
    assert codebook_weights(model) == 1
    assert [n.op_type for n in model.graph.node] == [internal_ops.CODEBOOK, "MatMul"]
    (decode,) = [n for n in model.graph.node if n.op_type == internal_ops.CODEBOOK]
    assert list(decode.input) == ["index", "codebook"] and _attrs(decode)["shape"] == [8, 16]


def test_codebook_cast_read_elsewhere_is_kept_and_int32_index_is_refused():
    model = _codebook_model(extra_reader=True)
    assert codebook_weights(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Cast", internal_ops.CODEBOOK, "MatMul"]
    refused = _codebook_model(index_type=TensorProto.INT32)
    assert codebook_weights(refused) == 0
    assert [n.op_type for n in refused.graph.node] == ["Cast", "Gather", "Reshape", "MatMul"]


def _onnxruntime(model: ir.Model) -> np.ndarray:
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {})[0]


def _tvm(model: ir.Model) -> np.ndarray:
    tvm = pytest.importorskip("tvm")
    from tvm import relax

    from kiln.backends.tvm.importer import lower_to_relax

    executable = tvm.compile(lower_to_relax(model), target="llvm")
    return relax.VirtualMachine(executable, tvm.cpu())["main"]().numpy()


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_bits_agrees_bit_for_bit_everywhere(bits):
    shape = [5, 7]
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2 ** bits, shape).astype(np.uint8)
    stream = np.unpackbits(pack_bits(codes, bits), bitorder="little")
    stream[codes.size * bits:] = 1  # set the padding bits of the last run: never read
    packed = np.packbits(stream, bitorder="little")
    np.testing.assert_array_equal(unpack_bits(packed, bits, shape), codes)

    kernel = unpack_bits_model(packed, bits, shape, reader=None)  # the TVM converter's kernel
    np.testing.assert_array_equal(_onnxruntime(kernel), codes)
    np.testing.assert_array_equal(_tvm(kernel), codes)

    masked = unpack_bits_model(packed, bits, shape, reader="Identity")  # an index computation
    proto = ir.serde.serialize_model(masked)
    assert fold_index_unpacks(proto) == 1
    folded = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_array_equal(folded[masked.graph.node(0).outputs[0].name], codes)
    np.testing.assert_array_equal(_onnxruntime(masked), codes)
    np.testing.assert_array_equal(_tvm(masked), codes)


def test_unpack_bits_feeding_a_dequantize_stays_a_node():
    codes = np.random.default_rng(0).integers(0, 4, [4, 32]).astype(np.uint8)
    model = unpack_bits_model(pack_bits(codes, 2), 2, [4, 32], reader="Identity")
    proto = ir.serde.serialize_model(model)
    proto.graph.node[1].op_type = "DequantizeLinear"  # a weight: decoded in its kernel
    assert fold_index_unpacks(proto) == 0


def test_prepare_drops_kiln_function_bodies_and_keeps_their_calls():
    model = unpack_bits_model(pack_bits(np.zeros(8, np.uint8), 1), 1, [8], reader=None)
    proto = prepare_onnx(model)
    assert len(proto.functions) == 0
    assert [(n.domain, n.op_type) for n in proto.graph.node] == [("kiln", "UnpackBits")]


def test_prepare_keeps_the_callers_model_unchanged():
    model = to_ir(blocked_int4_matmul(k=64, n=32))
    before = ir.serde.serialize_model(model).SerializeToString()
    proto = prepare_onnx(model)
    assert any(n.op_type == internal_ops.PACKED_DEQUANTIZE for n in proto.graph.node)
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_refold_evaluates_a_constant_split_and_what_it_feeds():
    # onnxscript's folder skips nodes with several outputs: a Split of a fixed shape
    # (an expanded AffineGrid's size) would leave the Reshape it feeds computed
    from onnx.reference import ReferenceEvaluator

    from kiln.backends.tvm.importer.prepare import refold

    graph = helper.make_graph(
        [helper.make_node("Split", ["size"], ["n", "hw"], axis=0, num_outputs=2),
         helper.make_node("Concat", ["n", "hw"], ["shape"], axis=0),
         helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.array([2, 3], np.int64), "size")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    folded = refold(model)
    assert [n.op_type for n in folded.graph.node] == ["Reshape"]
    x = np.arange(6, dtype=np.float32)
    np.testing.assert_array_equal(ReferenceEvaluator(folded).run(None, {"x": x})[0],
                                  x.reshape(2, 3))


@pytest.mark.slow  # one of them also runs in tests/conformance' fast subset
def test_expanded_affine_grid_cases_compile_and_match():
    from kiln.compiler.testing.conformance import failures

    failed = failures(["test_affine_grid_2d_expanded", "test_affine_grid_3d_align_corners_expanded"])
    assert not failed, "\n".join(failed)
