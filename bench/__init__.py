"""kiln's benchmark against ONNX Runtime and PyTorch eager (``python -m bench``).

Each case is built with kiln, then kiln's TVM module, ONNX Runtime
(CPUExecutionProvider) and PyTorch eager (where a torch model exists) are timed
at the same thread count, warm-up first, median of the runs. How the engines are
kept apart (interleaved calls with idle gaps by default, or each engine alone in a
block with ``--protocol blocks``) and why: :mod:`bench.timing`.

Modules: ``case`` (what a case gives the runner), ``cases`` (the cases by name; the
quantized ones in ``cases_quant``), ``build`` (kiln's build of a case), ``timing``,
``runner`` (``python -m bench``), ``neighbour`` (kiln beside a busy core,
``python -m bench.neighbour``), ``profile`` and ``tune``. Model builders shared with
the tests are ``kiln.compiler.testing``. Nothing here is run by CI's tests.
"""
