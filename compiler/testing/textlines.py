"""Rendered text-line images for the PP-OCR rec model, its preprocessing and greedy CTC.

``text_lines(count, seed)`` makes deterministic strings (words, numbers, dates, codes,
mixed case) and ``render_line`` draws one as dark text on a light background with a
little seeded variation in font size, offset, ink and paper shade.  ``rec_input``
is RapidOCR's ``resize_norm_img`` for one image (height 48 keeping aspect, pad right to
the model's width, ``(x/255 - 0.5)/0.5``, NCHW float32) and ``greedy_ctc`` /
``ctc_text`` its ``CTCLabelDecode`` (argmax per step, collapse repeats, drop blank 0);
the classes are blank, the model's ``character`` metadata, then space.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORDS = ("invoice", "total", "amount", "Order", "Shipping", "Address", "Street", "Phone",
         "Customer", "Date", "Account", "balance", "Payment", "due", "Receipt", "Station",
         "London", "Paris", "Berlin", "Model", "Serial", "Number", "price", "Quantity",
         "Report", "Table", "Summer", "Winter", "Monday", "Friday", "north", "garden",
         "coffee", "window", "River", "Office", "Ticket", "Gate", "Platform")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
FONT_CANDIDATES = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                   "/usr/share/fonts/dejavu/DejaVuSans.ttf",
                   "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
                   "/Library/Fonts/Arial.ttf", "C:/Windows/Fonts/arial.ttf")
REC_SIZE = (48, 320)            # the rec model's input height and width (RapidOCR's default)


def _word(rng: np.random.Generator) -> str:
    word = WORDS[rng.integers(len(WORDS))]
    case = rng.integers(4)
    return word.upper() if case == 0 else word.lower() if case == 1 else word


def _date(rng: np.random.Generator) -> str:
    year, month, day = rng.integers(1990, 2031), rng.integers(1, 13), rng.integers(1, 29)
    if rng.integers(2):
        return f"{year}-{month:02d}-{day:02d}"
    return f"{day} {MONTHS[month - 1]} {year}"


def _number(rng: np.random.Generator) -> str:
    kind = rng.integers(3)
    if kind == 0:
        return str(rng.integers(1, 100000))
    if kind == 1:
        return f"{rng.integers(0, 10000)}.{rng.integers(0, 100):02d}"
    return f"{rng.integers(100, 1000)}-{rng.integers(1000, 10000)}"


def _code(rng: np.random.Generator) -> str:
    letters = "".join(chr(ord("A") + int(i)) for i in rng.integers(0, 26, size=2))
    return f"{letters}{rng.integers(100, 10000)}"


def text_line(rng: np.random.Generator) -> str:
    """One line: a word followed by one or two of word / date / number / code."""
    makers = (_word, _date, _number, _code)
    parts = [_word(rng)] + [makers[i](rng) for i in rng.integers(0, 4, size=rng.integers(1, 3))]
    return " ".join(parts)


def text_lines(count: int, seed: int, max_ratio: float = REC_SIZE[1] / REC_SIZE[0]) -> list[str]:
    """``count`` distinct seeded lines whose rendering is at most ``max_ratio`` wide for
    its height (wider lines would be squeezed into the model's width)."""
    rng = np.random.default_rng(seed)
    lines: list[str] = []
    while len(lines) < count:
        line = text_line(rng)
        if line not in lines and _fits(line, max_ratio):
            lines.append(line)
    return lines


@cache
def _font_path() -> str | None:
    return next((p for p in FONT_CANDIDATES if Path(p).exists()), None)


@cache
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A system sans TTF at ``size`` pixels, else Pillow's scalable built-in font."""
    path = _font_path()
    if path is not None:
        return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def _fits(text: str, max_ratio: float) -> bool:
    """Whether ``text`` in the widest case of ``render_line`` is within ``max_ratio``."""
    face = font(36)
    ascent, descent = face.getmetrics()
    return (face.getlength(text) + 2 * 4) / (ascent + descent + 2 * 3) < 0.97 * max_ratio


def render_line(text: str, seed: int) -> Image.Image:
    """``text`` as dark ink on light paper (RGB): a line's full height, a seeded margin."""
    rng = np.random.default_rng(seed)
    face = font(int(rng.integers(28, 37)))
    ascent, descent = face.getmetrics()
    margin_x, margin_y = int(rng.integers(4, 12)), int(rng.integers(3, 9))
    width = int(math.ceil(face.getlength(text))) + 2 * margin_x
    height = ascent + descent + 2 * margin_y
    paper, ink = int(rng.integers(215, 256)), int(rng.integers(0, 60))
    image = Image.new("RGB", (width, height), (paper, paper, paper))
    offset = (margin_x + int(rng.integers(-2, 3)), margin_y + int(rng.integers(-2, 3)))
    ImageDraw.Draw(image).text(offset, text, font=face, fill=(ink, ink, ink))
    return image


def rec_input(image: Image.Image, height: int = REC_SIZE[0],
              width: int = REC_SIZE[1]) -> np.ndarray:
    """RapidOCR's rec preprocessing of one image (Pillow's bilinear resize in place of
    OpenCV's): [1, 3, height, width] float32."""
    ratio = image.width / image.height
    resized_w = min(width, int(math.ceil(height * ratio)))
    pixels = np.asarray(image.convert("RGB").resize((resized_w, height), Image.BILINEAR),
                        dtype=np.float32)
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :resized_w] = (pixels.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out[None]


def greedy_ctc(probs: np.ndarray) -> list[int]:
    """Greedy CTC of one [T, C] output: argmax per step, collapse repeats, drop blank 0."""
    best = probs.argmax(axis=-1)
    keep = np.ones(len(best), dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    return [int(i) for i in best[keep & (best != 0)]]


def trim_spaces(indices: list[int], space: int) -> list[int]:
    """``indices`` without the space class at either end (the line's margins)."""
    start, stop = 0, len(indices)
    while start < stop and indices[start] == space:
        start += 1
    while stop > start and indices[stop - 1] == space:
        stop -= 1
    return indices[start:stop]


def rec_characters(model_path: str | Path) -> list[str] | None:
    """The rec model's CTC classes (blank, the ``character`` metadata, space), if present."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" not in meta:
        return None
    return ["<blank>", *meta["character"].splitlines(), " "]


def ctc_text(indices: list[int], characters: list[str]) -> str:
    """The string of a greedy CTC index sequence."""
    return "".join(characters[i] for i in indices)
