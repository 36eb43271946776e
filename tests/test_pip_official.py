"""The official PIP network (pip_universal's PIPNet_Restormer_onskip_inter): size, keys, parity, training defaults.

The oracle is tests/_official_pip.py, a plain re-implementation of the official forward with the official
attribute names (so its state_dict is an official checkpoint's key set).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _perturb import perturb_  # noqa: E402
from _official_pip import SMALL_ARGS, TINY_ARGS, OfficialPIP  # noqa: E402

from cplfast.models import PromptIR  # noqa: E402
from cplfast.models.checkpoint import detect_official_format  # noqa: E402
from cplfast.models.pip_official import cplfast_to_official_pip, official_pip_to_cplfast  # noqa: E402

OFFICIAL_PIP_PARAMS = 27_429_510
OFFICIAL_PIP_KEYS = 612
CPLFAST_PIP_KEYS = 603  # attn1..attn4 of the three interactions become one (4,) mix each
UNUSED_PARAMS = (48 + 64) * 48 + (96 + 128) * 96 + (192 + 256) * 192  # reduce_noise_channel_1..3, never called
ROUTER_PARAMS = (48 + 96 + 192) * 5 + 3 * 5  # cplfast's blind routers: Linear(width, T) per level


@pytest.fixture(autouse=True)
def _one_thread(restore_torch_globals):
    # float64 convolutions on a shared 2-core machine: extra threads only contend
    torch.set_num_threads(1)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())




def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def _official_and_cplfast(args: dict, preset: str, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    official = perturb_(OfficialPIP(**args)).to(dtype).eval()
    renamed, _ = official_pip_to_cplfast(official.state_dict())
    model = PromptIR("pip", preset, official_unused_layers=True, pip_router=False).to(dtype).eval()
    model.load_state_dict(renamed, strict=True)
    return official, model, renamed


@pytest.fixture(scope="module")
def official_pip():
    torch.manual_seed(2024)
    return perturb_(OfficialPIP()).eval()


# ----------------------------------------------------------------------------- the official configuration


def test_pip_official_configuration_parameter_count_and_structure(official_pip):
    assert _count(official_pip) == OFFICIAL_PIP_PARAMS and len(official_pip.state_dict()) == OFFICIAL_PIP_KEYS
    exact = PromptIR("pip", official_unused_layers=True, pip_router=False)
    assert _count(exact) == OFFICIAL_PIP_PARAMS and len(exact.state_dict()) == CPLFAST_PIP_KEYS
    default = PromptIR("pip")  # cplfast's default: blind routers, no never-called convolutions
    assert _count(default) == OFFICIAL_PIP_PARAMS - UNUSED_PARAMS + ROUTER_PARAMS
    assert default.config.prompt_dims == (64, 128, 256)
    assert default.loss_weights["orthogonality"] == pytest.approx(2e-5)  # official 0.002 x 0.01
    assert tuple(default.chnl_reduce3.weight.shape) == (192, 384, 1, 1)
    assert not any(hasattr(default, f"{n}{i}") for n in ("noise_level", "reduce_noise_level") for i in (1, 2, 3))
    for level, (width, prompt_dim) in enumerate(zip((48, 96, 192), (64, 128, 256)), start=1):
        prompt, interaction = getattr(default, f"prompt{level}"), getattr(default, f"interaction{level}")
        assert prompt.LGM.attn.num_heads == 2 and interaction.attn.num_heads == 4  # heads[2]
        assert interaction.attn.mix.tolist() == pytest.approx([0.2] * 4)
        assert tuple(interaction.reduce_channel.weight.shape) == (width, prompt_dim, 1, 1)
        assert tuple(prompt.detask_prompt_param.shape) == (1, 5, prompt_dim, 1, 1)
    # the PromptIR model is untouched by the PIP defaults
    assert PromptIR("promptir").config.prompt_dims == (64, 128, 320)


def test_pip_official_key_mapping_covers_every_key(official_pip):
    state = official_pip.state_dict()
    renamed, report = official_pip_to_cplfast(state)
    assert report == {"official": 612, "renamed": 48, "merged": 12, "kept": 552, "cplfast": 603}
    own = PromptIR("pip", official_unused_layers=True, pip_router=False).state_dict()
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in own.items()}
    mix = renamed["interaction2.attn.mix"]
    prefix = "low_prompt_interaction_level2.prompt_transformer_cross.attn."
    assert mix.tolist() == [float(state[f"{prefix}attn{j}"]) for j in range(1, 5)]
    back = cplfast_to_official_pip(renamed)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert detect_official_format(state) == "pip"
    broken = dict(state)
    del broken[prefix + "attn3"]
    with pytest.raises(ValueError, match=r"interaction2\.attn\.mix.*attn1\.\.attn4"):
        official_pip_to_cplfast(broken)


def test_pip_official_checkpoint_file_reproduces_official_forward(official_pip, tmp_path):
    state = official_pip.state_dict()
    path = tmp_path / "pip.pth"
    torch.save({"params": state}, path)
    model = PromptIR.from_official(path).eval()
    assert model.prompt_type == "pip" and model.official_source == {"format": "pip", "keys": 612, "entry": "params"}
    assert model.prompt1.router is None  # the official network has no router: labels are needed
    torch.manual_seed(0)
    x, labels = torch.rand(2, 3, 16, 24), torch.tensor([4, 1])
    with torch.no_grad():
        want = official_pip(x, labels)
        got = model(x, labels=labels)
        onehot = F.one_hot(labels, 5).float()
        forced = model(x, routing={k: onehot for k in model.routing_keys})
    assert _relative(got, want) <= 1e-5 and _relative(forced, want) <= 1e-5
    with pytest.raises(ValueError, match="labels are required"):
        model(x)
    # the same weights in cplfast's default model (with routers): forcing the routing reproduces it too
    default = PromptIR("pip").eval()
    renamed, _ = official_pip_to_cplfast(state)
    result = default.load_state_dict({k: v for k, v in renamed.items() if not k.startswith("reduce_noise_channel")},
                                     strict=False)
    assert sorted(result.missing_keys) == sorted(f"prompt{i}.router.{p}" for i in (1, 2, 3) for p in ("weight", "bias"))
    assert not result.unexpected_keys
    with torch.no_grad():
        assert _relative(default(x, routing={k: onehot for k in default.routing_keys}), want) <= 1e-5


# ----------------------------------------------------------------------------- parity at the small presets


@pytest.mark.parametrize("preset,args", [("tiny", TINY_ARGS), ("small", SMALL_ARGS)])
def test_pip_reproduces_official_forward_float64_and_float32(preset, args):
    official, model, _ = _official_and_cplfast(args, preset, torch.float64, seed=7)
    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 24, dtype=torch.float64)
    composite = torch.tensor([[0.5, 0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    with torch.no_grad():
        for labels in (torch.tensor([0, 3]), composite):
            assert _relative(model(x, labels=labels), official(x, labels)) <= 1e-10
    official32, model32 = official.float(), model.float()
    with torch.no_grad():
        want, got = official32(x.float(), torch.tensor([2, 4])), model32(x.float(), labels=torch.tensor([2, 4]))
    assert _relative(got, want) <= 1e-5


def test_pip_tiny_gradients_match_official_float64():
    official, model, _ = _official_and_cplfast(TINY_ARGS, "tiny", torch.float64, seed=3)
    model.train(), official.train()
    torch.manual_seed(2)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    labels = torch.tensor([1, 2])
    weight = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    (official(xs[0], labels) * weight).sum().backward()
    (model(xs[1], labels=labels) * weight).sum().backward()
    assert _relative(xs[1].grad, xs[0].grad) <= 1e-10
    grads = dict(official.named_parameters())
    for name, p in cplfast_to_official_pip({k: v for k, v in model.named_parameters()}).items():
        if name.startswith("reduce_noise_channel"):
            continue  # never called, frozen in cplfast
        want = grads[name].grad
        if name.endswith(tuple(f".attn.attn{j}" for j in range(1, 5))):  # one entry of cplfast's mix
            j, level = int(name[-1]) - 1, name.split(".")[0][-1]
            got = model.get_parameter(f"interaction{level}.attn.mix").grad[j:j + 1]
        else:
            got = p.grad
        assert got is not None and _relative(got, want) <= 1e-9, name


# ----------------------------------------------------------------------------- training defaults


def test_pip_training_defaults_are_the_official_ones(tmp_path):
    from cplfast.cli import build_parser
    from cplfast.train import TrainConfig, Trainer

    assert TrainConfig(prompt="pip").pixel_loss_name == "smoothl1"
    assert TrainConfig(prompt="cpl").pixel_loss_name == "l1"
    assert TrainConfig(prompt="pip", pixel_loss="l1").pixel_loss_name == "l1"
    with pytest.raises(ValueError, match="pixel_loss must be one of"):
        TrainConfig(pixel_loss="huber").validate()
    args = build_parser(["train", "--pixel-loss", "smoothl1"]).parse_args(["train", "--pixel-loss", "smoothl1"])
    assert args.pixel_loss == "smoothl1"

    config = TrainConfig(preset="tiny", patch=16, batch=2, save_every=0, tasks=("noise", "haze"), steps=1,
                         prompt="pip", ema=0)
    trainer = Trainer(config, tmp_path, progress=False)
    batch = next(iter(torch.utils.data.DataLoader(trainer.dataset, batch_size=2)))
    loss, parts = trainer._loss(batch)
    assert "smoothl1" in parts and "l1" not in parts
    model = trainer.model
    out = model(batch["input"], labels=batch["task"])
    want = F.smooth_l1_loss(out, batch["target"], beta=1.0).detach()
    assert float(parts["smoothl1"]) == pytest.approx(float(want), rel=1e-5)
    ortho = 2e-5 * float(model.prompt1.orthogonality_loss().detach())
    assert float(parts["prompt1.orthogonality"]) == pytest.approx(ortho, rel=1e-5)
    assert math.isclose(float(loss.detach()), sum(float(v) for v in parts.values()), rel_tol=1e-5)
