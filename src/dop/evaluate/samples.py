"""Samples and their errors: the leaf the data set readers share (:mod:`.datasets` for JSONL
and the shapes benchmark, :mod:`.hf` for Hugging Face data sets)."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from PIL import Image, UnidentifiedImageError

DEFAULT_TASK = "all"


class DatasetError(ValueError):
    """A data set spec or file is unusable; the message names the line or value."""


_max_pixels: int | None = None  # None: PIL's Image.MAX_IMAGE_PIXELS


def max_image_pixels() -> int:
    """The largest image (width x height) a data set may hold: PIL's decompression-bomb
    limit unless :func:`set_max_image_pixels` (CLI ``--max-image-pixels``) raised it."""
    return _max_pixels or int(Image.MAX_IMAGE_PIXELS or 0) or 2**62


def set_max_image_pixels(n: int | None) -> None:
    global _max_pixels
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DatasetError(f"max_image_pixels must be a positive integer, got {n!r}")
    _max_pixels = n


def open_image(path: str, where: str):
    """``Image.open`` (lazy: reads the header only) with the pixel count checked against
    :func:`max_image_pixels` before any pixel is decoded."""
    limit = max_image_pixels()
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our check below replaces PIL's (its error is not one line)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = before
    w, h = im.size
    if w * h > limit:
        im.close()
        raise DatasetError(
            f"{where}: image {path if isinstance(path, str) else '(embedded)'!r} has {w}x{h} = {w * h} pixels, above the limit of {limit} "
            f"(a decompression bomb guard); raise it with --max-image-pixels {w * h} "
            f"(Python: dop.evaluate.datasets.set_max_image_pixels) if the image is genuine"
        )
    return im


@dataclass
class Sample:
    """One question about one image. ``image`` is a PIL image, or None until
    :meth:`load_image` opens ``image_path``; ``where`` says where the sample came from
    (``file.jsonl line 3`` or ``shapes:test #12``) for error messages."""

    question: str
    answers: list[str]
    task: str
    image: Any = None
    image_path: str | None = None
    where: str = ""
    image_bytes: bytes | None = None  # an encoded image (Hugging Face data sets), decoded on first use
    image_column: str = "image"

    def load_image(self):
        """The image as PIL RGB (opened from ``image_bytes`` or ``image_path`` on first use; the
        pixel count is checked before decoding)."""
        if self.image is None and self.image_bytes is not None:
            try:
                with open_image(io.BytesIO(self.image_bytes), f"{self.where}, column {self.image_column!r}") as im:
                    self.image = im.convert("RGB")
            except (UnidentifiedImageError, OSError) as e:
                raise DatasetError(f"{self.where}, column {self.image_column!r}: not an image ({e})") from None
        elif self.image is None:
            try:
                with open_image(self.image_path, self.where) as im:
                    self.image = im.convert("RGB")
            except FileNotFoundError:
                raise DatasetError(f"{self.where}: image file {self.image_path!r} not found") from None
            except (UnidentifiedImageError, OSError) as e:
                raise DatasetError(f"{self.where}: cannot read image {self.image_path!r} ({e})") from None
        elif getattr(self.image, "mode", "RGB") != "RGB":
            self.image = self.image.convert("RGB")
        return self.image


def check_known_tasks(tasks: Iterable[str], known: Sequence[str], where: str) -> None:
    """Refuse task names of ``tasks`` that ``known`` (the tasks of data set ``where``) lacks."""
    bad = [t for t in tasks if t not in known]
    if bad:
        raise DatasetError(
            f"unknown task(s) {', '.join(map(repr, bad))} for {where}; known tasks: {', '.join(known)}"
        )
