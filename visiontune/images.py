"""Images: the one place that loads, orients, converts and sizes them.

Training (the collator), evaluation and the served model all load an image with :func:`load_image` and
size it with an :class:`ImageRule` applied by a :class:`Resizer`, so a model is served images of exactly
the size it was trained on. The data stage's normalization uses the same RGB conversion (:func:`to_rgb`)
and its own size rule, :func:`bounded_size` (sides kept within ``[min_px, max_px]``), also kept here.

Two size rules live here, each under its own name:

* :func:`target_size`: the collator's rule (Unsloth's ``resize``/``resize_dimension`` semantics), for
  an :class:`ImageRule` and a model's ``'min'``/``'max'`` sides and patch multiple;
* :func:`bounded_size`: normalization's rule, aspect kept with both sides in ``[min_px, max_px]``.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

if TYPE_CHECKING:  # PIL and numpy load on first use: the pipeline config imports ImageRule from here
    from PIL import Image

# The 'min'/'max' sides used for an architecture visiontune has no module map for (no patch snapping then).
FALLBACK_BOUNDS = (448, 1024)
RESIZE_DIMENSIONS = (0, 1, "max", "min")


@dataclass(frozen=True)
class ImageRule:
    """How images are sized before the processor sees them: the same rule in training, evaluation and serving.

    The defaults are Unsloth's ``UnslothVisionDataCollator`` defaults; the pipeline sets its own values in
    ``params.yaml``. The rule is validated when it is made.
    """

    resize: Optional[Union[str, int, list, tuple]] = field(default="min", metadata={"help": (
        "'min'/'max' (the model's own smallest/largest intended image side), a side length in px (the side "
        "resize_dimension picks; aspect kept), [width, height], or null to keep images as they are.")})
    resize_dimension: Union[int, str] = field(default=0, metadata={"help": (
        "Which side drives the aspect-preserving resize: 0 (width), 1 (height), 'max' or 'min'.")})
    snap_to_patch_size: bool = field(default=False, metadata={"help": (
        "Round image sides to the vision patch size (times merge size where the model merges).")})

    def __post_init__(self) -> None:
        if self.resize_dimension not in RESIZE_DIMENSIONS or isinstance(self.resize_dimension, bool):
            raise ValueError(f"resize_dimension={self.resize_dimension!r}: expected 0, 1, 'max' or 'min'")
        target_size(64, 32, self.resize, self.resize_dimension, (64, 64), None)  # raises for a bad `resize`

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ImageRule":
        """The rule from a mapping holding (some of) its fields, e.g. a served model's ``model_config``;
        other keys are ignored and missing fields take the defaults."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


