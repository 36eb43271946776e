"""The embedded default data: photographs bundled with scikit-image (no download).

Whole images are split between training and evaluation, so a held-out crop never shares pixels
(or a near-duplicate view) with a training crop. Images larger than ``max_side`` are downscaled
with an antialiasing filter; grey photographs are replicated to three channels.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from .io import array_to_tensor

#: Training photographs (colour and grey) from ``skimage.data``.
TRAIN_IMAGES: tuple[str, ...] = (
    "astronaut", "rocket", "motorcycle", "immunohistochemistry", "camera", "coins", "moon", "brick", "grass", "gravel",
)
#: Held-out photographs used only for evaluation.
EVAL_IMAGES: tuple[str, ...] = ("coffee", "chelsea")


def _fetch(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle":  # the left view of the stereo pair; the right view is never used
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def _resize_max_side(array: np.ndarray, max_side: int) -> np.ndarray:
    from PIL import Image

    h, w = array.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return array
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(array).resize(size, Image.Resampling.LANCZOS))


@functools.lru_cache(maxsize=8)
def _load(names: tuple[str, ...], max_side: int) -> tuple[tuple[str, torch.Tensor], ...]:
    out = []
    for name in names:
        try:
            array = _fetch(name)
        except Exception as err:  # an image a future scikit-image stops bundling is skipped, not fatal
            warnings.warn(f"skimage.data.{name} unavailable ({err.__class__.__name__}); skipped", stacklevel=3)
            continue
        out.append((name, array_to_tensor(_resize_max_side(np.asarray(array), max_side))))
    if not out:
        raise RuntimeError("none of the scikit-image sample photographs could be loaded")
    return tuple(out)


def embedded_images(split: str = "train", max_side: int = 512) -> list[tuple[str, torch.Tensor]]:
    """``[(name, image (3,H,W) float32 in [0,1]), ...]`` for ``split`` in ``"train"`` / ``"eval"``."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not (isinstance(max_side, int) and max_side >= 32):
        raise ValueError(f"max_side must be an int >= 32, got {max_side!r}")
    names = TRAIN_IMAGES if split == "train" else EVAL_IMAGES
    return [(n, t.clone()) for n, t in _load(names, max_side)]


def eval_crop_boxes(height: int, width: int, crop: int, count: int) -> list[tuple[int, int]]:
    """``count`` top-left corners of ``crop``-sized boxes spread evenly over an image (deterministic)."""
    if crop > min(height, width):
        raise ValueError(f"crop {crop} is larger than the image ({height}x{width})")
    cols = int(np.ceil(np.sqrt(count * width / height)))
    rows = int(np.ceil(count / cols))
    ys = np.linspace(0, height - crop, rows).round().astype(int)
    xs = np.linspace(0, width - crop, cols).round().astype(int)
    boxes = [(int(y), int(x)) for y in ys for x in xs]
    # keep an evenly spaced subset when the grid has more cells than asked for
    pick = np.linspace(0, len(boxes) - 1, count).round().astype(int)
    return [boxes[i] for i in pick]


__all__ = ["EVAL_IMAGES", "TRAIN_IMAGES", "embedded_images", "eval_crop_boxes"]
