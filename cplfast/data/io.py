"""Reading and writing images as float tensors ``(3, H, W)`` in ``[0, 1]``, keeping what the image is.

:func:`read_image` returns the RGB tensor the models work on plus an :class:`ImageInfo` describing the
file: format, bit depth (8 or 16), whether it is greyscale, its alpha channel, ICC profile, EXIF (with the
orientation already applied to the pixels and reset to 1), and for JPEG the estimated quality and chroma
subsampling. :func:`write_image` stores a restored tensor back the same way: greyscale as luminance
(ITU-R BT.601 weights, as Pillow's ``L``), 16-bit as 16-bit (PNG, TIFF), the original alpha re-attached,
ICC/EXIF/DPI copied, JPEG at the input's quality (or ``quality``). Formats follow the output extension.

Pillow decodes 16-bit RGB(A) PNG to 8 bits; :func:`read_image` decodes such files twice with Pillow's
big- and little-endian 16-bit unpackers (each keeps one byte of every sample) and joins the bytes, and
:func:`write_image` writes 16-bit PNG itself (zlib, "Up" row filter). 16-bit TIFF goes through
``tifffile``. Every file is written to a temporary name in the target folder and renamed, so a reader
(or a crash) never sees a half-written image and an existing file is never truncated.

Failures raise ``FileNotFoundError`` / ``ValueError`` naming the path.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# output format per extension (Pillow names)
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
            ".webp": "WEBP", ".ppm": "PPM", ".pgm": "PPM"}
_ALPHA_FORMATS = ("PNG", "TIFF", "WEBP")
_DEEP_FORMATS = ("PNG", "TIFF")  # formats written with 16 bits per sample
_ORIENTATION = 0x0112
# IJG standard luminance quantisation table (quality 50); quality is estimated from the ratio of sums
_IJG_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
             14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
             49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)


@dataclass
class ImageInfo:
    """What :func:`write_image` needs to store a restored image as the original was stored.

    ``alpha``: the original alpha channel ``(H, W)`` after orientation (uint8 or uint16), or None.
    ``exif``: EXIF bytes with the orientation tag reset to 1 (the pixels are already upright).
    ``quality``: estimated JPEG quality (IJG scale 1-100); ``subsampling``: Pillow's JPEG subsampling code.
    """

    format: str | None = None
    bits: int = 8
    grey: bool = False
    alpha: np.ndarray | None = None
    icc: bytes | None = None
    exif: bytes | None = None
    dpi: tuple | None = None
    quality: int | None = None
    subsampling: int | None = None
    orientation: int = 1


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` has one of the image extensions cplfast reads (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The image files in ``folder`` sorted by name (hidden files and hidden folders skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    pattern = "**/*" if recursive else "*"
    return sorted(
        p for p in folder.glob(pattern)
        if p.is_file() and is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """``(H,W)``, ``(H,W,1|2|3|4)`` uint8 / uint16 / bool / float array -> float32 ``(3,H,W)`` in [0,1]
    (grey replicated to three channels, alpha dropped)."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"image array must be (H,W), (H,W,1), (H,W,2), (H,W,3) or (H,W,4), got shape {array.shape}")
    array = array[..., :1] if array.shape[2] <= 2 else array[..., :3]
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


