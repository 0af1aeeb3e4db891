"""The one definition of image preprocessing, shared by prepare, adapt, predict and serve.

Training images and user images must go through exactly the same steps, otherwise a served model
sees inputs it was never trained on; so every stage calls these functions instead of its own.

Two steps, kept apart on purpose:

* ``load_image`` decodes and resizes to a ``uint8`` array. It needs only Pillow and numpy, so the
  serving path can use it without importing torch.
* ``to_float`` / ``to_float_numpy`` turn ``uint8`` into the network's float input. Prepared data is
  stored as ``uint8`` (4x smaller), and the conversion runs on whole task batches at sampling time.

Omniglot: grayscale, 28x28 with Lanczos, then ``1 - x/255`` so strokes are 1 and paper is 0 (as in
the MAML paper code). Note that the paper code resized the 1-bit PNGs directly, and Pillow silently
falls back to nearest-neighbour for mode ``"1"`` images; we convert to ``"L"`` first so the Lanczos
filter really applies (smooth, anti-aliased strokes).

miniImageNet: RGB, 84x84 with Lanczos, ``x/255`` channels-first.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from mamlops import datasets
from mamlops.errors import UserError

if TYPE_CHECKING:  # torch is imported lazily in ``to_float`` so serving can skip it
    import torch


def _open(image: str | Path | bytes | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, bytes | bytearray):
        return Image.open(io.BytesIO(image))
    return Image.open(image)


def _flatten_alpha(im: Image.Image) -> Image.Image:
    """Composite transparent images onto white: a user's PNG drawing with a transparent background
    would otherwise turn black (= all strokes for Omniglot) when the alpha is dropped."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im


def load_image(image: str | Path | bytes | Image.Image, dataset: str) -> np.ndarray:
    """Decode and resize one image to ``uint8``: ``[H, W]`` (Omniglot) or ``[H, W, 3]``.

    ``image`` is a path, encoded bytes or a Pillow image; size and colour mode are the data
    set's (``datasets/``).
    """
    data = datasets.get(dataset)
    side = data.image_size
    im = _flatten_alpha(_open(image))
    im = im.convert(data.color_mode)  # before resizing: mode "1" would silently use NEAREST
    if im.size != (side, side):
        im = im.resize((side, side), resample=Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


class ImageError(UserError):
    """An image that cannot be decoded; the message names it."""


def read_image(image: str | Path | bytes | Image.Image, dataset: str) -> np.ndarray:
    """``load_image`` for input a user hands over: an unreadable file becomes an ``ImageError``
    that names it, instead of whichever of Pillow's many exceptions it raised."""
    try:
        return load_image(image, dataset)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # incl. Unidentified...
        name = image if isinstance(image, str | Path) else "the image"
        raise ImageError(
            f"cannot read image {name} ({exc.__class__.__name__}: {exc}); convert it to PNG or JPEG"
        ) from exc


def to_float_numpy(x: np.ndarray, dataset: str) -> np.ndarray:
    """``uint8`` images ``[..., H, W]`` / ``[..., H, W, 3]`` to float32 ``[..., C, H, W]``."""
    x = np.asarray(x)
    # (255 - x) / 255 == 1 - x/255, rounded once: numpy and torch agree
    if datasets.get(dataset).invert:
        return ((255 - x.astype(np.uint8)).astype(np.float32) / np.float32(255.0))[..., None, :, :]
    return np.moveaxis(x.astype(np.float32) / np.float32(255.0), -1, -3)


def to_float(x: Any, dataset: str) -> torch.Tensor:
    """Like ``to_float_numpy`` but for torch (tensor or array in, float32 tensor out).

    Works on whole batches on any device, so task sampling converts once per batch.
    """
    import torch

    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if datasets.get(dataset).invert:  # inverting in uint8 first saves a pass over the float batch
        return (255 - t.to(torch.uint8)).to(torch.float32).div_(255.0).unsqueeze(-3)
    return t.to(torch.float32).div_(255.0).movedim(-1, -3)
