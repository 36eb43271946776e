"""Synthetic degradations for all-in-one restoration, seeded and reproducible (SPEC §6).

Every function takes a clean image as a float tensor ``(3,H,W)`` or ``(B,3,H,W)`` in ``[0,1]`` and
returns a degraded tensor of the same shape, dtype and device. Randomness comes only from the
``generator`` argument (a ``torch.Generator``, an ``int`` seed or a ``numpy.random.Generator``), so
the same seed gives the same image bit for bit.

Models (x = clean image, all values in [0,1]):

- ``gaussian_noise``: PromptIR's uint8 protocol, ``y = trunc(clip(255 x + σ n, 0, 255)) / 255`` with
  n ~ N(0, 1) and σ in {15, 25, 50}.
- ``rain_streaks``: sparse random seeds smeared along a line of length L at angle θ from vertical,
  ``y = clip(x + a · S, 0, 1)`` with S the streak layer (same on every channel).
- ``haze``: the atmospheric scattering model ``y = x · t + A (1 − t)``, ``t = exp(−β d)``, with
  A in [0.8, 1.0], β in [0.04, 0.2] and d in [1, 6] from :func:`depth_proxy` (the image is taken as
  a crop of a 512-pixel-high scene at a random height, so small crops get slowly varying haze).
- ``motion_blur`` / ``defocus_blur``: convolution with an anti-aliased line / disk kernel
  (reflect padding).
- ``low_light``: ``y = Poisson(k · g · x^γ) / k + N(0, σ_r²)`` — gamma, gain g, and Poisson–Gaussian
  sensor noise with k photons at full scale and read noise σ_r.
- composites ``"a+b[+c]"`` apply their parts in the physical order haze → rain → blur → low light →
  noise (CDD-11 style).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

GeneratorLike = Union[torch.Generator, int, np.random.Generator, None]

#: The five single-degradation tasks of the 5-task all-in-one setting, in report order.
TASKS: tuple[str, ...] = ("noise", "rain", "haze", "blur", "lowlight")

#: Names accepted by :func:`degrade` for a single degradation (variants fix a parameter).
SINGLE_DEGRADATIONS: tuple[str, ...] = (
    "noise", "noise15", "noise25", "noise50", "rain", "haze", "blur", "motion_blur", "defocus_blur", "lowlight",
)

#: Composite degradations in the spirit of CDD-11 (which also has snow, not synthesised here).
COMPOSITE_TASKS: tuple[str, ...] = ("lowlight+haze", "lowlight+rain", "haze+rain", "lowlight+haze+rain")

# Family of each degradation name and the order composites apply them in.
_FAMILY = {
    "haze": "haze", "rain": "rain", "blur": "blur", "motion_blur": "blur", "defocus_blur": "blur",
    "lowlight": "lowlight", "noise": "noise", "noise15": "noise", "noise25": "noise", "noise50": "noise",
}
_ORDER = ("haze", "rain", "blur", "lowlight", "noise")

NOISE_SIGMAS = (15, 25, 50)


# --------------------------------------------------------------------------------------- randomness
def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any printable parts (independent of ``PYTHONHASHSEED``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_generator(generator: GeneratorLike = None) -> torch.Generator:
    """A CPU ``torch.Generator`` from a generator, an int seed, a numpy Generator or ``None``.

    ``None`` draws a seed from torch's global RNG, so ``torch.manual_seed`` makes it reproducible.
    """
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
        return generator
    if isinstance(generator, np.random.Generator):
        seed = int(generator.integers(0, 2**63 - 1))
    elif generator is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    elif isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        seed = int(generator) & ((1 << 63) - 1)
    else:
        raise TypeError(
            f"generator must be a torch.Generator, an int seed, a numpy Generator or None, got {type(generator).__name__}"
        )
    return torch.Generator().manual_seed(seed)


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g, dtype=torch.float64))


def _log_uniform(g: torch.Generator, low: float, high: float) -> float:
    return math.exp(_uniform(g, math.log(low), math.log(high)))


def _choice(g: torch.Generator, options: tuple) -> Any:
    return options[int(torch.randint(len(options), (), generator=g))]


# ------------------------------------------------------------------------------------------ helpers
def _check_image(image: torch.Tensor, name: str = "image") -> tuple[torch.Tensor, bool]:
    """Validate and lift to ``(B,C,H,W)``; returns (batch, was_single)."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(image).__name__}")
    if not image.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor in [0,1], got {image.dtype}")
    if image.dim() not in (3, 4):
        raise ValueError(f"{name} must have shape (C,H,W) or (B,C,H,W), got {tuple(image.shape)}")
    if image.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(image.shape)}")
    single = image.dim() == 3
    return (image.unsqueeze(0) if single else image), single