# ---------------------------------------------------------------------------------------------- loading
def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: EXIF orientation applied, transparency composited on white, 16-bit scaled."""
    import numpy as np
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else float(a.max()) if a.size and a.max() > 255 else 255.0
        a = np.clip(a * (255.0 / max(top, 1.0)), 0, 255).round().astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode == "1":
        im = im.convert("L")
    return im.convert("RGB") if im.mode != "RGB" else im


def load_image(value: Any, base_dir: Optional[Path] = None) -> Image.Image:
    """A PIL RGB image from a PIL image, a path, raw bytes or an Arrow ``{"bytes", "path"}`` dict.

    A relative path that does not exist is looked up under ``base_dir``. EXIF orientation is applied
    (phone photos are stored rotated) and the mode converted as :func:`to_rgb` does. Base64 text (how
    images travel in JSON serving requests) goes through :func:`decode_image_value` first.
    """
    from PIL import Image

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, (bytes, bytearray)):
        img = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None and not path.exists():
            path = base_dir / path
        if not path.exists():
            raise FileNotFoundError(f"image {str(value)!r} not found (looked in {path.parent}); fix the path in your data")
        img = Image.open(path)
    else:
        raise TypeError(f"unsupported image value of type {type(value).__name__}: expected a PIL image, path, bytes or dict")
    return to_rgb(img)


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except (OSError, ValueError):  # e.g. a base64 string longer than the file-name limit
        return False


def decode_image_value(value: Any) -> Any:
    """An image value as :func:`load_image` takes it; a str that is not an existing file is decoded as
    base64 (how images travel in JSON serving requests)."""
    if isinstance(value, str) and not _is_file(value):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise FileNotFoundError(
                f"image {value[:80]!r} is neither an existing file nor base64-encoded image bytes; pass a path "
                "that exists where the model runs, or base64.b64encode(open(path, 'rb').read()).decode()"
            ) from None
    return value


# ------------------------------------------------------------------------------------------- size rules
def snap_to_multiple(side: int, multiple: int) -> int:
    """``side`` rounded to the nearest multiple of ``multiple``, never below one multiple."""
    return max(multiple, round(side / multiple) * multiple)


def _driving_side(w: int, h: int, resize_dimension: Union[int, str]) -> int:
    if resize_dimension == 0:
        return w
    if resize_dimension == 1:
        return h
    if resize_dimension == "max":
        return max(w, h)
    if resize_dimension == "min":
        return min(w, h)
    raise ValueError(f"resize_dimension={resize_dimension!r}: expected 0, 1, 'max' or 'min'")


def target_size(w: int, h: int, resize: Any, resize_dimension: Union[int, str], bounds: tuple[int, int],
                multiple: Optional[int]) -> tuple[int, int]:
    """The (width, height) the collator's rule gives an image of size ``(w, h)``.

    ``resize``/``resize_dimension`` as in :class:`ImageRule`; ``bounds`` are the model's ('min', 'max')
    sides and ``multiple`` its patch multiple (None: no snapping). Pure function (tested directly).
    """
    if resize is None:
        nw, nh = w, h
    elif isinstance(resize, (tuple, list)):
        if len(resize) != 2 or not all(isinstance(x, int) and x > 0 for x in resize):
            raise ValueError(f"resize={resize!r}: a size must be two positive integers (width, height)")
        nw, nh = int(resize[0]), int(resize[1])
    elif resize in ("min", "max") or (isinstance(resize, int) and not isinstance(resize, bool)):
        if isinstance(resize, int):
            if resize <= 0:
                raise ValueError(f"resize={resize!r}: a side length must be a positive integer")
            side = resize
        else:
            side = bounds[0] if resize == "min" else bounds[1]
        scale = side / _driving_side(w, h, resize_dimension)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    else:
        raise ValueError(f"resize={resize!r}: expected 'min', 'max', a side length in px, a (width, height) tuple or None")
    if multiple:
        nw, nh = snap_to_multiple(nw, multiple), snap_to_multiple(nh, multiple)
    return nw, nh


def bounded_size(width: int, height: int, min_px: int, max_px: int, snap: int = 0) -> tuple[int, int]:
    """Normalization's rule: the size for a ``width`` x ``height`` image with its sides in ``[min_px, max_px]``.

    Aspect is kept. A long side above ``max_px`` is scaled down to it; a short side below ``min_px`` is
    scaled up, but never so far that the long side passes ``max_px`` (the pixel budget wins over the lower
    bound). ``snap`` > 0 rounds each side to a multiple of it, staying within the bounds where it can.
    """
    if min(width, height) <= 0:
        raise ValueError(f"image size {width}x{height} is empty")
    short, long = min(width, height), max(width, height)
    scale = 1.0
    if long > max_px:
        scale = max_px / long
    elif short < min_px:
        scale = min(min_px / short, max_px / long)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    if snap and snap > 0:
        w, h = _snap_within(w, snap, min_px, max_px), _snap_within(h, snap, min_px, max_px)
    return w, h


def _snap_within(v: int, multiple: int, min_px: int, max_px: int) -> int:
    r = round(v / multiple) * multiple
    if r < min_px and math.ceil(v / multiple) * multiple <= max_px:
        r = math.ceil(v / multiple) * multiple
    if r > max_px:
        r = (max_px // multiple) * multiple
    return max(multiple, r)


# ---------------------------------------------------------------------------------------------- resizing
@dataclass(frozen=True)
class Resizer:
    """An :class:`ImageRule` for one model (its 'min'/'max' sides and patch multiple): PIL image -> resized image.

    :func:`visiontune.inference.model_resizer` makes one for a model (kept there so that the data stages,
    which use this module, do not depend on the architecture registry)."""

    rule: ImageRule
    bounds: tuple[int, int] = FALLBACK_BOUNDS
    multiple: Optional[int] = None

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) an image of this size is resized to."""
        return target_size(width, height, self.rule.resize, self.rule.resize_dimension, self.bounds, self.multiple)

    def __call__(self, img: Image.Image) -> Image.Image:
        from PIL import Image

        size = self.size(img.width, img.height)
        return img if size == img.size else img.resize(size, Image.Resampling.BICUBIC)