# ------------------------------------------------------------------------------------------- reading
def orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation ``1..8`` to an ``(H, W[, C])`` array (as ``PIL.ImageOps.exif_transpose``)."""
    ops = {
        2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    op = ops.get(int(orientation))
    return np.ascontiguousarray(op(array)) if op else array


def jpeg_quality(quantization: dict | None) -> int | None:
    """IJG quality (1-100) whose scaled standard luminance table best matches table 0 of ``quantization``."""
    if not quantization or 0 not in quantization:
        return None
    table = np.asarray(list(quantization[0]), dtype=np.float64)
    if table.size != 64:
        return None
    scale = 100.0 * table.sum() / float(sum(_IJG_LUMA))
    quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return int(min(100, max(1, round(quality))))


def _png_16bit(path: Path, tiles: list) -> np.ndarray | None:
    """A 16-bit RGB/RGBA/LA PNG as uint16 ``(H, W, C)``: Pillow decodes it twice, keeping the high byte
    (``;16B``) then the low byte (``;16L`` read on big-endian data) of every sample."""
    from PIL import Image

    tile = tiles[0] if len(tiles) == 1 else None
    rawmode = tile.args if tile is not None and isinstance(tile.args, str) else None
    if rawmode not in ("RGB;16B", "RGBA;16B", "LA;16B"):
        return None
    with Image.open(path) as hi:
        hi.load()
        high = np.asarray(hi).astype(np.uint16)
    try:
        with Image.open(path) as lo:
            lo.tile = [lo.tile[0]._replace(args=rawmode[:-1] + "L")]
            lo.load()
            low = np.asarray(lo).astype(np.uint16)
    except (ValueError, OSError, KeyError):
        warnings.warn(f"{path}: this Pillow cannot decode 16-bit {rawmode[:-4]} PNG losslessly; read as 8 bits",
                      stacklevel=3)
        return None
    return (high << 8) | low


def _tiff_array(path: Path) -> np.ndarray | None:
    """A TIFF of more than 8 bits per sample as a uint16 array, via tifffile (None when not applicable)."""
    try:
        import tifffile
    except ImportError:
        return None
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        if page.bitspersample <= 8 or page.dtype is None:
            return None
        array = page.asarray()
    if array.dtype == np.uint16:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return (np.clip(array, 0, 1) * 65535 + 0.5).astype(np.uint16)
    return None


def _decode(path: Path):
    """``(array (H,W[,C]) uint8/uint16, info)`` before orientation."""
    from PIL import Image, JpegImagePlugin

    with Image.open(path) as im:
        tiles = list(im.tile)  # before getexif(), which loads a PNG to reach chunks after its pixels
        info = ImageInfo(format=im.format, icc=im.info.get("icc_profile") or None, dpi=im.info.get("dpi"))
        exif = im.getexif()
        info.orientation = int(exif.get(_ORIENTATION, 1) or 1)
        if len(exif):
            if _ORIENTATION in exif:
                exif[_ORIENTATION] = 1
            info.exif = exif.tobytes()
        if im.format == "JPEG":
            info.quality = jpeg_quality(getattr(im, "quantization", None))
            sampling = JpegImagePlugin.get_sampling(im)
            info.subsampling = sampling if sampling >= 0 else None
        array = None
        if im.format == "PNG" and im.mode in ("RGB", "RGBA", "LA"):
            array = _png_16bit(path, tiles)
        elif im.format == "TIFF":
            array = _tiff_array(path)
        if array is None:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                array = np.asarray(im).astype(np.int64).clip(0, 65535).astype(np.uint16)
            elif mode in ("L", "LA", "RGB", "RGBA"):
                array = np.asarray(im)
            elif mode == "1":
                array = np.asarray(im.convert("L"))
            elif mode in ("P", "PA"):
                has_alpha = mode == "PA" or "transparency" in im.info
                array = np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
            elif mode == "F":
                array = (np.clip(np.asarray(im), 0, 1) * 65535 + 0.5).astype(np.uint16)
            else:  # CMYK, YCbCr, LAB, HSV, ...
                array = np.asarray(im.convert("RGB"))
    info.bits = 16 if array.dtype == np.uint16 else 8
    channels = 1 if array.ndim == 2 else array.shape[2]
    info.grey = channels in (1, 2)
    if channels in (2, 4):
        info.alpha = np.ascontiguousarray(array[..., -1])
        array = array[..., :-1]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    return array, info


def read_image(path: str | os.PathLike) -> tuple[torch.Tensor, ImageInfo]:
    """``(float32 (3,H,W) in [0,1], ImageInfo)`` of an image file, EXIF orientation applied."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected an image file, got a folder: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            array, info = _decode(path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError, EOFError, struct.error) as err:
        if isinstance(err, PermissionError):
            raise PermissionError(f"cannot read {path}: permission denied") from None
        raise ValueError(f"cannot read {path} as an image ({err.__class__.__name__}: {str(err)[:80]})") from None
    if info.orientation != 1:
        array = orient(array, info.orientation)
        if info.alpha is not None:
            info.alpha = orient(info.alpha, info.orientation)
    return array_to_tensor(array), info


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as float32 ``(3,H,W)`` in [0,1] (EXIF orientation applied, alpha dropped)."""
    return read_image(path)[0]


def check_image_file(path: str | os.PathLike, *, min_side: int = 1) -> str | None:
    """Why ``path`` cannot be used as an image (fully decoded), or None when it can."""
    try:
        image, _ = read_image(path)
    except (OSError, ValueError) as err:
        return str(err)
    h, w = image.shape[-2:]
    if min(h, w) < min_side:
        return f"{path} is {w}x{h} pixels, smaller than the {min_side} pixels needed"
    return None


# ------------------------------------------------------------------------------------------- writing
def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png16(array: np.ndarray, *, icc: bytes | None = None, exif: bytes | None = None, dpi=None) -> bytes:
    """A 16-bit PNG of a uint16 ``(H,W)`` / ``(H,W,1|2|3|4)`` array (grey, grey+alpha, RGB, RGBA)."""
    if array.ndim == 2:
        array = array[..., None]
    h, w, c = array.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = np.ascontiguousarray(array.astype(">u2")).view(np.uint8).reshape(h, w * c * 2)
    filtered = rows.copy()
    filtered[1:] = rows[1:] - rows[:-1]  # "Up" filter (type 2), uint8 arithmetic wraps as PNG's does
    raw = np.concatenate([np.full((h, 1), 2, np.uint8), filtered], axis=1).tobytes()
    out = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))]
    if icc:
        out.append(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
    if dpi:
        ppm = [int(round(float(d) / 0.0254)) for d in dpi[:2]]
        out.append(_png_chunk(b"pHYs", struct.pack(">IIB", ppm[0], ppm[1], 1)))
    if exif:
        out.append(_png_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
    out.append(_png_chunk(b"IDAT", zlib.compress(raw, 6)))
    out.append(_png_chunk(b"IEND", b""))
    return b"".join(out)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _quantise(values: np.ndarray, bits: int) -> np.ndarray:
    top = 65535 if bits == 16 else 255
    return (np.clip(values, 0.0, 1.0) * top + 0.5).astype(np.uint16 if bits == 16 else np.uint8)


def _alpha_to(alpha: np.ndarray, bits: int) -> np.ndarray:
    if bits == 16:
        return alpha if alpha.dtype == np.uint16 else alpha.astype(np.uint16) * 257
    if alpha.dtype == np.uint8:
        return alpha
    return ((alpha.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def output_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"unsupported output image extension {Path(path).suffix!r} (use one of {', '.join(IMAGE_EXTENSIONS)})")
    return _FORMATS[suffix]


def temp_path(path: Path) -> Path:
    """The hidden temporary name a file is written to before it is renamed to ``path``."""
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def write_image(image: torch.Tensor, path: str | os.PathLike, info: ImageInfo | None = None, *,
                quality: int | None = None) -> Path:
    """Write float ``(3,H,W)`` in [0,1] to ``path`` the way ``info`` says the original was stored.

    The format follows ``path``'s extension (PNG if none); grey / 16-bit / alpha / ICC / EXIF / DPI are
    kept where the format can hold them; JPEG and WebP use ``quality``, else the input's estimated JPEG
    quality, else 95. Written to a temporary file in the same folder, then renamed over ``path``.
    """
    from PIL import Image

    info = info or ImageInfo()
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    fmt = output_format(path)
    if quality is not None and not (isinstance(quality, int) and 1 <= quality <= 100):
        raise ValueError(f"quality must be an int in [1, 100], got {quality!r}")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape (3,H,W) or (1,3,H,W), got {tuple(image.shape)}")
    rgb = image.detach().to("cpu", torch.float64).clamp(0, 1).numpy().transpose(1, 2, 0)
    bits = 16 if info.bits == 16 and fmt in _DEEP_FORMATS else 8
    pixels = _quantise(_luminance(rgb) if info.grey else rgb, bits)
    alpha = info.alpha if info.alpha is not None and fmt in _ALPHA_FORMATS else None
    if alpha is not None:
        if alpha.shape != pixels.shape[:2]:
            raise ValueError(f"alpha of shape {alpha.shape} does not match the image {pixels.shape[:2]}")
        pixels = np.dstack([pixels, _alpha_to(alpha, bits)])

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        if bits == 16 and fmt == "PNG":
            data = encode_png16(pixels, icc=info.icc, exif=info.exif, dpi=info.dpi)
            with open(tmp, "wb") as fh:
                fh.write(data)
        elif bits == 16:  # TIFF
            import tifffile

            photometric = "minisblack" if info.grey else "rgb"
            extra = ["unassalpha"] if alpha is not None else None
            tifffile.imwrite(tmp, pixels, photometric=photometric, extrasamples=extra, iccprofile=info.icc,
                             compression="zlib", resolution=tuple(info.dpi[:2]) if info.dpi else None,
                             resolutionunit="INCH" if info.dpi else None)
        else:
            mode = ("LA" if info.grey else "RGBA") if alpha is not None else ("L" if info.grey else "RGB")
            if mode == "LA":
                im = Image.merge("LA", [Image.fromarray(np.ascontiguousarray(pixels[..., i])) for i in (0, 1)])
            else:
                im = Image.fromarray(np.ascontiguousarray(pixels))
            if fmt == "WEBP" and mode == "LA":
                im = im.convert("RGBA")
            elif fmt in ("JPEG", "WEBP", "BMP", "PPM") and mode == "LA":
                im = im.convert("L")
            kwargs: dict = {}
            if info.icc and fmt in ("PNG", "JPEG", "TIFF", "WEBP"):
                kwargs["icc_profile"] = info.icc
            if info.exif and fmt in ("PNG", "JPEG", "TIFF", "WEBP"):
                kwargs["exif"] = info.exif
            if info.dpi and fmt in ("PNG", "JPEG", "TIFF", "BMP"):
                kwargs["dpi"] = tuple(info.dpi[:2])
            if fmt in ("JPEG", "WEBP"):
                kwargs["quality"] = quality or info.quality or 95
            if fmt == "JPEG" and info.subsampling is not None and not info.grey:
                kwargs["subsampling"] = info.subsampling
            im.save(tmp, format=fmt, **kwargs)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_image(image: torch.Tensor, path: str | os.PathLike, info: ImageInfo | None = None, *,
               quality: int | None = None) -> Path:
    """Write float ``(3,H,W)`` in [0,1] to ``path`` (see :func:`write_image`; 8-bit RGB without ``info``)."""
    return write_image(image, path, info, quality=quality)


__all__ = [
    "IMAGE_EXTENSIONS", "ImageInfo", "array_to_tensor", "check_image_file", "encode_png16", "is_image_file",
    "jpeg_quality", "list_images", "load_image", "orient", "output_format", "read_image", "save_image",
    "temp_path", "tensor_to_uint8", "write_image",
]