def _restore_rank(batch: torch.Tensor, single: bool) -> torch.Tensor:
    return batch[0] if single else batch


def _randn(shape, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=like.device, dtype=like.dtype)


def _rand(shape, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(shape, generator=g, dtype=torch.float32).to(device=like.device, dtype=like.dtype)


def _filter(batch: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 2-D correlation with an odd ``(k,k)`` kernel, reflect padding (replicate if too small)."""
    k = kernel.shape[-1]
    pad = k // 2
    c = batch.shape[1]
    mode = "reflect" if pad < min(batch.shape[-2:]) else "replicate"
    padded = F.pad(batch, (pad, pad, pad, pad), mode=mode)
    weight = kernel.to(device=batch.device, dtype=batch.dtype).expand(c, 1, k, k)
    return F.conv2d(padded, weight, groups=c)


def line_kernel(length: float, angle: float, width: float = 1.0) -> torch.Tensor:
    """Anti-aliased line segment of ``length`` pixels at ``angle`` degrees from vertical, max 1.

    Entry (i,j) = clip(width/2 + 1/2 − dist((i,j), segment), 0, 1) on an odd square grid.
    """
    if not length > 0:
        raise ValueError(f"length must be > 0, got {length}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    half = int(math.ceil(length / 2 + width / 2 + 1))
    ys, xs = torch.meshgrid(
        torch.arange(-half, half + 1, dtype=torch.float64), torch.arange(-half, half + 1, dtype=torch.float64), indexing="ij"
    )
    theta = math.radians(angle)
    dy, dx = math.cos(theta), math.sin(theta)
    along = (ys * dy + xs * dx).clamp(-length / 2, length / 2)
    dist = torch.hypot(ys - along * dy, xs - along * dx)
    return (width / 2 + 0.5 - dist).clamp(0, 1).float()


def disk_kernel(radius: float) -> torch.Tensor:
    """Anti-aliased disk of ``radius`` pixels normalised to sum 1 (defocus point spread function)."""
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    half = int(math.ceil(radius + 1))
    ys, xs = torch.meshgrid(
        torch.arange(-half, half + 1, dtype=torch.float64), torch.arange(-half, half + 1, dtype=torch.float64), indexing="ij"
    )
    kernel = (radius + 0.5 - torch.hypot(ys, xs)).clamp(0, 1)
    return (kernel / kernel.sum()).float()


def _luminance(batch: torch.Tensor) -> torch.Tensor:
    if batch.shape[1] == 1:
        return batch
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    return (batch[:, :3] * weights).sum(1, keepdim=True)


# ------------------------------------------------------------------------------------- degradations
def gaussian_noise(image: torch.Tensor, sigma: float, generator: GeneratorLike = None, *, quantize: bool = True) -> torch.Tensor:
    """Additive Gaussian noise of std ``sigma`` in uint8 units (PromptIR's protocol).

    ``y = trunc(clip(255 x + σ n, 0, 255)) / 255``; with ``quantize=False`` the truncation is skipped.
    """
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0 (uint8 units), got {sigma}")
    batch, single = _check_image(image)
    g = make_generator(generator)
    clean = (batch * 255).round() if quantize else batch * 255
    noisy = (clean + sigma * _randn(batch.shape, g, batch)).clamp(0, 255)
    if quantize:
        noisy = noisy.floor()
    return _restore_rank(noisy / 255, single)


def rain_streaks(
    image: torch.Tensor,
    *,
    density: float = 0.004,
    length: float = 15.0,
    angle: float = 0.0,
    width: float = 1.0,
    intensity: float = 0.8,
    generator: GeneratorLike = None,
) -> torch.Tensor:
    """Add rain streaks: seeds with probability ``density`` per pixel smeared along a line.

    ``angle`` in degrees from vertical; ``intensity`` is the brightness of a full streak; the layer
    is clipped to [0,1] before it is added. Streaks may enter from outside the frame.
    """
    if not 0 < density < 1:
        raise ValueError(f"density must be in (0, 1), got {density}")
    if not 0 <= intensity <= 1:
        raise ValueError(f"intensity must be in [0, 1], got {intensity}")
    batch, single = _check_image(image)
    g = make_generator(generator)
    kernel = line_kernel(length, angle, width)
    pad = kernel.shape[-1] // 2
    b, _, h, w = batch.shape
    canvas = (b, 1, h + 2 * pad, w + 2 * pad)
    seeds = (_rand(canvas, g, batch) < density).to(batch.dtype) * (0.5 + 0.5 * _rand(canvas, g, batch))
    streaks = F.conv2d(seeds, kernel.to(device=batch.device, dtype=batch.dtype)[None, None]).clamp(0, 1)
    return _restore_rank((batch + intensity * streaks).clamp(0, 1), single)


def depth_proxy(
    image: torch.Tensor, near: float = 1.0, far: float = 6.0, *, top: float = 1.0, scene_height: float | None = None
) -> torch.Tensor:
    """A scene-depth stand-in ``(B,1,H,W)`` (or ``(1,H,W)``) in ``[near, far]``.

    ``proxy = 0.7 · ramp + 0.3 · smoothed luminance`` (higher in the frame is farther; bright regions
    such as sky are far), ``d = near + (far − near) · proxy``, with the vertical ramp
    ``ramp(y) = clip(top − y / scene_height, 0, 1)``. By default the ramp spans the frame (top = 1 at
    the first row, 0 at the last); a crop of a larger scene passes ``scene_height`` (pixels) and
    ``top`` (the ramp value at its first row), so its haze varies as slowly as in the whole scene.
    """
    if not 0 <= near <= far:
        raise ValueError(f"need 0 <= near <= far, got near={near}, far={far}")
    batch, single = _check_image(image)
    b, _, h, w = batch.shape
    height = float(scene_height) if scene_height is not None else float(max(h - 1, 1))
    if not height > 0:
        raise ValueError(f"scene_height must be > 0, got {scene_height}")
    rows = torch.arange(h, device=batch.device, dtype=batch.dtype)
    ramp = (top - rows / height).clamp(0, 1).view(1, 1, h, 1).expand(b, 1, h, w)
    lum = _luminance(batch)
    k = max(3, (min(h, w) // 8) | 1)
    smooth = F.avg_pool2d(F.pad(lum, (k // 2,) * 4, mode="replicate"), k, stride=1)
    proxy = 0.7 * ramp + 0.3 * smooth.clamp(0, 1)
    return _restore_rank(near + (far - near) * proxy, single)


def haze(
    image: torch.Tensor,
    *,
    beta: float = 0.1,
    airlight: float = 0.9,
    depth: torch.Tensor | None = None,
    top: float = 1.0,
    scene_height: float | None = None,
) -> torch.Tensor:
    """Atmospheric scattering ``y = x t + A (1 − t)``, ``t = exp(−β d)``.

    ``depth`` d defaults to :func:`depth_proxy` (``top`` and ``scene_height`` are passed to it).
    """
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if not 0 <= airlight <= 1:
        raise ValueError(f"airlight must be in [0, 1], got {airlight}")
    batch, single = _check_image(image)
    if depth is None:
        d = depth_proxy(batch, top=top, scene_height=scene_height)
    else:
        if not isinstance(depth, torch.Tensor):
            raise TypeError(f"depth must be a tensor or None, got {type(depth).__name__}")
        d = depth.to(device=batch.device, dtype=batch.dtype)
        if d.shape[-2:] != batch.shape[-2:]:
            raise ValueError(f"depth must have the image's spatial size {tuple(batch.shape[-2:])}, got {tuple(d.shape)}")
    t = torch.exp(-beta * d)
    return _restore_rank(batch * t + airlight * (1 - t), single)


def motion_blur(image: torch.Tensor, *, length: float = 9.0, angle: float = 0.0) -> torch.Tensor:
    """Linear motion blur: a ``length``-pixel line kernel at ``angle`` degrees, normalised to sum 1."""
    batch, single = _check_image(image)
    kernel = line_kernel(length, angle)
    return _restore_rank(_filter(batch, kernel / kernel.sum()), single)


def defocus_blur(image: torch.Tensor, *, radius: float = 2.0) -> torch.Tensor:
    """Defocus (out-of-focus) blur: a uniform disk of ``radius`` pixels."""
    batch, single = _check_image(image)
    return _restore_rank(_filter(batch, disk_kernel(radius)), single)


def low_light(
    image: torch.Tensor,
    *,
    gamma: float = 2.0,
    gain: float = 0.3,
    photons: float = 300.0,
    read_noise: float = 0.005,
    generator: GeneratorLike = None,
) -> torch.Tensor:
    """Under-exposure: ``y = Poisson(k g x^γ) / k + σ_r n``, clipped to [0,1].

    ``photons`` (k) is the photon count of a full-scale pixel: smaller means more shot noise;
    ``photons=0`` disables shot noise.
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if not 0 < gain <= 1:
        raise ValueError(f"gain must be in (0, 1], got {gain}")
    if not photons >= 0:
        raise ValueError(f"photons must be >= 0, got {photons}")
    if not read_noise >= 0:
        raise ValueError(f"read_noise must be >= 0, got {read_noise}")
    batch, single = _check_image(image)
    g = make_generator(generator)
    dark = gain * batch.clamp(0, 1).pow(gamma)
    if photons > 0:
        rate = (dark * photons).float().cpu()
        dark = (torch.poisson(rate, generator=g) / photons).to(device=batch.device, dtype=batch.dtype)
    dark = dark + read_noise * _randn(batch.shape, g, batch)
    return _restore_rank(dark.clamp(0, 1), single)


# ---------------------------------------------------------------------------------------- sampling
def parse_task(task: str) -> tuple[str, ...]:
    """Split ``"a+b[+c]"`` into its parts in application order; validates names and repeats."""
    if not isinstance(task, str) or not task:
        raise ValueError(f"task must be a non-empty string, got {task!r}")
    parts = tuple(p.strip() for p in task.split("+"))
    unknown = [p for p in parts if p not in _FAMILY]
    if unknown:
        raise ValueError(
            f"unknown degradation {unknown[0]!r} in task {task!r}; expected names from {', '.join(SINGLE_DEGRADATIONS)} "
            "joined by '+'"
        )
    families = [_FAMILY[p] for p in parts]
    if len(set(families)) != len(families):
        raise ValueError(f"task {task!r} repeats a degradation family")
    if len(parts) > 3:
        raise ValueError(f"composites have at most three parts, got {task!r}")
    return tuple(sorted(parts, key=lambda p: _ORDER.index(_FAMILY[p])))


def sample_parameters(name: str, generator: GeneratorLike = None) -> dict[str, Any]:
    """Random parameters for one single degradation ``name`` (see the module docstring for ranges)."""
    g = make_generator(generator)
    if name not in _FAMILY:
        raise ValueError(f"unknown degradation {name!r}; expected one of {', '.join(SINGLE_DEGRADATIONS)}")
    if name.startswith("noise"):
        sigma = int(name[5:]) if name != "noise" else _choice(g, NOISE_SIGMAS)
        return {"sigma": float(sigma)}
    if name == "rain":
        return {
            "density": _uniform(g, 0.002, 0.006), "length": _uniform(g, 8.0, 22.0), "angle": _uniform(g, -25.0, 25.0),
            "width": _uniform(g, 0.8, 1.4), "intensity": _uniform(g, 0.5, 0.9),
        }
    if name == "haze":
        # the image is treated as a crop of a 512-pixel-high scene starting at a random height
        return {"beta": _uniform(g, 0.04, 0.2), "airlight": _uniform(g, 0.8, 1.0), "top": _uniform(g, 0.3, 1.0),
                "scene_height": 512.0}
    if name == "blur":
        name = _choice(g, ("motion_blur", "defocus_blur"))
    if name == "motion_blur":
        return {"kind": "motion", "length": _uniform(g, 5.0, 15.0), "angle": _uniform(g, 0.0, 180.0)}
    if name == "defocus_blur":
        return {"kind": "defocus", "radius": _uniform(g, 1.5, 3.5)}
    # lowlight
    return {
        "gamma": _uniform(g, 1.4, 2.4), "gain": _uniform(g, 0.15, 0.45),
        "photons": _log_uniform(g, 100.0, 1000.0), "read_noise": _uniform(g, 0.002, 0.01),
    }


def apply_degradation(image: torch.Tensor, name: str, params: dict[str, Any], generator: GeneratorLike = None) -> torch.Tensor:
    """Apply the single degradation ``name`` with explicit ``params`` (as from :func:`sample_parameters`)."""
    family = _FAMILY.get(name)
    if family is None:
        raise ValueError(f"unknown degradation {name!r}; expected one of {', '.join(SINGLE_DEGRADATIONS)}")
    if family == "noise":
        return gaussian_noise(image, params["sigma"], generator)
    if family == "rain":
        return rain_streaks(image, generator=generator, **params)
    if family == "haze":
        return haze(image, **params)
    if family == "blur":
        kw = {k: v for k, v in params.items() if k != "kind"}
        return motion_blur(image, **kw) if params["kind"] == "motion" else defocus_blur(image, **kw)
    return low_light(image, generator=generator, **params)


def degrade(
    image: torch.Tensor,
    task: str,
    generator: GeneratorLike = None,
    *,
    quantize: bool = True,
    return_params: bool = False,
):
    """Degrade ``image`` by ``task`` (a single name or a composite ``"a+b[+c]"``) with random parameters.

    One parameter set is drawn per call (shared by a batch). With ``quantize`` the result is rounded
    to the uint8 grid, like a saved image. Returns the degraded image, and with ``return_params``
    also ``[(name, params), ...]`` in application order.
    """
    parts = parse_task(task)
    _check_image(image)
    g = make_generator(generator)
    out = image
    applied = []
    for name in parts:
        params = sample_parameters(name, g)
        out = apply_degradation(out, name, params, g)
        applied.append((name, params))
    if quantize:
        out = (out.clamp(0, 1) * 255).round() / 255
    return (out, applied) if return_params else out


__all__ = [
    "COMPOSITE_TASKS", "NOISE_SIGMAS", "SINGLE_DEGRADATIONS", "TASKS", "apply_degradation", "defocus_blur", "degrade",
    "depth_proxy", "derive_seed", "disk_kernel", "gaussian_noise", "haze", "line_kernel", "low_light", "make_generator",
    "motion_blur", "parse_task", "rain_streaks", "sample_parameters",
]
