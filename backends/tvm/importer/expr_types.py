"""What kiln's converters read off their inputs: static shapes and dtypes of Relax
expressions, and ONNX attribute values as TVM's importer passes them."""

from __future__ import annotations

from onnx import helper


def static_shape(expr) -> list[int]:
    """The shape of a Relax tensor expression (raises when a dim is not static)."""
    return [int(d) for d in expr.ty.shape.values]


def dtype_of(expr) -> str:
    """The element type of a Relax tensor expression ('float32', 'uint8', ...)."""
    return str(expr.ty.dtype)


def onnx_dtype_name(elem_type: int) -> str:
    """The numpy/TVM name of an ONNX element type (``TensorProto.FLOAT`` -> 'float32')."""
    return str(helper.tensor_dtype_to_np_dtype(elem_type))


def attr_str(value) -> str:
    """A string attribute (the importer passes them as bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)
