"""cplfast.patch: swapping PromptGenBlocks and MDTA attentions in a model built outside cplfast."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _official_promptir as official  # noqa: E402

import cplfast  # noqa: E402
from cplfast import PromptGenBlock, SparsePromptModule  # noqa: E402
from cplfast.models import MDTA, PromptIR  # noqa: E402


def _official_tiny() -> nn.Module:
    model = official.OfficialPromptIR(**official.TINY_ARGS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("temperature", "body.weight")):
                p.uniform_(0.5, 1.5)
    return model


def _modules_of(model: nn.Module, cls) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, cls)]


def test_patch_shares_parameters_and_keeps_outputs_and_gradients():
    original = _official_tiny()
    patched = copy.deepcopy(original)
    params_before = {name: p for name, p in patched.named_parameters()}
    keys_before = list(patched.state_dict())
    n_prompts = len(_modules_of(patched, official.PromptBlock))
    n_attn = len(_modules_of(patched, official.Attention))

    result = cplfast.patch(patched)

    assert result is patched
    assert not _modules_of(patched, official.PromptBlock) and not _modules_of(patched, official.Attention)
    assert len(_modules_of(patched, PromptGenBlock)) == n_prompts == 3
    assert len(_modules_of(patched, MDTA)) == n_attn
    assert list(patched.state_dict()) == keys_before
    for name, p in patched.named_parameters():
        assert p is params_before[name], f"{name} was copied instead of shared"

    x = torch.rand(1, 3, 16, 24, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, expected = patched(x), original(x_ref)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    (expected * weight).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    reference_params = dict(original.named_parameters())
    for name, p in patched.named_parameters():
        torch.testing.assert_close(p.grad, reference_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_patched_attention_goes_through_topm_channel_attention(monkeypatch):
    model = cplfast.patch(_official_tiny())
    calls = []
    real = cplfast.functional.topm_channel_attention

    def spy(q, k, v, temperature, **kwargs):
        calls.append(kwargs.get("fractions", "default"))
        return real(q, k, v, temperature, **kwargs)

    monkeypatch.setattr(cplfast.functional, "topm_channel_attention", spy)
    model(torch.rand(1, 3, 16, 16))
    assert len(calls) == len(_modules_of(model, MDTA)) and set(calls) == {None}


def test_patch_with_top_k_makes_sparse_prompt_modules():
    base = _official_tiny()
    x = torch.rand(2, 3, 16, 24)
    expected = base(x)
    prompt_len = base.prompt1.prompt_param.shape[1]

    dense_equivalent = cplfast.patch(copy.deepcopy(base), top_k=prompt_len)  # k = N keeps everything
    assert all(m.top_k == prompt_len for m in _modules_of(dense_equivalent, SparsePromptModule))
    torch.testing.assert_close(dense_equivalent(x), expected, rtol=1e-5, atol=1e-5)

    sparse = cplfast.patch(copy.deepcopy(base), top_k=1)
    modules = _modules_of(sparse, SparsePromptModule)
    assert len(modules) == 3 and all(m.top_k == 1 for m in modules)
    sparse(x)
    assert all((m.last_routing > 0).sum(dim=1).eq(1).all() for m in modules)


def test_patch_leaves_cplfast_models_alone_and_converts_on_request():
    model = PromptIR("promptir", "tiny")
    children = {name: id(m) for name, m in model.named_modules()}
    cplfast.patch(model)
    assert {name: id(m) for name, m in model.named_modules()} == children
    prompt_param = model.prompt2.prompt_param
    cplfast.patch(model, top_k=2)
    assert isinstance(model.prompt2, SparsePromptModule) and model.prompt2.prompt_param is prompt_param


def test_patch_root_module_and_lookalikes():
    block = official.PromptBlock(8, 3, 4, 12)
    replaced = cplfast.patch(block)
    assert isinstance(replaced, PromptGenBlock) and replaced.prompt_param is block.prompt_param
    x = torch.rand(2, 12, 8, 8)
    torch.testing.assert_close(replaced(x), block(x), rtol=1e-5, atol=1e-5)

    class NotMDTA(nn.Module):  # has the attribute names but a different structure: must be left alone
        def __init__(self):
            super().__init__()
            self.num_heads = 2
            self.temperature = nn.Parameter(torch.ones(2))
            self.qkv = nn.Conv2d(4, 12, 1)
            self.qkv_dwconv = nn.Conv2d(12, 12, 3, padding=1, groups=12)
            self.project_out = nn.Conv2d(4, 4, 1)

    holder = nn.Sequential(NotMDTA())
    cplfast.patch(holder)
    assert isinstance(holder[0], NotMDTA)


def test_patch_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        cplfast.patch("not a model")
    with pytest.raises(ValueError, match="top_k"):
        cplfast.patch(_official_tiny(), top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        cplfast.patch(_official_tiny(), top_k=6)
