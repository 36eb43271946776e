"""Reading and writing images as float tensors ``(3, H, W)`` in ``[0, 1]``.

Pillow does the decoding. Grey images are replicated to three channels, alpha is dropped, 16-bit
images are scaled by 65535. Failures raise ``FileNotFoundError`` / ``ValueError`` with the path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` has one of the image extensions cplfast reads (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The image files in ``folder`` sorted by name (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and is_image_file(p) and not p.name.startswith("."))


def array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """``(H,W)``, ``(H,W,1|3|4)`` uint8 / uint16 / bool / float array -> float32 ``(3,H,W)`` in [0,1]."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"image array must be (H,W), (H,W,1), (H,W,3) or (H,W,4), got shape {array.shape}")
    array = array[..., :3]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.dtype == np.uint8:
        out = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        out = array.astype(np.float32) / 65535.0
    elif array.dtype == np.bool_:
        out = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.floating):
        out = np.clip(array.astype(np.float32), 0.0, 1.0)
    else:
        raise ValueError(f"unsupported image dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def tensor_to_uint8(image: torch.Tensor) -> np.ndarray:
    """Float ``(3,H,W)`` (or ``(1,3,H,W)``) in [0,1] -> uint8 ``(H,W,3)``, rounded to nearest."""
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape (3,H,W) or (1,3,H,W), got {tuple(image.shape)}")
    array = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    array = array.transpose(1, 2, 0)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as float32 ``(3,H,W)`` in [0,1]."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected an image file, got a folder: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(im).astype(np.uint16)
            elif im.mode in ("RGB", "L", "RGBA", "LA"):
                array = np.asarray(im if im.mode != "LA" else im.convert("L"))
            else:
                array = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read {path} as an image ({err.__class__.__name__})") from None
    return array_to_tensor(array)


def save_image(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write float ``(3,H,W)`` in [0,1] to ``path`` (format from the extension; PNG if none).

    The file is written to a temporary name in the same folder and renamed, so a reader never sees
    a half-written image.
    """
    from PIL import Image

    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    if not is_image_file(path):
        raise ValueError(f"unsupported output image extension {path.suffix!r} (use one of {', '.join(IMAGE_EXTENSIONS)})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        Image.fromarray(tensor_to_uint8(image)).save(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


__all__ = ["IMAGE_EXTENSIONS", "array_to_tensor", "is_image_file", "list_images", "load_image", "save_image", "tensor_to_uint8"]
