"""The typed options of ``quantize``: what a weight (and its input activation) becomes.

A spec writes them in YAML; they are parsed here once, at spec load, into frozen
objects (docs/spec.md keeps the YAML forms):

    granularity: per_tensor          -> PerTensor()
    granularity: per_channel         -> PerChannel()
    granularity: {group: 128}        -> PerGroup(size=128)
    activations: none                -> None
    activations: {calibration: mse}  -> ActivationQuant(calibration="mse")

and each object writes itself back in the same YAML form (``model_dump``), so a loaded
spec can be emitted again (``kiln plan --emit-spec``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

from kiln.compiler.core.pass_api import PassConfig
from kiln.passes.quant import formats

# -- granularity: which weights share a scale --------------------------------------------------


class PerTensor(PassConfig):
    """One scale (and zero point) for the whole weight. YAML: ``per_tensor``."""

    @model_serializer
    def _yaml_form(self) -> str:
        return "per_tensor"


class PerChannel(PassConfig):
    """One scale per output channel. YAML: ``per_channel``.

    The axis is the op's output-channel axis (Conv 0, MatMul 1, Gemm 0 or 1 by
    ``transB``: see ``weights``), not a number in the spec: one spec entry covers
    Conv and MatMul alike, and the backends' fused kernels expect that axis."""

    @model_serializer
    def _yaml_form(self) -> str:
        return "per_channel"


class PerGroup(PassConfig):
    """Blocks of ``size`` consecutive input channels share a scale. YAML: ``{group: N}``."""

    size: int = Field(ge=8, le=4096, validation_alias=AliasChoices("group", "size"),
                      description="input channels per scale (32..256 typical)")

    @model_serializer
    def _yaml_form(self) -> dict[str, int]:
        return {"group": self.size}


GRANULARITY_WORDS = {"per_tensor": PerTensor, "per_channel": PerChannel}


def _granularity_from_yaml(value: Any) -> Any:
    if isinstance(value, str):
        if value not in GRANULARITY_WORDS:
            raise ValueError(f"{value!r} is not one of per_tensor, per_channel, {{group: N}}")
        return GRANULARITY_WORDS[value]()
    return value


def _granularity_kind(value: Any) -> str | None:
    if isinstance(value, PerTensor):
        return "per_tensor"
    if isinstance(value, PerChannel):
        return "per_channel"
    if isinstance(value, (PerGroup, Mapping)):
        return "group"
    return None


Granularity = Annotated[
    Annotated[PerTensor, Tag("per_tensor")] | Annotated[PerChannel, Tag("per_channel")]
    | Annotated[PerGroup, Tag("group")],
    Discriminator(_granularity_kind, custom_error_type="granularity",
                  custom_error_message="expected per_tensor, per_channel or {group: N}"),
    BeforeValidator(_granularity_from_yaml,
                    json_schema_input_type=Literal["per_tensor", "per_channel"] | PerGroup),
]
Clip = Literal["none", "mse_search"]


# -- weights ------------------------------------------------------------------------------------

class IntWeights(PassConfig):
    """Uniform integer weights; ``uint*`` (or ``symmetric: false``) store a zero point."""

    dtype: Literal["int8", "int4", "int3", "int2", "uint8", "uint4", "uint3", "uint2"]
    granularity: Granularity = PerChannel()
    symmetric: bool | None = Field(default=None, description="default: true for int*, false "
                                   "for uint*")
    clip: Clip = "none"
    reduce_range: bool = Field(default=False, description="int8 symmetric only: codes in "
                               "[-64, 63] (7 bits; scales for that range), so that no pair of "
                               "weights can saturate AVX2's int16 vpmaddubsw sums")

    @model_validator(mode="after")
    def _symmetric_matches_dtype(self) -> IntWeights:
        if self.dtype.startswith("uint") and self.symmetric:
            raise ValueError(f"dtype {self.dtype!r} stores a zero point; symmetric must be false")
        if self.reduce_range and (self.dtype != "int8" or not self.is_symmetric):
            raise ValueError(f"reduce_range is for symmetric int8 weights, not {self.dtype!r}"
                             + ("" if self.is_symmetric else " with a zero point"))
        return self

    @property
    def is_symmetric(self) -> bool:
        return not self.dtype.startswith("uint") if self.symmetric is None else self.symmetric

    @property
    def bits(self) -> int:
        return formats.bits_of(self.dtype)

    @property
    def code_bits(self) -> int:
        """Bits of the codes' range: ``bits``, or 7 with ``reduce_range`` (stored as int8)."""
        return self.bits - 1 if self.reduce_range else self.bits


