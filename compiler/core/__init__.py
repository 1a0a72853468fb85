"""kiln's core: what passes and backends may import.

Errors, graph queries on ``onnx_ir`` models, the spec language and its typed
options, selectors, the pass API, frontends, and the contracts shared between
layers (the ``kiln`` op domain, bit packing, value tables, error metrics,
atomic writes, the version). Nothing here imports ``kiln.passes``,
``kiln.backends`` or ``kiln.compiler.driver``.
"""
