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
# The most pixels (width x height) an image may have to be decoded: the default of validate.max_pixels and
# register.max_pixels, and the guard of load_image. A decompression bomb (a small file that decodes to
# gigabytes) is refused from its header, before a single pixel is decoded.
MAX_PIXELS = 40_000_000
# The one answer of the served model to an image value it does not take, whatever the reason: it must not
# tell a caller which files exist on the server.
REFUSED_IMAGE = (
    "image refused: send the image's bytes, base64-encoded (base64.b64encode(open(path, 'rb').read()).decode()); "
    "this model reads files only under the folder set at registration (register.image_root)"
)


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
    trim: bool = field(default=False, metadata={"help": (
        "Crop each image to its ink (whatever differs from the paper) plus a margin before resizing: text "
        "written small on a large page then reaches the model as large as text that fills its page. For "
        "single-line text images (the demo); leave off for photos and documents with layout.")})

    def __post_init__(self) -> None:
        if self.resize_dimension not in RESIZE_DIMENSIONS or isinstance(self.resize_dimension, bool):
            raise ValueError(f"resize_dimension={self.resize_dimension!r}: expected 0, 1, 'max' or 'min'")
        if not isinstance(self.trim, bool):
            raise ValueError(f"trim={self.trim!r}: expected true or false")
        target_size(64, 32, self.resize, self.resize_dimension, (64, 64), None)  # raises for a bad `resize`

    @classmethod
    def of(cls, section: Any) -> "ImageRule":
        """The rule read field by field from the config's ``images`` section (an ImageRule, or the read-recording
        view the stage registry's tests pass), so every setting read is a recorded read."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls)})

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


class ImageTooLargeError(ValueError):
    """An image whose header claims more pixels than allowed: refused before decoding."""


class ImageRefusedError(ValueError):
    """An image value the served model does not take (see :func:`open_served_image`)."""


def _open_checked(source: Any, what: str, max_pixels: int) -> Image.Image:
    """``Image.open`` (header only) plus the pixel check, so nothing larger than ``max_pixels`` is decoded."""
    from PIL import Image

    try:
        img = Image.open(source)
    except Image.DecompressionBombError as e:  # PIL's own guard (2 x Image.MAX_IMAGE_PIXELS) caught it first
        raise ImageTooLargeError(f"{what}: {e} Refused before decoding.") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageTooLargeError(
            f"{what} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}: refused before decoding "
            "(a decompression bomb, or an image to shrink before sending it)")
    return img


def load_image(value: Any, base_dir: Optional[Path] = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A PIL RGB image from a PIL image, a path, raw bytes or an Arrow ``{"bytes", "path"}`` dict.

    A relative path that does not exist is looked up under ``base_dir``. EXIF orientation is applied
    (phone photos are stored rotated) and the mode converted as :func:`to_rgb` does. Base64 text (how
    images travel in JSON serving requests) goes through :func:`decode_image_value` first. Bytes and
    files are opened header first: more than ``max_pixels`` raises :class:`ImageTooLargeError` before
    decoding; a PIL image is the caller's own, already opened (:func:`open_served_image` checks those).
    """
    from PIL import Image

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, (bytes, bytearray)):
        img = _open_checked(io.BytesIO(value), "image bytes", max_pixels)
    elif isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None and not path.exists():
            path = base_dir / path
        if not path.exists():
            raise FileNotFoundError(f"image {str(value)!r} not found (looked in {path.parent}); fix the path in your data")
        img = _open_checked(path, f"image {path}", max_pixels)
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
    base64 (how images travel in JSON serving requests).

    For the project's own data (training, evaluation): any path is read. The served model takes requests
    from others and uses :func:`open_served_image` instead.
    """
    if isinstance(value, str) and not _is_file(value):
        data = _base64_bytes(value)
        if data is None:
            raise FileNotFoundError(
                f"image {value[:80]!r} is neither an existing file nor base64-encoded image bytes; pass a path "
                "that exists where the model runs, or base64.b64encode(open(path, 'rb').read()).decode()")
        return data
    return value


def _base64_bytes(value: str) -> Optional[bytes]:
    """The bytes of base64 text; None if ``value`` is not base64."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def _allowed_file(value: str, image_root: Optional[Union[str, Path]]) -> Optional[Path]:
    """``value`` as a regular file inside ``image_root`` (``..`` and symlinks resolved first), else None."""
    if not image_root or "\x00" in value:
        return None
    try:
        root = Path(image_root).resolve()
        path = (root / value).resolve()  # an absolute value stays absolute
        return path if path.is_relative_to(root) and path.is_file() else None
    except (OSError, ValueError, RuntimeError):  # over-long names, symlink loops
        return None


