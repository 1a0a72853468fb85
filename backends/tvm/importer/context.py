"""The state of one import that kiln's converters share, passed to them explicitly.

TVM's importer calls each converter with ``(bb, inputs, attr, params)`` only; kiln's
converters are built for one import with an :class:`ImportContext` (:mod:`.converters`)
so that a MatMul can find the 4-bit decode behind its weight (the grouped GEMV), and a
failure can name the node being converted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .decode import FourBitDecode


@dataclass
class ImportContext:
    """One import's shared state (made by :func:`.lower.lower_to_relax`).

    ``grouped_gemv``: whether a MatMul on a blocked 4-bit weight becomes kiln's grouped
    GEMV (CPU targets, whose rule schedules it; GPUs use dlight on the plain decode).
    """

    grouped_gemv: bool = True
    #: The 4-bit decodes emitted so far, by the Relax var bound to their output.
    decodes: dict[object, FourBitDecode] = field(default_factory=dict)
    #: (op type, node name) of the node being converted, for error messages.
    node: tuple[str, str] | None = None

    def record_decode(self, var, decode: FourBitDecode) -> None:
        """Remember that ``var`` is the output of ``decode``."""
        self.decodes[var] = decode

    def decode_of(self, var) -> FourBitDecode | None:
        """The 4-bit decode whose output ``var`` is, if any."""
        return self.decodes.get(var)
