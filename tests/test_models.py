"""cplfast.models: official PromptIR parity, every variant x preset, CPL negatives, restore/tiling, summary."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _perturb import perturb_  # noqa: E402
from _official_promptir import TINY_ARGS, OfficialPromptIR  # noqa: E402

from cplfast.models import PROMPT_VARIANTS, PromptIR, summary  # noqa: E402

OFFICIAL_KEYS = 548
OFFICIAL_PARAMS = 35_592_263




def _lightning_checkpoint(state: dict) -> dict:
    return {"epoch": 7, "global_step": 123, "state_dict": {f"net.{k}": v for k, v in state.items()},
            "loops": {"fit_loop": {"epoch_progress": {"total": {"completed": 7}}}}}


def _labels(batch: int, model: PromptIR) -> torch.Tensor:
    return torch.randint(0, model.config.num_degradations, (batch,))


@pytest.fixture(scope="module")
def official_base():
    torch.manual_seed(1234)
    return perturb_(OfficialPromptIR()).eval()


# ----------------------------------------------------------------------------- official PromptIR


def test_base_matches_official_key_set_and_parameter_count(official_base):
    model = PromptIR(prompt="promptir", preset="base")
    own, official = model.state_dict(), official_base.state_dict()
    assert len(own) == OFFICIAL_KEYS
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in official.items()}
    cpl = PromptIR(prompt="cpl", preset="base")
    assert set(cpl.state_dict()) == set(own)
    cpl.load_state_dict(official, strict=True)


def test_base_lightning_checkpoint_reproduces_official_forward(official_base, tmp_path):
    path = tmp_path / "promptir.ckpt"
    torch.save(_lightning_checkpoint(official_base.state_dict()), path)
    model = PromptIR.from_official(path).eval()
    x = torch.rand(2, 3, 16, 24)  # non-square; every prompt is resized down (64->8x12, 32->4x6, 16->2x3)
    with torch.no_grad():
        expected, got = official_base(x), model(x)
    assert (got - expected).abs().max().item() <= 1e-5
    # Round trip: our state_dict loads strictly back into the official-format network.
    OfficialPromptIR().load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("size", [(40, 24), (8, 16)])
def test_tiny_promptir_reproduces_official_forward_and_gradients(size):
    reference = perturb_(OfficialPromptIR(**TINY_ARGS)).double()
    model = PromptIR("promptir", "tiny").double()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.rand(1, 3, *size, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, expected = model(x), reference(x_ref)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    (expected * weight).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-8, atol=1e-9)
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-7, atol=1e-9, msg=name)


def test_checkpoint_formats_load(tmp_path):
    from safetensors.torch import save_file

    reference = perturb_(OfficialPromptIR(**TINY_ARGS))
    state = reference.state_dict()
    x = torch.rand(1, 3, 16, 32)
    expected = reference(x)
    from cplfast.models import official_state_dict

    files = {
        "a.safetensors": None,
        "b.pth": {f"module.{k}": v for k, v in state.items()},
        "c.ckpt": _lightning_checkpoint(state),
    }
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "a.safetensors")
    for name, obj in files.items():
        if obj is not None:
            torch.save(obj, tmp_path / name)
    for name in files:
        loaded = official_state_dict(tmp_path / name)
        model = PromptIR("promptir", "tiny")
        model.load_state_dict(loaded, strict=True)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_bad_checkpoints_raise_clear_errors(tmp_path, official_base):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(bytes(range(256)) * 7)
    with pytest.raises(RuntimeError, match="corrupt.ckpt"):
        PromptIR.from_official(corrupt)
    bad_tensors = tmp_path / "corrupt.safetensors"
    bad_tensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(RuntimeError, match="safetensors"):
        PromptIR.from_official(bad_tensors)
    code = tmp_path / "code.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": _Unpicklable()}, code)
    with pytest.raises(RuntimeError, match="weights_only=True"):
        PromptIR.from_official(code)
    (tmp_path / "weights.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="must end in"):
        PromptIR.from_official(tmp_path / "weights.txt")
    with pytest.raises(FileNotFoundError):
        PromptIR.from_official(tmp_path / "missing.ckpt")
    with pytest.raises(TypeError, match="source"):
        PromptIR.from_official(42)
    state = dict(official_base.state_dict())
    del state["prompt2.conv3x3.weight"]
    with pytest.raises(ValueError, match="missing key"):
        PromptIR.from_official(state)
    state = dict(official_base.state_dict())
    state["output.weight"] = torch.zeros(3, 96, 1, 1)
    with pytest.raises(ValueError, match="output.weight"):
        PromptIR.from_official(state)
    with pytest.raises(ValueError, match="prompt"):
        PromptIR.from_official(official_base.state_dict(), prompt="pip")


class _Unpicklable:
    """A plain Python object: torch.load(weights_only=True) must refuse it."""


# ----------------------------------------------------------------------------- variants x presets


@pytest.mark.parametrize("prompt", PROMPT_VARIANTS)
def test_tiny_training_step_reaches_every_parameter(prompt):
    model = PromptIR(prompt, "tiny").train()
    x = torch.rand(2, 3, 24, 40)
    kwargs = {"num_negatives": 2} if prompt == "cpl" else {}
    out, aux = model(x, labels=_labels(2, model), return_aux=True, **kwargs)
    assert out.shape == x.shape
    assert set(aux["routing"]) == set(model.routing_keys)
    loss = F.l1_loss(out, x) + sum(aux["losses"].values(), torch.zeros(()))
    if prompt == "cpl":
        assert aux["negatives"].shape == (2, *x.shape)
        loss = loss + aux["negatives"].mean()
    if prompt == "dppd":
        assert aux["losses"] == {}, "dppd's auxiliary losses are off by default (the paper's figure has none)"
    if prompt == "pip":
        assert aux["losses"], "pip returns its auxiliary losses in training"
        assert all(v.dim() == 0 and torch.isfinite(v) for v in aux["losses"].values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("prompt", PROMPT_VARIANTS)
def test_small_forward_backward_shapes(prompt):
    model = PromptIR(prompt, "small").train()
    x = torch.rand(1, 3, 16, 24, requires_grad=True)
    out = model(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_base_constructs_for_every_variant():
    counts = {prompt: sum(p.numel() for p in PromptIR(prompt, "base").parameters()) for prompt in PROMPT_VARIANTS}
    assert counts["promptir"] == counts["cpl"] == OFFICIAL_PARAMS
    assert counts["none"] < min(counts["pip"], counts["dppd"], counts["promptir"])


@pytest.mark.parametrize("prompt", ["promptir", "cpl", "pip", "dppd"])
def test_forced_routing_equal_to_the_routers_reproduces_the_forward(prompt):
    model = PromptIR(prompt, "tiny").eval()
    x = torch.rand(3, 3, 32, 24)
    with torch.no_grad():
        out, aux = model(x, return_aux=True)
        forced = model(x, routing=aux["routing"])
        other = {k: torch.softmax(torch.randn_like(v) * 3, dim=1) for k, v in aux["routing"].items()}
        changed = model(x, routing=other)
    torch.testing.assert_close(forced, out, rtol=1e-5, atol=1e-5)
    assert (changed - out).abs().max() > 1e-6, "forcing another routing must change the output"
    if prompt != "dppd":  # spatial prompt maps can be forced too
        maps = aux["prompt_maps"]
        assert set(maps) == {"prompt1", "prompt2", "prompt3"}
        with torch.no_grad():
            torch.testing.assert_close(model(x, prompt_maps=maps), out, rtol=1e-5, atol=1e-5)
            with pytest.raises(ValueError, match="prompt_maps"):
                model(x, prompt_maps={"prompt1": maps["prompt1"][..., :-1]})


def test_config_dict_round_trip():
    import json

    model = PromptIR("cpl", "tiny", top_k=2, prompt_sizes=(8, 8, 4))
    rebuilt = PromptIR.from_config_dict(json.loads(json.dumps(model.config_dict())))
    assert rebuilt.top_k == 2 and rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict(), strict=True)


def test_unused_official_layers_only_in_official_presets():
    assert not hasattr(PromptIR("promptir", "tiny"), "chnl_reduce1")
    assert not hasattr(PromptIR("none", "tiny"), "prompt1")
    with_unused = PromptIR("promptir", "tiny", official_unused_layers=True)
    assert not with_unused.chnl_reduce3.weight.requires_grad


# ----------------------------------------------------------------------------- CPL negatives


def test_cpl_negatives_equal_full_rerun_with_forced_routing_and_reuse_the_encoder():
    model = PromptIR("cpl", "tiny", top_k=1).train()
    x = torch.rand(2, 3, 32, 40)
    calls = {"encoder": 0, "latent": 0, "decoder": 0}
    hooks = [getattr(model, name).register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
             for key, name in (("encoder", "encoder_level1"), ("latent", "latent"), ("decoder", "decoder_level1"))]
    out, aux = model(x, num_negatives=3, return_aux=True, generator=torch.Generator().manual_seed(7))
    for hook in hooks:
        hook.remove()
    assert calls == {"encoder": 1, "latent": 1, "decoder": 2}  # negatives: one batched decoder pass
    negatives = aux["negatives"]
    assert negatives.shape == (3, 2, 3, 32, 40)
    positive_choice = aux["routing"]["prompt3"].argmax(dim=1)
    for j in range(3):
        routing_j = {k: v[j] for k, v in aux["negative_routing"].items()}
        assert (routing_j["prompt3"].argmax(dim=1) != positive_choice).all()
        torch.testing.assert_close(negatives[j], model(x, routing=routing_j), rtol=1e-5, atol=1e-5)
    out2, negatives2 = model.forward_with_negatives(x, 3, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(negatives2, negatives)
    assert not torch.allclose(negatives[0], out)


def test_cpl_negatives_bad_counts():
    model = PromptIR("cpl", "tiny", top_k=2)
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="num_negatives"):
        model(x, num_negatives=2)  # (5 - 2) // 2 = 1 negative at most
    with pytest.raises(ValueError, match="num_negatives"):
        PromptIR("promptir", "tiny")(x, num_negatives=1)
    with pytest.raises(ValueError, match="num_negatives"):
        model(x, num_negatives=-1)


def test_dense_promptir_negatives_borrow_other_images_prompt_weights():
    """CPR without SPM: negative j restores image b with the (detached) dense routing of image b - j."""
    model = PromptIR("promptir", "tiny").train()
    x = torch.rand(4, 3, 24, 32)
    out, aux = model(x, num_negatives=2, return_aux=True)
    assert aux["negatives"].shape == (2, 4, 3, 24, 32)
    for j in range(2):
        rolled = {k: v.roll(j + 1, 0) for k, v in aux["routing"].items()}
        for key, routing in aux["negative_routing"].items():
            torch.testing.assert_close(routing[j], rolled[key])
            assert not routing.requires_grad
        torch.testing.assert_close(aux["negatives"][j], model(x, routing=rolled), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch size"):
        model(x, num_negatives=4)  # the 4th would borrow the image's own weights
    with pytest.raises(ValueError, match="num_negatives needs"):
        PromptIR("pip", "tiny")(x, num_negatives=1)
    with pytest.raises(ValueError, match="dense prompts"):
        PromptIR("cpl", "tiny")(x, num_negatives=1, negative_mode="batch")


def _collapse_(model: PromptIR, prompt: int) -> PromptIR:
    """Every router picks ``prompt`` for every image (the collapse seen in training)."""
    with torch.no_grad():
        for key in model.routing_keys:
            layer = getattr(model, key).linear_layer
            layer.weight.zero_()
            layer.bias.fill_(0.0)
            layer.bias[prompt] = 8.0
    return model


@pytest.mark.parametrize("mode", ["random", "ordered"])
def test_random_negatives_give_every_unselected_prompt_a_cpr_gradient_on_a_collapsed_router(mode):
    import cplfast

    torch.manual_seed(0)
    model = _collapse_(PromptIR("cpl", "tiny").train(), prompt=4)
    cpr = cplfast.ContrastivePromptLoss()
    reached = {key: torch.zeros(5, dtype=torch.bool) for key in model.routing_keys}
    for step in range(4):
        model.zero_grad()
        x, y = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
        out, aux = model(x, num_negatives=1, negative_mode=mode, return_aux=True)
        assert all((r.argmax(dim=1) == 4).all() for r in aux["routing"].values())  # collapsed
        cpr(out, y, aux["negatives"]).backward()
        for key in model.routing_keys:
            reached[key] |= getattr(model, key).prompt_param.grad[0].flatten(1).abs().sum(dim=1) > 0
    for key, hit in reached.items():
        if mode == "random":  # every prompt: the selected one and, as negatives, all four others
            assert hit.all(), (key, hit)
        else:  # ordered: the negative is always prompt 0; prompts 1-3 never learn
            assert hit.tolist() == [True, False, False, False, True], (key, hit)


def test_random_negatives_follow_the_generator():
    model = PromptIR("cpl", "tiny").train()
    x = torch.rand(3, 3, 16, 16)

    def draw(seed):
        _, aux = model(x, num_negatives=2, generator=torch.Generator().manual_seed(seed), return_aux=True)
        return torch.cat([aux["negative_routing"][k] for k in model.routing_keys])

    assert torch.equal(draw(1), draw(1))
    assert any(not torch.equal(draw(1), draw(s)) for s in range(2, 6))
    torch.manual_seed(11)
    a = model(x, num_negatives=2, return_aux=True)[1]["negative_routing"]  # default: torch's generator
    torch.manual_seed(11)
    b = model(x, num_negatives=2, return_aux=True)[1]["negative_routing"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="negative_mode"):
        model(x, num_negatives=1, negative_mode="fixed")


def test_load_balance_and_gate_noise_options_of_the_cpl_model():
    model = PromptIR("cpl", "tiny", gate_noise=0.5, loss_weights={"load_balance": 0.01}).train()
    out, aux = model(torch.rand(2, 3, 16, 16), return_aux=True)
    assert set(aux["losses"]) == {"prompt1.load_balance", "prompt2.load_balance", "prompt3.load_balance"}
    assert all(m.gate_noise == 0.5 and m.load_balance for m in (model.prompt1, model.prompt2, model.prompt3))
    assert PromptIR("cpl", "tiny")(torch.rand(1, 3, 16, 16), return_aux=True)[1]["losses"] == {}  # off by default
    rebuilt = PromptIR.from_config_dict(model.config_dict())
    assert rebuilt.prompt3.gate_noise == 0.5 and rebuilt.loss_weights["load_balance"] == 0.01
    with pytest.raises(ValueError, match="gate_noise"):
        PromptIR("cpl", "tiny", gate_noise=-0.1)


def test_dppd_model_defaults_are_the_paper_readings():
    model = PromptIR("dppd", "tiny").train()
    assert model.assignment.prototype_mode == "predefined" and model.prompt1.sampling == "assigned"
    assert model.loss_weights == {"assignment_ce": 0.0, "kl": 0.0}
    _, aux = model(torch.rand(2, 3, 16, 16), labels=torch.tensor([0, 1]), return_aux=True)
    assert aux["losses"] == {}  # the auxiliary losses are off unless weighted
    on = PromptIR("dppd", "tiny", dppd_prototypes="learnable", dppd_sampling="mixture",
                  loss_weights={"assignment_ce": 0.1, "kl": 1e-4})
    _, aux = on.train()(torch.rand(2, 3, 16, 16), labels=torch.tensor([0, 1]), return_aux=True)
    assert set(aux["losses"]) == {"assignment.assignment_ce", "prompt1.kl", "prompt2.kl", "prompt3.kl"}
    assert isinstance(on.assignment.prototypes, torch.nn.Parameter) and on.prompt2.sampling == "mixture"
    with pytest.raises(ValueError, match="dppd_sampling"):
        PromptIR("dppd", "tiny", dppd_sampling="argmax")


# ----------------------------------------------------------------------------- CPLIR / BasicSR checkpoints


UNUSED = ("chnl_reduce1", "chnl_reduce2", "chnl_reduce3",
          "reduce_noise_channel_1", "reduce_noise_channel_2", "reduce_noise_channel_3")


@pytest.fixture(scope="module")
def cpl_base():
    torch.manual_seed(99)
    return perturb_(PromptIR("cpl", "base")).eval()


def test_cplir_checkpoint_loads_and_matches_cpl(cpl_base, tmp_path, caplog):
    import logging

    state = {k: v for k, v in cpl_base.state_dict().items() if k.split(".")[0] not in UNUSED}
    assert len(state) == 542  # PromptIR's 548 without the six unused convolutions
    raw = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path / "cplir.pth"
    torch.save({"params": raw, "params_ema": state}, path)  # a BasicSR file as CPLIR ships them
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        expected = cpl_base(x)
    with caplog.at_level(logging.INFO, logger="cplfast.models"):
        model = PromptIR.from_official(path).eval()
    assert model.prompt_type == "cpl" and model.top_k == 1
    assert model.official_source == {"format": "cplir", "keys": 542, "entry": "params_ema"}
    assert "cplir" in caplog.text and "params_ema" in caplog.text
    assert len(model.state_dict()) == 542
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    chosen = PromptIR.from_official(torch.load(path, weights_only=True), key="params")
    assert chosen.official_source["entry"] == "params"
    torch.testing.assert_close(chosen.output.weight, raw["output.weight"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="key='ema'"):
        PromptIR.from_official(path, key="ema")
    assert PromptIR.from_official(state, prompt="promptir").prompt_type == "promptir"
    # the official PromptIR layout (548 keys) is still recognised as such
    full = PromptIR.from_official(cpl_base.state_dict())
    assert full.official_source == {"format": "promptir", "keys": 548, "entry": None} and full.prompt_type == "promptir"
    with pytest.raises(ValueError, match="prompt"):
        PromptIR.from_official(state, prompt="dppd")
    with pytest.raises(ValueError, match="not an official checkpoint"):
        PromptIR.from_official({"a.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------- restore and tiling


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / F.mse_loss(a, b).item())


@pytest.mark.parametrize("prompt", ["promptir", "dppd"])
def test_restore_any_size_pads_and_crops(prompt):
    model = PromptIR(prompt, "tiny").eval()
    image = torch.rand(3, 29, 43)
    out, routing = model.restore(image)
    assert out.shape == image.shape
    assert set(routing) == set(model.routing_keys)
    padded = F.pad(image[None], (0, 5, 0, 3), mode="reflect")
    with torch.no_grad():
        torch.testing.assert_close(out, model(padded)[0, :, :29, :43], rtol=1e-5, atol=1e-5)
    assert model.restore(torch.rand(2, 3, 5, 3))[0].shape == (2, 3, 5, 3)  # smaller than the padding


def test_tiled_restore_agrees_with_whole_image():
    torch.manual_seed(3)
    model = PromptIR("promptir", "tiny").train()  # restore switches to eval and back
    image = F.avg_pool2d(torch.rand(1, 3, 104, 136), 5, 1, 2)
    whole, routing = model.restore(image)
    tiled, tiled_routing = model.restore(image, tile=64, overlap=24, tile_mode="blend")
    assert model.training
    assert tiled.shape == image.shape
    assert _psnr(tiled, whole) >= 40.0
    for key, value in routing.items():
        torch.testing.assert_close(tiled_routing[key], value)
    downscaled, small_routing = model.restore(image, tile=64, overlap=24, routing_size=64, tile_mode="blend")
    assert _psnr(downscaled, whole) >= 35.0
    for key, value in routing.items():  # routing from the downscaled image is close to the whole image's
        assert (small_routing[key] - value).abs().max() < 0.05
    single, _ = model.restore(image, tile=256, routing=routing, tile_mode="blend")  # one tile covering everything == whole
    torch.testing.assert_close(single, whole, rtol=1e-5, atol=1e-5)


def test_restore_bad_input():
    model = PromptIR("none", "tiny")
    with pytest.raises(TypeError, match="image"):
        model.restore(torch.zeros(3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="image"):
        model.restore(torch.zeros(4, 16, 16))
    with pytest.raises(ValueError, match="finite"):
        model.restore(torch.full((3, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="tile"):
        model.restore(torch.zeros(3, 16, 16), tile=20)
    with pytest.raises(ValueError, match="overlap"):
        model.restore(torch.zeros(3, 16, 16), tile=16, overlap=16)


# ----------------------------------------------------------------------------- summary and bad input


def test_summary_counts_params_and_macs():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False))
    s = summary(conv, (10, 12), verbose=False)
    assert s.params == 3 * 8 * 9 and s.macs == 3 * 8 * 9 * 10 * 12 and s.prompt_macs == 0

    model = PromptIR("promptir", "tiny")
    small, large = summary(model, (16, 16), verbose=False), summary(model, (32, 16), verbose=False)
    assert small.params == sum(p.numel() for p in model.parameters())
    prompt_params = sum(p.numel() for n in model.prompt_module_names() for p in getattr(model, n).parameters())
    assert small.prompt_params == prompt_params
    assert 0 < small.prompt_mac_share < 1 and 0 < small.prompt_param_share < 1
    assert 1.8 < large.macs / small.macs <= 2.0  # linear in pixels but for the size-independent prompt mix
    assert summary(PromptIR("none", "tiny"), 16, verbose=False).prompt_macs == 0
    with pytest.raises(ValueError, match="size"):
        summary(model, (0, 16), verbose=False)


def test_bad_model_arguments_and_inputs():
    with pytest.raises(ValueError, match="prompt"):
        PromptIR("prompt-ir", "tiny")
    with pytest.raises(ValueError, match="preset"):
        PromptIR("promptir", "huge")
    with pytest.raises(TypeError, match="unknown PromptIR option"):
        PromptIR("promptir", "tiny", width=3)
    with pytest.raises(ValueError, match="divisible"):
        PromptIR("promptir", "tiny", prompt_dims=(16, 32, 63))
    with pytest.raises(ValueError, match="top_k"):
        PromptIR("cpl", "tiny", top_k=6)
    model = PromptIR("cpl", "tiny")
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.rand(1, 3, 20, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(3, 16, 16))
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="routing keys"):
        model(torch.rand(1, 3, 16, 16), routing={"assignment": torch.rand(1, 5)})
    with pytest.raises(ValueError, match=r"routing\['prompt1'\]"):
        model(torch.rand(2, 3, 16, 16), routing={"prompt1": torch.rand(3, 5)})
    dppd = PromptIR("dppd", "tiny")
    with pytest.raises(ValueError, match="labels"):
        dppd(torch.rand(2, 3, 16, 16), labels=torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="labels"):
        dppd(torch.rand(2, 3, 16, 16), labels=torch.tensor([0]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("prompt", ["promptir", "cpl", "pip", "dppd"])
def test_cuda_fused_path_matches_reference_backend(prompt):
    import cplfast

    model = PromptIR(prompt, "tiny").cuda().eval()
    x = torch.rand(2, 3, 32, 48, device="cuda")
    with torch.no_grad():
        fused = model(x)  # backend "auto": Triton kernels on CUDA tensors
        with cplfast.use_backend("reference"):
            expected = model(x)
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)
