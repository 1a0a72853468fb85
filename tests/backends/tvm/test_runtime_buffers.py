"""The runtime's buffers (``backends/tvm/runtime.py``): unaligned inputs are staged in a
reused aligned buffer, outputs are TVM's memory handed over without a copy, and nothing the
caller gets back is shared with an input, another output, a constant or a later call."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tvm import build_artifact, load
from kiln.backends.tvm.runtime import DLPACK_ALIGNMENT, aligned_empty, span_overlaps, spans_disjoint
from kiln.compiler.core.errors import KilnError
from kiln.compiler.testing.onnx_models import to_ir

SHAPE = (4, 16)
CONSTANT = np.arange(64, dtype=np.float32).reshape(SHAPE)


def _aliasing_model():
    """y = Relu(x) (new memory each call), same = Identity(x) (TVM returns the input),
    const = a constant (the same tensor each call), twin = Identity(y) (y's tensor)."""
    nodes = [helper.make_node("Relu", ["x"], ["y"]),
             helper.make_node("Identity", ["x"], ["same"]),
             helper.make_node("Identity", ["c"], ["const"]),
             helper.make_node("Identity", ["y"], ["twin"])]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(SHAPE))
               for name in ("y", "same", "const", "twin")]
    graph = helper.make_graph(
        nodes, "aliasing", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
        outputs, initializer=[numpy_helper.from_array(CONSTANT, "c")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("aliasing")
    build_artifact(to_ir(_aliasing_model()), "host", outdir, model_hash="h")
    return outdir


def _inputs():
    x = np.linspace(-3, 3, CONSTANT.size, dtype=np.float32).reshape(SHAPE)
    aligned = aligned_empty(SHAPE, np.float32)
    aligned[:] = x
    raw = np.empty(x.size + 32, np.float32)
    shift = (-raw.ctypes.data % DLPACK_ALIGNMENT) // 4 + 1
    unaligned = raw[shift:shift + x.size].reshape(SHAPE)
    unaligned[:] = x
    assert unaligned.ctypes.data % DLPACK_ALIGNMENT
    return x, {"aligned": aligned, "unaligned": unaligned,
               "strided": np.repeat(x, 2, axis=1)[:, ::2]}


def _want(x):
    return [np.maximum(x, 0), x, CONSTANT, np.maximum(x, 0)]


def test_aligned_empty_is_on_the_boundary():
    for shape, dtype in (((3, 5), np.float32), ((7,), np.int8), ((), np.float64)):
        array = aligned_empty(shape, dtype)
        assert array.shape == shape and array.dtype == dtype and array.flags.c_contiguous
        assert array.ctypes.data % DLPACK_ALIGNMENT == 0


@pytest.mark.parametrize("kind", ["aligned", "unaligned", "strided"])
def test_outputs_are_the_callers_whatever_they_alias_in_tvm(artifact, kind):
    model = load(artifact, threads=1)
    x, variants = _inputs()
    source = variants[kind]
    held = [model(source) for _ in range(3)]
    for outputs in held:
        for got, want in zip(outputs, _want(x), strict=True):
            np.testing.assert_array_equal(got, want)
        for got in outputs:
            assert not np.shares_memory(got, source)
        for n, a in enumerate(outputs):
            assert not any(np.shares_memory(a, b) for b in outputs[n + 1:])
    for outputs in held:
        for array in outputs:
            array += 100.0  # the caller writes into what it got
    source[:] = 0.0
    again = model(source)
    for got, want in zip(again, _want(np.zeros(SHAPE, np.float32)), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(held[0][0], np.maximum(x, 0) + 100.0)


def test_a_new_output_is_handed_over_without_a_copy_after_the_first_call(artifact):
    model = load(artifact, threads=1)
    _, variants = _inputs()
    first = model(variants["aligned"])
    second = model(variants["aligned"])
    assert all(a.flags.owndata for a in first)  # nothing known yet: copies
    y, same, const, twin = second
    assert not y.flags.owndata      # TVM's output tensor, no copy
    assert same.flags.owndata and const.flags.owndata and twin.flags.owndata
    assert not np.shares_memory(y, first[0])


def test_an_unaligned_input_is_staged_in_one_reused_buffer(artifact):
    model = load(artifact, threads=1)
    x, variants = _inputs()
    model(variants["unaligned"])
    staged = model._buffers.staging[0]
    np.testing.assert_array_equal(model(variants["strided"])[0], np.maximum(x, 0))
    assert model._buffers.staging[0] is staged
    assert staged.ctypes.data % DLPACK_ALIGNMENT == 0
    model(variants["aligned"])  # shared as it is: the staging buffer is not touched
    assert model._buffers.staging[0] is staged


def test_calling_threads_have_their_own_buffers(artifact):
    model = load(artifact, threads=1)
    errors = []

    def run(scale: float) -> None:
        x = np.full(SHAPE, scale, np.float32)
        raw = np.empty(x.size + 1, np.float32)
        unaligned = raw[1:].reshape(SHAPE) if raw.ctypes.data % DLPACK_ALIGNMENT == 0 \
            else raw[:-1].reshape(SHAPE)
        try:
            for _ in range(30):
                unaligned[:] = x
                y = model(unaligned)[0]
                if not np.array_equal(y, np.maximum(x, 0)):
                    errors.append(scale)
        except Exception as error:  # noqa: BLE001 - a thread's exception fails the test
            errors.append(repr(error))

    workers = [threading.Thread(target=run, args=(float(s),)) for s in (1, 2, 3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors


@pytest.mark.parametrize("kind", ["aligned", "unaligned", "strided"])
def test_the_same_array_again_is_bound_once_and_read_anew(artifact, kind):
    """A decode loop passes its cache buffers every step: their TVM tensors are kept (no
    check or DLPack wrapping again), and what the caller wrote into them since is read."""
    model = load(artifact, threads=1)
    _, variants = _inputs()
    source = variants[kind]
    model(source)
    bound = model._buffers.bound[0]
    for value in (0.5, -2.0, 7.0):
        source[:] = value
        got = model(source)
        assert model._buffers.bound[0] is bound
        np.testing.assert_array_equal(got[0], np.maximum(np.full(SHAPE, value), 0))
        np.testing.assert_array_equal(got[1], np.full(SHAPE, value))
        assert not np.shares_memory(got[1], source)
    other = source.copy()
    model(other)
    assert model._buffers.bound[0] is not bound  # another array: bound anew


def test_the_same_array_reshaped_in_place_is_checked_again(artifact):
    model = load(artifact, threads=1)
    _, variants = _inputs()
    source = variants["aligned"]
    model(source)
    source.shape = (SHAPE[1], SHAPE[0])
    with pytest.raises(KilnError, match="expected shape"):
        model(source)


def test_outputs_fed_back_as_inputs_are_never_shared(artifact):
    """A recurrent loop: each call's output is the next call's input."""
    model = load(artifact, threads=1)
    x, _ = _inputs()
    state = aligned_empty(SHAPE, np.float32)
    state[:] = x
    for _ in range(4):
        outputs = model(state)
        for got in outputs:
            assert not np.shares_memory(got, state)
        state = outputs[0]
    np.testing.assert_array_equal(state, np.maximum(x, 0))


def test_disjoint_agrees_with_the_pairwise_check():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        count, others = rng.integers(1, 6), rng.integers(0, 6)
        starts = rng.integers(0, 60, count + others)
        spans = [(int(s), int(s + rng.integers(1, 12))) for s in starts]
        outs, rest = spans[:count], spans[count:]
        want = not any(span_overlaps(span, outs[:n] + outs[n + 1:] + rest)
                       for n, span in enumerate(outs))
        assert spans_disjoint(outs, rest) == want
