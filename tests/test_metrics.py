"""cplfast.metrics against scikit-image on random pairs (SPEC §6: within 1e-4)."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cplfast.metrics import psnr, rgb_to_y, ssim


def _pair(b, h, w, noise):
    target = torch.rand(b, 3, h, w, dtype=torch.float64)
    pred = (target + noise * torch.randn_like(target)).clamp(0, 1)
    return pred, target


def _y_numpy(img_hwc):
    # BT.601 luma as BasicSR's rgb2ycbcr(y_only=True) for RGB in [0, 1]
    return (img_hwc @ np.array([65.481, 128.553, 24.966]) + 16.0) / 255.0


def _skimage(pred, target, channel, crop, data_range=1.0):
    p = pred.permute(1, 2, 0).numpy()
    t = target.permute(1, 2, 0).numpy()
    if crop:
        p, t = p[crop:-crop, crop:-crop], t[crop:-crop, crop:-crop]
    if channel == "y":
        p, t = _y_numpy(p), _y_numpy(t)
        s = structural_similarity(t, p, data_range=data_range, win_size=7, gaussian_weights=False)
    else:
        s = structural_similarity(t, p, data_range=data_range, win_size=7, gaussian_weights=False, channel_axis=2)
    return peak_signal_noise_ratio(t, p, data_range=data_range), s


@pytest.mark.parametrize("channel", ["rgb", "y"])
@pytest.mark.parametrize("crop", [0, 3])
def test_equal_to_skimage_on_random_pairs(channel, crop):
    h, w = (int(v) for v in torch.randint(17, 60, (2,)))
    noise = float(torch.empty(()).uniform_(0.01, 0.3))
    pred, target = _pair(3, h, w, noise)
    ours_p = psnr(pred, target, channel=channel, crop_border=crop)
    ours_s = ssim(pred, target, channel=channel, crop_border=crop)
    assert ours_p.shape == (3,) and ours_s.shape == (3,)
    for i in range(3):
        ref_p, ref_s = _skimage(pred[i], target[i], channel, crop)
        assert abs(float(ours_p[i]) - ref_p) < 1e-4
        assert abs(float(ours_s[i]) - ref_s) < 1e-4


def test_single_image_float32_and_data_range():
    pred, target = _pair(1, 23, 31, 0.1)
    p32, t32 = pred[0].float(), target[0].float()
    ref_p, ref_s = _skimage(p32.double(), t32.double(), "rgb", 0)
    assert psnr(p32, t32).dim() == 0
    assert abs(float(psnr(p32, t32)) - ref_p) < 1e-4
    assert abs(float(ssim(p32, t32)) - ref_s) < 1e-4
    # 8-bit scale with data_range=255 gives the same numbers
    assert abs(float(psnr(pred * 255, target * 255, data_range=255.0)[0]) - float(psnr(pred, target)[0])) < 1e-9
    assert abs(float(ssim(pred * 255, target * 255, data_range=255.0)[0]) - float(ssim(pred, target)[0])) < 1e-9


def test_properties():
    pred, target = _pair(2, 20, 20, 0.05)
    assert torch.isinf(psnr(target, target)).all()
    assert torch.allclose(ssim(target, target), torch.ones(2, dtype=torch.float64))
    noisier = (target + 0.2 * torch.randn_like(target)).clamp(0, 1)
    assert (psnr(noisier, target) < psnr(pred, target)).all()
    assert (ssim(noisier, target) < ssim(pred, target)).all()
    y = rgb_to_y(torch.ones(3, 4, 4))
    assert torch.allclose(y, torch.full((1, 4, 4), 235 / 255))


def test_bad_input():
    a = torch.rand(3, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, torch.rand(3, 16, 15))
    with pytest.raises(ValueError, match="channel"):
        ssim(a, a, channel="lab")
    with pytest.raises(ValueError, match="shape"):
        psnr(torch.rand(16, 16), torch.rand(16, 16))
    with pytest.raises(ValueError, match="crop_border"):
        psnr(a, a, crop_border=8)
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim(torch.rand(3, 6, 9), torch.rand(3, 6, 9))
    with pytest.raises(TypeError):
        psnr(a.numpy(), a)