class FloatWeights(PassConfig):
    """Floating-point weights with a scale per group (FP8 E4M3/E5M2, FP4 E2M1/E3M0)."""

    dtype: Literal["fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "fp4_e3m0"]
    granularity: Granularity = PerGroup(size=128)
    clip: Clip = "mse_search"
    exponent_search: bool = Field(default=False, description="per layer, keep the lowest-MSE "
                                  "of the formats of this width (E2M1/E3M0/INT4 or E4M3/E5M2/INT8)")


class PowerWeights(PassConfig):
    """NUPES: sign(w)|w|^a quantized uniformly; a searched per layer or fixed."""

    dtype: Literal["power"]
    bits: Literal[4, 8] = 4
    exponent: float | Literal["search"] = "search"
    granularity: Granularity = PerGroup(size=128)
    clip: Clip = "mse_search"

    @field_validator("exponent")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        if isinstance(value, float) and not 0.1 <= value <= 4.0:
            raise ValueError(f"exponent {value} is not in [0.1, 4]")
        return value


class CodebookWeights(PassConfig):
    """k-means codebook over runs of ``vector`` weights; indices uint8 (k <= 256) or uint16."""

    dtype: Literal["codebook"]
    vector: int = Field(default=4, ge=1, le=64)
    centroids: int = Field(default=256, ge=2, le=65536)
    iterations: int = Field(default=15, ge=0, le=1000)
    seed: int = 0


WeightQuant = Annotated[IntWeights | FloatWeights | PowerWeights | CodebookWeights,
                        Field(discriminator="dtype")]


# -- activations --------------------------------------------------------------------------------

class ActivationQuant(PassConfig):
    """Per-tensor activation quantization: static (calibrated) or dynamic (at run time)."""

    dtype: Literal["int8", "uint8"] = "uint8"
    calibration: Literal["minmax", "percentile", "mse", "search"] = Field(
        default="minmax", description="search: the clip with the least error in the output "
        "of the layers that read x (see calibrate)")
    percentile: float = Field(default=99.99, gt=50, le=100)
    dynamic: bool = Field(default=False, description="DynamicQuantizeLinear (always uint8)")


def _no_activations_from_yaml(value: Any) -> Any:
    return None if value == "none" else value


class QuantizeConfig(PassConfig):
    """Options of ``quantize``; ``activations`` None (YAML ``none``): weights only."""

    weights: WeightQuant = IntWeights(dtype="int8")
    activations: Annotated[ActivationQuant | None, BeforeValidator(
        _no_activations_from_yaml, json_schema_input_type=Literal["none"] | ActivationQuant)] = None

    bias_correction: bool = Field(default=False, description="add (W - W^) E[x] to each "
                                  "layer's bias (DFQ), E[x] from the calibration samples")
    rounding: Literal["nearest", "gptq"] = Field(
        default="nearest", description="gptq: integer weight codes chosen column by column "
        "to keep each layer's output on the calibration inputs (see gptq); int weights only")

    @model_validator(mode="after")
    def _gptq_needs_int(self) -> QuantizeConfig:
        if self.rounding == "gptq" and not isinstance(self.weights, IntWeights):
            raise ValueError(f"rounding: gptq needs integer weights, not {self.weights.dtype!r}")
        return self

    @field_serializer("activations")
    def _activations_yaml_form(self, value: ActivationQuant | None) -> Any:
        return "none" if value is None else value
