"""Frozen multi-level feature extractors for the contrastive prompt loss (CPR, SPEC §4.8).

An extractor maps images ``(N, C, H, W)`` to a list of feature maps ``(N, F_l, H_l, W_l)``, one per level.

* :class:`FilterBankPyramid` (cplfast's default) needs no weights at all: fixed derivative filters on an
  image pyramid. It is deterministic, cheap (a depthwise 3x3 convolution per level), works for any
  number of channels and any image size, and runs the same on every machine, which a loss used for
  training and in tests should. Its features describe local structure (edges, their orientation,
  curvature, corners) at several scales — what differs between a clean image, a noisy/rainy/blurred
  one, and a restoration made with the wrong prompt.
  This is **cplfast's choice** (the default of :class:`cplfast.ContrastivePromptLoss`), not the paper's.
* :class:`VGG16Features`: VGG16's relu1_2, relu2_2, relu3_3 (by default), the feature space of the CPL
  paper and of its authors' CPR template, when VGG16's ImageNet weights are on disk (torchvision's cache
  or a file). Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _validation as check

# 3x3 filters, each responding to one kind of local structure; all sum to zero (flat regions give 0).
_SOBEL_X = [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]
_FILTER_BANK = (
    [[v / 8 for v in row] for row in _SOBEL_X],                                 # d/dx
    [[v / 8 for v in col] for col in zip(*_SOBEL_X)],                           # d/dy
    [[1 / 8, 1 / 8, 1 / 8], [1 / 8, -1.0, 1 / 8], [1 / 8, 1 / 8, 1 / 8]],       # Laplacian (blobs, fine texture)
    [[0.25, 0.0, -0.25], [0.0, 0.0, 0.0], [-0.25, 0.0, 0.25]],                  # d2/dxdy (corners, saddles)
)


class FilterBankPyramid(nn.Module):
    """Fixed filter-bank features on an image pyramid; no learned or downloaded weights.

    Level l works on the image average-pooled by ``2**l``. At each level every input channel is
    filtered (replicate padding) by four zero-sum 3x3 filters — Sobel d/dx and d/dy, a Laplacian and
    a mixed second derivative — giving ``4*C`` responses, and one constant channel of value ``floor``
    is appended: ``(N, 4*C + 1, H / 2**l, W / 2**l)``.

    Why the constant channel: InfoNCE compares L2-normalised feature vectors. In flat regions the
    responses are ~0 and their direction is pure noise; the constant makes flat regions point one
    common way (so "flat" is a feature too — a denoised output is pulled toward it) and bounds the
    gradient of the normalisation by ``1 / floor``.
    """

    def __init__(self, levels: int = 3, floor: float = 0.01):
        super().__init__()
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be a positive int, got {levels!r}")
        self.levels = levels
        self.floor = check.positive_scalar("floor", floor)
        self.register_buffer("bank", torch.tensor(_FILTER_BANK).unsqueeze(1), persistent=False)

    @property
    def num_filters(self) -> int:
        return self.bank.shape[0]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        check.tensor("images", images, 4)
        n, c, h, w = images.shape
        smallest = 2 ** (self.levels - 1)
        if h < smallest or w < smallest:
            raise ValueError(f"images must be at least {smallest}x{smallest} for levels={self.levels}, "
                             f"got {h}x{w}")
        weight = self.bank.to(images.dtype).repeat(c, 1, 1, 1)
        features, x = [], images
        for level in range(self.levels):
            if level:
                x = F.avg_pool2d(x, 2)
            responses = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), weight, groups=c)
            constant = responses.new_full((n, 1, *responses.shape[-2:]), self.floor)
            features.append(torch.cat([responses, constant], dim=1))
        return features

    def extra_repr(self) -> str:
        return f"levels={self.levels}, floor={self.floor}"


VGG16_LAYERS = {"relu1_2": 4, "relu2_2": 9, "relu3_3": 16, "relu4_3": 23}
VGG16_FILE = "vgg16-397923af.pth"  # the name torchvision's IMAGENET1K_V1 weights are cached under
# torchvision's vgg16().features up to relu4_3: output channels of each 3x3 conv, "M" for a 2x2 max-pool
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)


def default_vgg16_weights() -> Path:
    """Where torchvision caches VGG16's ImageNet weights: ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def _vgg16_features(end: int) -> nn.Sequential:
    """``torchvision.models.vgg16().features[:end]`` rebuilt layer for layer (same indices, same keys)."""
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            channels = item
    return nn.Sequential(*layers[:end])


def _read_vgg16_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a VGG16 state_dict")
    return state


class VGG16Features(nn.Module):
    """Frozen VGG16 activations, the CPL paper's feature space for CPR (RGB input in [0, 1]).

    The input is ImageNet-normalised (mean 0.485/0.456/0.406, std 0.229/0.224/0.225), then run through
    VGG16's convolutional layers up to the deepest requested one (default relu1_2, relu2_2, relu3_3: 64,
    128, 256 channels at full, 1/2 and 1/4 resolution). The layers are built here with torchvision's
    indices and names (``features.{i}.weight``), so torchvision itself is not needed — only its weights:

    * ``weights=None``: torchvision's cached ImageNet file :func:`default_vgg16_weights`
      (``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``, present once torchvision has downloaded it);
    * ``weights=PATH``: a torchvision VGG16 state_dict as ``.safetensors`` or a ``torch.save`` file
      (read with ``weights_only=True``); keys ``features.{i}.*`` (a prefix ``vgg.``/``module.`` is
      stripped; classifier keys are ignored).

    Nothing is ever downloaded: a missing file raises ``FileNotFoundError`` with one line saying what
    is missing.
    """

    def __init__(self, weights: str | os.PathLike | None = None,
                 layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3")):
        super().__init__()
        if not layers or any(name not in VGG16_LAYERS for name in layers):
            raise ValueError(f"layers must be a non-empty subset of {tuple(VGG16_LAYERS)}, got {layers!r}")
        path = Path(weights) if weights is not None else default_vgg16_weights()
        if not path.is_file():
            where = "the given vgg_weights path" if weights is not None else "torchvision's weight cache"
            raise FileNotFoundError(
                f"VGG16 weights not found: no file at {path} ({where}); pass a torchvision vgg16 state_dict "
                "(.pth or .safetensors) as vgg_weights / --cpr-vgg-weights, or use the filter-bank features"
            )
        ends = sorted(VGG16_LAYERS[name] for name in layers)
        body = _vgg16_features(ends[-1])
        state = _read_vgg16_state(path)
        for prefix in ("module.", "vgg."):
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
        wanted = {f"features.{k}": None for k in body.state_dict()}
        missing = [k for k in wanted if k not in state]
        if missing:
            raise ValueError(f"{path} is not a torchvision VGG16 state_dict: it lacks {missing[:3]}")
        body.load_state_dict({k[len("features."):]: state[k] for k in wanted}, strict=True)
        starts = [0, *ends[:-1]]
        self.stages = nn.ModuleList(body[a:b] for a, b in zip(starts, ends))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGG16Features":
        return super().train(False)  # frozen: always in eval mode

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        check.tensor("images", images, 4)
        if images.shape[1] != 3:
            raise ValueError(f"images must be RGB (N, 3, H, W) for VGG16, got {tuple(images.shape)}")
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


__all__ = ["FilterBankPyramid", "VGG16Features", "default_vgg16_weights"]