def open_served_image(value: Any, image_root: Optional[Union[str, Path]] = None,
                      max_pixels: int = MAX_PIXELS) -> Image.Image:
    """One image of a request to the served model, opened (header only) and size-checked, not yet decoded.

    Taken: raw bytes, base64 text, a PIL image (in-process calls), and, only when ``image_root`` is set,
    the path of a regular file inside it (relative paths are relative to it). Anything else, a path
    outside the root, a missing file, a non-image, raises :class:`ImageRefusedError` with one and the same
    message (:data:`REFUSED_IMAGE`): a caller learns nothing about the server's files. More than
    ``max_pixels`` raises :class:`ImageTooLargeError` before decoding.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, dict):  # Arrow's {"bytes", "path"}; its path obeys the same rule as a plain one
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        w, h = value.size
        if w * h > max_pixels:
            raise ImageTooLargeError(f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")
        return value
    if isinstance(value, (str, Path)):
        source: Any = _allowed_file(str(value), image_root) or _base64_bytes(str(value))
    else:
        source = bytes(value) if isinstance(value, (bytes, bytearray)) else None
    if source is None:
        raise ImageRefusedError(REFUSED_IMAGE)
    try:
        return _open_checked(io.BytesIO(source) if isinstance(source, bytes) else source, "image", max_pixels)
    except (UnidentifiedImageError, OSError):
        raise ImageRefusedError(REFUSED_IMAGE) from None


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


# ---------------------------------------------------------------------------------------------- trimming
# An image is searched for its ink at no more than this height: the box needs no finer grain, and a median
# filter over a 1,100 x 300 page costs ~10 ms at full size, ~1 ms at 96 rows (this machine).
_TRIM_SEARCH_ROWS = 96


def ink_box(img: Image.Image) -> Optional[tuple[int, int, int, int]]:
    """The (left, top, right, bottom) box of ``img``'s ink, or None when nothing stands out from the paper.

    The paper is the median grey level; ink is what differs from it by more than a third of the strongest
    differences (and at least 24 of 255 levels), on a copy reduced to ~96 rows and median-filtered, so lone specks,
    paper texture and noise are not ink. Dark ink on light paper and light on dark alike."""
    import numpy as np
    from PIL import ImageFilter

    grey = img.convert("L")
    k = max(1, math.ceil(grey.height / _TRIM_SEARCH_ROWS))
    small = grey.reduce(k) if k > 1 else grey
    g = np.asarray(small.filter(ImageFilter.MedianFilter(3)), dtype=np.float32)
    d = np.abs(g - float(np.median(g)))
    ink = d > max(24.0, 0.35 * float(np.percentile(d, 99.5)))
    rows, cols = np.flatnonzero(ink.sum(1) >= 2), np.flatnonzero(ink.sum(0) >= 2)
    if rows.size == 0 or cols.size == 0:
        return None
    return (int(cols[0]) * k, int(rows[0]) * k, min(img.width, (int(cols[-1]) + 1) * k),
            min(img.height, (int(rows[-1]) + 1) * k))


def trim_to_ink(img: Image.Image, margin: float = 0.12) -> Image.Image:
    """``img`` cropped to its :func:`ink_box` plus ``margin`` x the ink's height (and 2 px) on every side; the
    image itself when it has no ink."""
    box = ink_box(img)
    if box is None:
        return img
    x0, y0, x1, y1 = box
    pad = int(round(margin * (y1 - y0))) + 2
    box = (max(0, x0 - pad), max(0, y0 - pad), min(img.width, x1 + pad), min(img.height, y1 + pad))
    return img if box == (0, 0, img.width, img.height) else img.crop(box)


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

        if self.rule.trim:
            img = trim_to_ink(img)
        size = self.size(img.width, img.height)
        return img if size == img.size else img.resize(size, Image.Resampling.BICUBIC)
