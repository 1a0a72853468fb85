"""Real models for tests, from packages on PyPI (no download at test time beyond pip).

- the three PP-OCR models shipped in the ``rapidocr-onnxruntime`` wheel, fetched
  once with ``pip download --no-deps`` into a cache folder (the wheel pulls OpenCV
  if installed normally, so it is only unzipped);
- onnx's own ``backend/test/data/light`` models with their expected outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

RAPIDOCR_VERSION = "1.4.4"
RAPIDOCR_MODELS = {
    "det": ("ch_PP-OCRv4_det_infer.onnx", {"x": [1, 3, 640, 640]}),
    "rec": ("ch_PP-OCRv4_rec_infer.onnx", {"x": [1, 3, 48, 320]}),
    "cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": [1, 3, 48, 192]}),
}
LIGHT_MODELS = ("resnet50", "densenet121", "inception_v1", "inception_v2", "shufflenet",
                "squeezenet", "vgg19", "zfnet512", "bvlc_alexnet")


def cache_dir() -> Path:
    root = os.environ.get("KILN_TEST_CACHE") or Path.home() / ".cache" / "kiln-tests"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def rapidocr_model(which: str) -> Path:
    """Path to one PP-OCR model ('det', 'rec' or 'cls'), unzipped from the wheel."""
    filename, _ = RAPIDOCR_MODELS[which]
    target = cache_dir() / "rapidocr" / filename
    if target.exists():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    found = sorted(wheels.glob(f"rapidocr_onnxruntime-{RAPIDOCR_VERSION}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                        str(wheels), f"rapidocr-onnxruntime=={RAPIDOCR_VERSION}"], check=True)
        found = sorted(wheels.glob(f"rapidocr_onnxruntime-{RAPIDOCR_VERSION}-*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[0]) as zf:
        for name in zf.namelist():
            if name.startswith("rapidocr_onnxruntime/models/") and name.endswith(".onnx"):
                out = target.parent / Path(name).name
                tmp = out.with_suffix(".tmp")
                tmp.write_bytes(zf.read(name))
                os.replace(tmp, out)
    return target


def rapidocr_input_shape(which: str) -> dict[str, list[int]]:
    return dict(RAPIDOCR_MODELS[which][1])


def light_model(name: str) -> Path:
    """Path to onnx's ``light_<name>.onnx`` test model."""
    import onnx

    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"
    if not path.exists():
        raise FileNotFoundError(path)
    return path


def light_model_io(name: str) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Inputs and expected outputs of a light model.

    onnx ships only ``light_<name>_output_<i>.pb``; its backend test runner made
    them from the deterministic input ``arange(n).reshape(shape) / n`` (unknown
    dims taken as 1), which is rebuilt here.
    """
    import onnx
    from onnx import numpy_helper

    model_path = light_model(name)
    model = onnx.load(model_path, load_external_data=False)
    init_names = {t.name for t in model.graph.initializer}
    inputs: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        if value.name in init_names:
            continue
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1
                      for d in value.type.tensor_type.shape.dim)
        n = int(np.prod(shape))
        inputs[value.name] = (np.arange(n).reshape(shape) / n).astype(np.float32)
    outputs: list[np.ndarray] = []
    prefix = str(model_path)[: -len(".onnx")]
    i = 0
    while Path(f"{prefix}_output_{i}.pb").exists():
        tensor = onnx.TensorProto()
        tensor.ParseFromString(Path(f"{prefix}_output_{i}.pb").read_bytes())
        outputs.append(numpy_helper.to_array(tensor))
        i += 1
    return inputs, outputs
