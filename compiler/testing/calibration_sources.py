"""Real calibration data that ships inside installed wheels, as ``module:function`` sources.

- ``photo_crops(count)``: seeded crops of scikit-learn's two sample photographs
  (``sklearn/datasets/images/china.jpg`` and ``flower.jpg``, 427x640 RGB), resized to
  ``PHOTO_SIZE`` and normalized like ImageNet models expect: ``{"x": [1, 3, H, W]}``.
- ``text_lines(count)``: rendered text lines (:mod:`.textlines`) preprocessed for the
  PP-OCR rec model: ``{"x": [1, 3, 48, 320]}``.

Use them as ``calibration.source: kiln.compiler.testing.calibration_sources:photo_crops``.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from kiln.compiler.testing import textlines

PHOTO_SIZE = (32, 32)                       # H, W of photo_crops' samples
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def sample_photo_paths() -> list[Path]:
    """scikit-learn's bundled sample photographs (china.jpg, flower.jpg)."""
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "images"
    return sorted(folder.glob("*.jpg"))


@cache
def _photo(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def photo_crop(index: int, size: tuple[int, int] = PHOTO_SIZE, seed: int = 0) -> np.ndarray:
    """Crop ``index`` (seeded position and scale, alternating photos): [1, 3, H, W] float32."""
    photos = sample_photo_paths()
    pixels = _photo(photos[index % len(photos)])
    rng = np.random.default_rng([seed, index])
    side = int(rng.integers(64, min(pixels.shape[:2])))
    top = int(rng.integers(0, pixels.shape[0] - side + 1))
    left = int(rng.integers(0, pixels.shape[1] - side + 1))
    crop = Image.fromarray(pixels[top:top + side, left:left + side]).resize(
        (size[1], size[0]), Image.BILINEAR)
    x = (np.asarray(crop, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def photo_crops(count: int):
    """``count`` crops of real photographs for an input ``x`` of [1, 3, 32, 32]."""
    for i in range(count):
        yield {"x": photo_crop(i)}


def text_lines(count: int):
    """``count`` rendered text lines for the PP-OCR rec model's input ``x`` [1, 3, 48, 320]."""
    for i, text in enumerate(textlines.text_lines(count, seed=11)):
        yield {"x": textlines.rec_input(textlines.render_line(text, seed=i))}
