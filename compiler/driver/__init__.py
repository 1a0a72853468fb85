"""kiln's driver: the code that ties passes and backends together.

The compile pipeline (load -> passes with verification -> ONNX -> target build),
the pass registry, verification, the report and the CLI. Only this package
imports both ``kiln.passes`` and ``kiln.backends``.
"""
