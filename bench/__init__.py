"""kiln's benchmark against ONNX Runtime and PyTorch eager (``python -m bench``).

Each case is built with kiln, then kiln's TVM module, ONNX Runtime
(CPUExecutionProvider) and PyTorch eager (where a torch model exists) are timed
at the same thread count, interleaved, warm-up first, median of the runs.
See /work/shared/design/PERFORMANCE.md.  Nothing here is run by CI's tests.
"""
