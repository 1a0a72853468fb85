"""Model builders and numeric references shared by kiln's tests and bench/.

Both import them from here (never bench -> tests), and frontends name them as
``MODULE:CALLABLE`` (``kiln compile kiln.compiler.testing.torch_models:encoder``).

- ``torch_models``: small seeded PyTorch models (need the ``torch`` extra);
- ``onnx_models``: small ONNX models built with ``onnx.helper``;
- ``quant_models``: seeded ONNX models, inputs and calibration for quantization;
- ``real_models``: PP-OCR models from the RapidOCR wheel, onnx's light models;
- ``textlines``: rendered text-line images and greedy CTC for the PP-OCR rec model;
- ``reference``: ONNX Runtime reference outputs and the float32 tolerance.

Error metrics (SQNR, relative error) are ``kiln.compiler.core.metrics``.
"""
