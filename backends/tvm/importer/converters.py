"""kiln's converter table: TVM's ONNX importer table plus kiln's forms, for one import.

The table maps an op type to an object whose ``get_converter(opset)`` returns
``convert(bb, inputs, attr, params)`` (TVM's interface). kiln's entries are built
with the import's :class:`.context.ImportContext`, and every entry is wrapped in a
:class:`TracedConverter` that records the node being converted in that context.
"""

from __future__ import annotations

from kiln.compiler.core.kiln_domain import DEQUANTIZE_TABLE, UNPACK_BITS

from . import internal_ops
from .attention import StandardAttention
from .context import ImportContext
from .expand import SymbolicExpand
from .grouped_gemv import GroupedGemvMatMul
from .int8_conv import Int8Conv
from .int8_dense import Int8Dense
from .missing_ops import (
    BitCast,
    CumProd,
    InfinityInitReduce,
    LpNormalization,
    MaxPoolWithIndices,
    MixedTypePow,
    OneHotAnyValues,
    ReverseSequence,
    SpaceToDepthWithMode,
    StaticEyeLike,
)
from .moe_kernels import MoeDispatch
from .recurrent import GRU, LSTM, RNN
from .resize_converter import SeparableResize
from .rotary import RotaryEmbedding
from .runtime_pad import RuntimePad
from .sparse_kernel import SparseDense
from .standard_converters import (
    ClipAsMinMax,
    ConstantThresholdNMS,
    ConvTransposeAsConv,
    EluInInputType,
    HardSigmoidAsMinMax,
    HardSwishAsMinMax,
    RMSNormalizationAsRelax,
    ScatterRowsAsGather,
    SumAsAdds,
)
from .weight_converters import (
    BlockedDequantizeLinear,
    CodebookDecode,
    PackedDequantizeLinear,
    TableDecode,
    UnpackBits,
)

#: Ops TVM's importer handles outside its converter table.
IMPORTER_BUILTINS = frozenset({"If", "Constant"})


class TracedConverter:
    """Wraps a converter so that a failure can name the node being converted."""

    def __init__(self, op_type: str, converter, context: ImportContext) -> None:
        self.op_type = op_type
        self.converter = converter
        self.context = context

    def get_converter(self, opset: int):
        convert = self.converter.get_converter(opset)

        def traced(bb, inputs, attr, params):
            self.context.node = (self.op_type, attr.get("tvm_custom", {}).get("name", ""))
            return convert(bb, inputs, attr, params)

        return traced


def kiln_converters(base: dict, context: ImportContext) -> dict:
    """TVM's converter table ``base`` plus kiln's forms, bound to ``context``.

    kiln's model-local functions (``kiln.UnpackBits``, ``kiln.DequantizeTable``) are
    converted as ops so their weights stay packed; the internal ops of
    :mod:`.internal_ops` come from :mod:`.prepare`.
    """
    table = dict(base)
    table["DequantizeLinear"] = BlockedDequantizeLinear(base["DequantizeLinear"])
    table["MatMul"] = GroupedGemvMatMul(base["MatMul"], context)
    table["Sum"] = SumAsAdds
    table["Clip"] = ClipAsMinMax(base["Clip"])
    table["HardSigmoid"] = HardSigmoidAsMinMax(base["HardSigmoid"])
    table["HardSwish"] = HardSwishAsMinMax(base["HardSwish"])
    table["Elu"] = EluInInputType(base["Elu"])
    table["ConvTranspose"] = ConvTransposeAsConv(base["ConvTranspose"])
    table["ScatterND"] = ScatterRowsAsGather(base["ScatterND"])
    table["Resize"] = SeparableResize(base["Resize"])
    table["Pad"] = RuntimePad(base["Pad"])
    table["Expand"] = SymbolicExpand(base["Expand"])
    table["NonMaxSuppression"] = ConstantThresholdNMS(base["NonMaxSuppression"])
    table["Attention"] = StandardAttention()
    table["RMSNormalization"] = RMSNormalizationAsRelax
    table["RotaryEmbedding"] = RotaryEmbedding
    table["LpNormalization"] = LpNormalization
    table["BitCast"] = BitCast
    table["Pow"] = MixedTypePow(base["Pow"])
    table["OneHot"] = OneHotAnyValues(base["OneHot"])
    table["EyeLike"] = StaticEyeLike(base["EyeLike"])
    table["CumProd"] = CumProd
    table["MaxPool"] = MaxPoolWithIndices(base["MaxPool"])
    table["SpaceToDepth"] = SpaceToDepthWithMode(base["SpaceToDepth"])
    table["ReverseSequence"] = ReverseSequence
    table["ReduceMax"] = InfinityInitReduce(base["ReduceMax"], largest=True)
    table["ReduceMin"] = InfinityInitReduce(base["ReduceMin"], largest=False)
    table["LSTM"] = LSTM()
    table["GRU"] = GRU()
    table["RNN"] = RNN()
    table[internal_ops.PACKED_DEQUANTIZE] = PackedDequantizeLinear(context)
    table[internal_ops.PACKED_TABLE] = TableDecode(packed=True)
    table[internal_ops.CODEBOOK] = CodebookDecode
    table[internal_ops.SPARSE_DENSE] = SparseDense
    table[internal_ops.INT8_DENSE] = Int8Dense
    table[internal_ops.INT8_CONV] = Int8Conv
    table[internal_ops.MOE_DISPATCH] = MoeDispatch
    table[UNPACK_BITS] = UnpackBits
    table[DEQUANTIZE_TABLE] = TableDecode(packed=False)
    return table


def traced_converters(base: dict, context: ImportContext) -> dict:
    """:func:`kiln_converters`, each entry wrapped in a :class:`TracedConverter`."""
    return {op: TracedConverter(op, conv, context)
            for op, conv in kiln_converters(base, context).items()}


def supported_op_types() -> frozenset[str]:
    """Op types (standard domain) that the importer (TVM's converters and kiln's) can lower."""
    from tvm.relax.frontend.onnx import onnx_frontend

    table = kiln_converters(onnx_frontend._get_convert_map(), ImportContext())
    return frozenset(table) | IMPORTER_BUILTINS
