"""The nine layers and losses of SPEC §4: shapes, parameter names, train/eval behaviour, bad input, gradients.

All on CPU with small, odd shapes. Where a layer wraps a functional op, its output is compared with an
independent formulation written here (the official PromptIR forward, MDTA / top-m attention with
explicit masks, ``F.scaled_dot_product_attention``).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import cplfast
from cplfast import functional
from cplfast.features import FilterBankPyramid, VGG16Features
from cplfast.layers.pip import ChannelCrossAttention

B, H, W = 2, 9, 7  # odd spatial sizes everywhere


def weighted_sum(*outputs: torch.Tensor) -> torch.Tensor:
    """A loss with random weights, so that no gradient vanishes by symmetry (e.g. softmax rows summing to 1)."""
    return sum((o * torch.randn_like(o)).sum() for o in outputs)


def assert_all_grads(module: torch.nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


# ----------------------------------------------------------------------------------------------------
# PromptGenBlock / SparsePromptModule (SPEC §4.1, §4.2)


def spy_on_functional(monkeypatch, name: str) -> list[tuple[tuple, dict]]:
    """Record the ``(args, kwargs)`` of every call to ``cplfast.functional.<name>`` (which still runs)."""
    calls = []
    original = getattr(functional, name)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(functional, name, spy)
    return calls


def official_promptgen_forward(block: cplfast.PromptGenBlock, x: torch.Tensor) -> torch.Tensor:
    """PromptIR's net/model.py PromptGenBlock.forward, written out (repeat and all)."""
    b, _, h, w = x.shape
    emb = x.mean(dim=(-2, -1))
    weights = F.softmax(block.linear_layer(emb), dim=1)
    prompt = weights[:, :, None, None, None] * block.prompt_param.repeat(b, 1, 1, 1, 1)
    prompt = torch.sum(prompt, dim=1)
    prompt = F.interpolate(prompt, (h, w), mode="bilinear")
    return block.conv3x3(prompt)


def test_promptgen_official_names_and_shapes():
    n, d, s, c = 3, 6, 5, 10
    for cls in (cplfast.PromptGenBlock, cplfast.SparsePromptModule):
        sd = cls(prompt_dim=d, prompt_len=n, prompt_size=s, lin_dim=c).state_dict()
        assert {k: tuple(v.shape) for k, v in sd.items()} == {
            "prompt_param": (1, n, d, s, s),
            "linear_layer.weight": (n, c),
            "linear_layer.bias": (n,),
            "conv3x3.weight": (d, d, 3, 3),
        }


def test_promptgen_matches_official_forward_and_backward():
    block = cplfast.PromptGenBlock(prompt_dim=6, prompt_len=4, prompt_size=5, lin_dim=10)
    x = torch.randn(B, 10, H, W, requires_grad=True)
    out = block(x)
    assert out.shape == (B, 6, H, W)
    expected = official_promptgen_forward(block, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *block.parameters()], g)
    grads_ref = torch.autograd.grad(expected, [x, *block.parameters()], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_promptgen_and_spm_state_dicts_interchangeable():
    kwargs = dict(prompt_dim=6, prompt_len=4, prompt_size=5, lin_dim=10)
    dense = cplfast.PromptGenBlock(**kwargs)
    sparse = cplfast.SparsePromptModule(**kwargs, top_k=4)
    sparse.load_state_dict(dense.state_dict(), strict=True)
    x = torch.randn(B, 10, H, W)
    torch.testing.assert_close(sparse(x), dense(x))  # top_k = N is the dense block
    back = cplfast.PromptGenBlock(**kwargs)
    back.load_state_dict(cplfast.SparsePromptModule(**kwargs, top_k=1).state_dict(), strict=True)


def test_spm_top1_uses_one_prompt_and_keeps_routing():
    spm = cplfast.SparsePromptModule(prompt_dim=6, prompt_len=5, prompt_size=4, lin_dim=8, top_k=1)
    x = torch.randn(3, 8, H, W)
    out = spm(x)
    routing = spm.last_routing
    assert routing.shape == (3, 5)
    assert ((routing > 0).sum(dim=1) == 1).all()
    probs = torch.softmax(spm.linear_layer(x.mean(dim=(2, 3))), dim=1)
    top = probs.argmax(dim=1)
    torch.testing.assert_close(routing.max(dim=1).values, probs.max(dim=1).values)
    assert (routing.argmax(dim=1) == top).all()
    mixed = probs.max(dim=1).values[:, None, None, None] * spm.prompts[top]
    expected = spm.conv3x3(F.interpolate(mixed, (H, W), mode="bilinear", align_corners=False))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(spm.prompt_from_routing(routing, (H, W)), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,kwargs", [(cplfast.PromptGenBlock, {}), (cplfast.SparsePromptModule, {"top_k": 2}),
                                         (cplfast.SparsePromptModule, {"top_k": 1, "renorm": True, "temperature": 0.5})])
def test_promptgen_and_spm_gradients_reach_every_parameter(cls, kwargs):
    block = cls(prompt_dim=4, prompt_len=5, prompt_size=3, lin_dim=6, **kwargs)
    x = torch.randn(B, 6, H, W, requires_grad=True)
    weighted_sum(block(x)).backward()
    if kwargs.get("top_k") == 1 and kwargs.get("renorm"):
        # renormalised top-1 weights are constant 1: the router gets no gradient, only the prompt and conv
        assert block.linear_layer.weight.grad is None or block.linear_layer.weight.grad.abs().sum() == 0
        assert block.prompt_param.grad.abs().sum() > 0 and block.conv3x3.weight.grad.abs().sum() > 0
    else:
        assert_all_grads(block)
        assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["random", "ordered"])
@pytest.mark.parametrize("n,k", [(5, 1), (7, 2), (6, 3)])
def test_spm_negative_routing_moves_kept_mass_to_unselected(n, k, mode):
    spm = cplfast.SparsePromptModule(prompt_dim=4, prompt_len=n, prompt_size=3, lin_dim=6, top_k=k)
    spm(torch.randn(4, 6, H, W))
    routing = spm.last_routing
    kmax = spm.max_negatives()
    assert kmax == (n - k) // k
    neg = spm.negative_routing(routing, kmax, mode=mode)
    assert neg.shape == (kmax, 4, n) and not neg.requires_grad
    selected = routing > 0
    used = selected.clone()
    for j in range(kmax):
        support = neg[j] > 0
        assert (support.sum(dim=1) == k).all()
        assert not (support & used).any(), "a negative reuses a selected or already used component"
        used |= support
        # the same kept weights, moved: sorted values agree row by row
        torch.testing.assert_close(neg[j].sort(dim=1).values, routing.sort(dim=1).values)
    with pytest.raises(ValueError, match="num_negatives"):
        spm.negative_routing(routing, kmax + 1)
    with pytest.raises(ValueError, match="num_negatives"):
        spm.negative_routing(routing, 0)
    with pytest.raises(ValueError, match="routing"):
        spm.negative_routing(routing[:, :-1], 1)


def test_spm_negative_prompt_differs_from_positive():
    spm = cplfast.SparsePromptModule(prompt_dim=4, prompt_len=5, prompt_size=3, lin_dim=6)
    x = torch.randn(2, 6, H, W)
    positive = spm(x)
    neg = spm.negative_routing(spm.last_routing, 2)
    maps = torch.stack([spm.prompt_from_routing(r, (H, W)) for r in neg])
    assert maps.shape == (2, 2, 4, H, W)
    assert not torch.allclose(maps[0], positive) and not torch.allclose(maps[1], maps[0])


# ----------------------------------------------------------------------------------------------------
# Channel cross-attention inside PIP, against explicit MDTA / top-m formulations


def explicit_channel_attention(layer: ChannelCrossAttention, x_q, x_kv):
    b, c, h, w = x_kv.shape
    heads = layer.num_heads
    q = layer.q_dwconv(layer.q(x_q)).expand(b, -1, -1, -1).reshape(b, heads, c // heads, h * w)
    k, v = layer.kv_dwconv(layer.kv(x_kv)).chunk(2, dim=1)
    k, v = k.reshape(b, heads, c // heads, h * w), v.reshape(b, heads, c // heads, h * w)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1)) * layer.temperature
    if layer.fractions is None:
        out = attn.softmax(dim=-1) @ v
    else:
        cc = c // heads
        out = 0
        for f, weight in zip(layer.fractions, layer.mix):
            index = torch.topk(attn, k=int(cc * f), dim=-1).indices
            mask = torch.zeros_like(attn).scatter_(-1, index, 1.0)
            masked = torch.where(mask > 0, attn, torch.full_like(attn, float("-inf")))
            out = out + weight * (masked.softmax(dim=-1) @ v)
    return layer.project_out(out.reshape(b, c, h, w))


@pytest.mark.parametrize("fractions", [None, (1 / 2, 2 / 3, 3 / 4, 4 / 5), (0.4, 1.0)])
@pytest.mark.parametrize("query_batch", [1, B])
def test_channel_cross_attention_matches_explicit_form(fractions, query_batch):
    layer = ChannelCrossAttention(12, heads=2, fractions=fractions)
    with torch.no_grad():
        layer.temperature.uniform_(0.5, 2.0)
        if layer.mix is not None:
            layer.mix.uniform_(0.1, 1.0)
    x_q, x_kv = torch.randn(query_batch, 12, H, W), torch.randn(B, 12, H, W)
    torch.testing.assert_close(layer(x_q, x_kv), explicit_channel_attention(layer, x_q, x_kv),
                               rtol=1e-5, atol=1e-5)


def test_topm_attention_loads_official_mix_weights():
    layer = ChannelCrossAttention(8, heads=2, fractions=(1 / 2, 2 / 3, 3 / 4, 4 / 5))
    sd = {k: v for k, v in layer.state_dict().items() if k != "mix"}
    values = torch.rand(4)
    sd.update({f"attn{j + 1}": values[j : j + 1].clone() for j in range(4)})
    layer.load_state_dict(sd, strict=True)
    torch.testing.assert_close(layer.mix.detach(), values)


# ----------------------------------------------------------------------------------------------------
# PromptInPrompt (SPEC §4.3)


def make_pip(in_dim=10, prompt_dim=8, prompt_size=5, t=4, **kw):
    return cplfast.PromptInPrompt(in_dim, prompt_dim, prompt_size, num_degradations=t, heads=2, **kw)


def test_pip_parameter_names_and_shapes():
    m = make_pip()
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["detask_prompt_param"] == (1, 4, 8, 1, 1)
    assert shapes["low_prompt_param"] == (1, 8, 5, 5)
    assert shapes["router.weight"] == (4, 10) and shapes["router.bias"] == (4,)
    assert shapes["LGM.attn.temperature"] == (2, 1, 1)
    assert shapes["outconv.weight"] == (8, 8, 3, 3)
    assert "LGM.attn.mix" not in shapes  # MDTA form: nothing to mix


@pytest.mark.parametrize("in_dim,prompt_dim", [(10, 8), (6, 8), (8, 8)])
def test_pip_forward_backward_shapes(in_dim, prompt_dim):
    m = make_pip(in_dim=in_dim, prompt_dim=prompt_dim)
    x = torch.randn(B, in_dim, H, W, requires_grad=True)
    out = m(x)
    assert out.shape == (B, prompt_dim, H, W)
    assert m.last_routing.shape == (B, 4)
    torch.testing.assert_close(m.last_routing.sum(dim=1), torch.ones(B))
    assert "router_ce" not in m.last_aux
    (weighted_sum(out) + m.last_aux["orthogonality"]).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert_all_grads(m)


def test_pip_uses_mdta_channel_attention(monkeypatch):
    calls = spy_on_functional(monkeypatch, "topm_channel_attention")
    make_pip()(torch.randn(B, 10, H, W))
    assert len(calls) == 1 and calls[0][1]["fractions"] is None and calls[0][1]["mix"] is None


def test_pip_teacher_forcing_in_training_blind_in_eval():
    m = make_pip()
    x = torch.randn(3, 10, H, W)
    labels = torch.tensor([0, 3, 1])
    m.train()
    forced = m(x, labels)
    ce = m.last_aux["router_ce"]
    torch.testing.assert_close(ce, F.cross_entropy(m.last_logits, labels))
    # float one-hot weights are the same labels
    torch.testing.assert_close(m(x, F.one_hot(labels, 4).float()), forced)
    # with labels the mix ignores the router; without, the router decides
    blind = m(x)
    with torch.no_grad():
        m.router.weight.add_(torch.randn_like(m.router.weight))
        m.router.bias.add_(torch.randn_like(m.router.bias))
    torch.testing.assert_close(m(x, labels), forced)
    assert not torch.allclose(m(x), blind)
    # eval: labels never steer the mix (blind), but still give the router a cross-entropy
    m.eval()
    torch.testing.assert_close(m(x, labels), m(x))
    assert "router_ce" in (m(x, labels), m.last_aux)[1]
    assert not torch.allclose(m(x), forced)


def test_pip_without_teacher_forcing_only_adds_the_cross_entropy():
    m = make_pip(teacher_forcing=False).train()
    x = torch.randn(B, 10, H, W)
    torch.testing.assert_close(m(x, torch.tensor([2, 2])), m(x))


def test_pip_router_gets_gradient_from_cross_entropy_under_teacher_forcing():
    m = make_pip().train()
    m(torch.randn(B, 10, H, W), torch.tensor([1, 2]))
    m.last_aux["router_ce"].backward()
    assert m.router.weight.grad.abs().sum() > 0
    assert m.detask_prompt_param.grad is None  # the CE does not touch the prompts


def test_pip_orthogonality_regulariser():
    m = make_pip(t=5)
    prompts = m.degradation_prompts.detach()
    expected = sum(
        max(0.0, float(F.cosine_similarity(prompts[i], prompts[j], dim=0)))
        for i, j in itertools.combinations(range(5), 2)
    )
    assert m.orthogonality_loss().item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    with torch.no_grad():  # pairwise orthogonal or opposed: no penalty
        m.detask_prompt_param.zero_()
        eye = torch.eye(8)
        for t in range(5):
            m.detask_prompt_param[0, t, :, 0, 0] = eye[t] if t < 4 else -eye[0]
    assert m.orthogonality_loss().item() == 0.0
    with torch.no_grad():
        m.detask_prompt_param[0, 1] = 3 * m.detask_prompt_param[0, 0] + m.detask_prompt_param[0, 2]
    loss = m.orthogonality_loss()  # only the pairs (0, 1) and (1, 2) are not orthogonal
    assert loss.item() == pytest.approx((3 + 1) / 10**0.5, rel=1e-5)
    loss.backward()
    assert m.detask_prompt_param.grad.abs().sum() > 0


def test_pip_rejects_bad_labels():
    m = make_pip().train()
    x = torch.randn(B, 10, H, W)
    with pytest.raises(ValueError, match="labels.*\\[0, 4\\)"):
        m(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="labels"):
        m(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels"):
        m(x, torch.rand(B, 3))
    with pytest.raises(TypeError, match="labels"):
        m(x, [0, 1])


def test_pip_degradation_prompt_is_the_mean_over_t():
    """Official PIP averages the (B, T, D) products w_t P_t over T: one-hot labels give P_label / T.

    Hard-coded case: T = 4, D = 2, P_2 = (8, -4); every layer after the product is replaced by a probe
    that returns the semantic prompt, and the feature is all ones, so the probe sees p_deg itself.
    """
    class Probe(torch.nn.Module):
        def forward(self, basic, semantic):
            seen.append(semantic)
            return semantic

    m = cplfast.PromptInPrompt(2, 2, 1, num_degradations=4, heads=1).train()
    seen = []
    m.LGM, m.outconv = Probe(), torch.nn.Identity()
    with torch.no_grad():
        m.detask_prompt_param.zero_()
        m.detask_prompt_param[0, 2, :, 0, 0] = torch.tensor([8.0, -4.0])
        m.detask_prompt_param[0, 0, :, 0, 0] = torch.tensor([1.0, 1.0])
    x = torch.ones(1, 2, 1, 1)
    m(x, torch.tensor([2]))
    assert seen[-1].flatten().tolist() == [2.0, -1.0]  # (8, -4) / 4; a sum would give (8, -4)
    m(x, torch.tensor([[0.5, 0.0, 0.5, 0.0]]))  # composite weights: (0.5 P_0 + 0.5 P_2) / 4
    assert seen[-1].flatten().tolist() == [1.125, -0.375]


def test_pip_without_router_is_the_official_layer():
    m = make_pip(router=False)
    assert m.router is None and not any(k.startswith("router") for k in m.state_dict())
    x = torch.randn(B, 10, H, W)
    labels = torch.tensor([3, 1])
    for mode in (m.train(), m.eval()):  # labels steer the mix in training and in eval alike
        out = mode(x, labels)
        assert "router_ce" not in m.last_aux and m.last_logits is None
        torch.testing.assert_close(m.last_routing, F.one_hot(labels, 4).float())
        torch.testing.assert_close(mode(x, F.one_hot(labels, 4).float()), out)
    assert not torch.allclose(m(x, torch.tensor([0, 2])), out)
    with pytest.raises(ValueError, match="labels are required.*router=False"):
        m(x)
    with pytest.raises(TypeError, match="router must be a bool"):
        make_pip(router=1)


def test_pip_official_initial_values():
    interaction = cplfast.SelectivePromptFeatureInteraction(8, 16, heads=4)
    assert interaction.attn.mix.tolist() == pytest.approx([0.2] * 4)  # official attn1..attn4 = 0.2
    assert interaction.attn.temperature.shape == (4, 1, 1) and interaction.reduce_channel.weight.shape == (8, 16, 1, 1)
    pip = make_pip(prompt_dim=8)  # the official LGM has 2 heads
    assert pip.LGM.attn.temperature.shape == (2, 1, 1) and pip.LGM.attn.mix is None


# ----------------------------------------------------------------------------------------------------
# SelectivePromptFeatureInteraction (SPEC §4.4)


@pytest.mark.parametrize("dim,prompt_dim", [(12, 8), (6, 8), (8, 8)])
def test_selective_interaction_shapes_and_grads(dim, prompt_dim):
    m = cplfast.SelectivePromptFeatureInteraction(dim, prompt_dim, heads=2)
    assert hasattr(m, "reduce_channel") == (dim < prompt_dim)
    assert m.attn.mix.shape == (4,)
    x = torch.randn(B, dim, H, W, requires_grad=True)
    prompt = torch.randn(B, prompt_dim, H, W, requires_grad=True)
    out = m(x, prompt)
    assert out.shape == (B, dim, H, W)
    weighted_sum(out).backward()
    assert x.grad is not None and prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert_all_grads(m)


def test_selective_interaction_calls_topm_with_learnable_mix(monkeypatch):
    calls = spy_on_functional(monkeypatch, "topm_channel_attention")
    m = cplfast.SelectivePromptFeatureInteraction(6, 10, heads=1, fractions=(0.5, 1.0))
    m(torch.randn(B, 6, H, W), torch.randn(B, 10, H, W))
    assert len(calls) == 1
    assert calls[0][1]["fractions"] == (0.5, 1.0) and calls[0][1]["mix"] is m.attn.mix


def test_selective_interaction_prompt_steers_output():
    m = cplfast.SelectivePromptFeatureInteraction(8, 8, heads=2)
    x = torch.randn(B, 8, H, W)
    assert not torch.allclose(m(x, torch.randn(B, 8, H, W)), m(x, torch.randn(B, 8, H, W)))


# ----------------------------------------------------------------------------------------------------
# DegradationPrototypeAssignment (SPEC §4.5)


def test_prototype_assignment_layer():
    m = cplfast.DegradationPrototypeAssignment(10, embed_dim=16, num_degradations=5, temperature=0.2,
                                               prototypes="learnable")
    protos = m.prototypes.detach()
    torch.testing.assert_close(protos @ protos.T, torch.eye(5), rtol=0, atol=1e-5)  # orthonormal init
    x = torch.randn(3, 10, H, W, requires_grad=True)
    labels = torch.tensor([4, 0, 2])
    a = m(x, labels)
    assert a.shape == (3, 5)
    torch.testing.assert_close(a.sum(dim=1), torch.ones(3))
    e = m.mlp(x.mean(dim=(2, 3)))
    expected = torch.softmax(F.cosine_similarity(e[:, None], m.prototypes[None], dim=-1) / 0.2, dim=1)
    torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.last_aux["assignment_ce"], F.nll_loss(expected.log(), labels), rtol=1e-5, atol=1e-6)
    (weighted_sum(a) + m.last_aux["assignment_ce"]).backward()
    assert_all_grads(m)
    assert x.grad is not None
    m(x.detach())
    assert m.last_aux == {}


def test_prototype_assignment_cross_entropy_learns_labels():
    m = cplfast.DegradationPrototypeAssignment(4, embed_dim=8, num_degradations=3, prototypes="learnable")
    labels = torch.arange(9) % 3
    x = torch.randn(9, 4, 3, 3) + 2 * F.one_hot(labels, 4).float()[:, :, None, None]
    m(x, labels)
    first = m.last_aux["assignment_ce"].item()
    for _ in range(25):  # plain gradient descent on the cross-entropy alone
        m.zero_grad()
        m(x, labels)
        m.last_aux["assignment_ce"].backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.5 * p.grad
    m(x, labels)
    assert m.last_aux["assignment_ce"].item() < first * 0.5


# ----------------------------------------------------------------------------------------------------
# PromptDistribution (SPEC §4.6)


def test_prompt_distribution_eval_is_deterministic_mean():
    m = cplfast.PromptDistribution(4, 3, 6, sampling="mixture").eval()
    a = torch.softmax(torch.randn(5, 4), dim=1)
    out = m(a)
    assert out.shape == (5, 3, 6)
    torch.testing.assert_close(m(a), out, rtol=0, atol=0)
    torch.testing.assert_close(out, torch.einsum("bt,tmd->bmd", a, m.mu), rtol=1e-5, atol=1e-6)
    assert not torch.equal(m(a, sample=True), out)


def test_prompt_distribution_train_samples_one_eps_per_image():
    m = cplfast.PromptDistribution(3, 2, 4, init_log_var=0.5, sampling="mixture").train()
    with torch.no_grad():
        m.log_var.uniform_(-1.0, 1.0)
    a = torch.softmax(torch.randn(4000, 3), dim=1)
    first, second = m(a), m(a)
    assert not torch.equal(first, second)
    torch.testing.assert_close(m(a, sample=False), torch.einsum("bt,tmd->bmd", a, m.mu), rtol=1e-5, atol=1e-6)
    # tokens = a mu + (a sigma) eps with eps ~ N(0, I): recover eps and check its moments
    mean = torch.einsum("bt,tmd->bmd", a, m.mu)
    sigma = torch.einsum("bt,tmd->bmd", a, torch.exp(0.5 * m.log_var))
    eps = ((first - mean) / sigma).detach()
    assert abs(eps.mean().item()) < 0.05
    assert abs(eps.std().item() - 1.0) < 0.05


def test_prompt_distribution_gradients_and_kl():
    m = cplfast.PromptDistribution(3, 2, 5, sampling="mixture").train()
    a = torch.softmax(torch.randn(4, 3), dim=1).requires_grad_()
    (weighted_sum(m(a)) + m.kl_loss()).backward()
    assert_all_grads(m)
    assert a.grad is not None
    normal = torch.distributions.Normal(m.mu, torch.exp(0.5 * m.log_var))
    expected = torch.distributions.kl_divergence(normal, torch.distributions.Normal(0.0, 1.0)).sum(-1).mean()
    torch.testing.assert_close(m.kl_loss(), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        m.mu.zero_()
        m.log_var.zero_()
    assert m.kl_loss().item() == 0.0


# ----------------------------------------------------------------------------------------------------
# PromptCrossFusion (SPEC §4.7)


@pytest.mark.parametrize("token_dim", [None, 5])
def test_prompt_cross_fusion_matches_sdpa(token_dim, monkeypatch):
    calls = spy_on_functional(monkeypatch, "prompt_token_attention")
    dim, heads, m_tokens = 12, 3, 7
    layer = cplfast.PromptCrossFusion(dim, heads, token_dim=token_dim)
    tokens = torch.randn(B, m_tokens, token_dim or dim, requires_grad=True)
    x = torch.randn(B, dim, H, W, requires_grad=True)
    out = layer(x, tokens)
    assert out.shape == (B, dim, H, W)
    assert [args[0].shape for args, _ in calls] == [(B, heads, H * W, dim // heads)]

    pixels = F.layer_norm(x.flatten(2).transpose(1, 2), (dim,), layer.norm.weight, layer.norm.bias)
    q = layer.q(pixels).view(B, H * W, heads, -1).transpose(1, 2)
    kv = layer.kv(layer.token_norm(tokens))
    k, v = (t.reshape(B, m_tokens, heads, -1).transpose(1, 2) for t in kv.chunk(2, dim=-1))
    attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, dim)
    expected = x + layer.project_out(attended).transpose(1, 2).reshape(B, dim, H, W)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    weighted_sum(out).backward()
    assert_all_grads(layer)
    assert tokens.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# ContrastivePromptLoss and its default features (SPEC §4.8)


def test_filter_bank_pyramid_properties():
    pyramid = FilterBankPyramid(levels=3, floor=0.05)
    images = torch.rand(2, 3, 17, 13)
    feats = pyramid(images)
    assert [tuple(f.shape) for f in feats] == [(2, 13, 17, 13), (2, 13, 8, 6), (2, 13, 4, 3)]
    for f, g in zip(feats, pyramid(images + 0.3)):  # zero-sum filters: blind to a brightness offset
        torch.testing.assert_close(f, g, rtol=1e-4, atol=1e-5)
    flat = pyramid(torch.full((1, 2, 8, 8), 0.7))
    for f in flat:
        torch.testing.assert_close(f[:, :-1], torch.zeros_like(f[:, :-1]), rtol=0, atol=1e-6)
        torch.testing.assert_close(f[:, -1], torch.full_like(f[:, -1], 0.05))
    assert pyramid.state_dict() == {}  # nothing to load, nothing saved
    with pytest.raises(ValueError, match="images must be at least 4x4"):
        pyramid(torch.rand(1, 3, 3, 9))


def test_contrastive_loss_equals_weighted_sum_of_infonce():
    loss_fn = cplfast.ContrastivePromptLoss(temperature=0.2, weight=0.3, level_weights=[1.0, 0.5, 0.25])
    out, target, negatives = torch.rand(2, 3, 13, 11), torch.rand(2, 3, 13, 11), torch.rand(3, 2, 3, 13, 11)
    bank = FilterBankPyramid()
    expected = 0
    for w, a, p, n in zip([1.0, 0.5, 0.25], bank(out), bank(target), zip(*[bank(neg) for neg in negatives])):
        expected = expected + w * functional.infonce(a, p, torch.stack(n), temperature=0.2, dim=1)
    torch.testing.assert_close(loss_fn(out, target, negatives), 0.3 * expected, rtol=1e-5, atol=1e-6)


def test_contrastive_loss_gradients_and_direction():
    loss_fn = cplfast.ContrastivePromptLoss()
    target = torch.rand(2, 3, 16, 15)
    negatives = (target + 0.3 * torch.randn(4, 2, 3, 16, 15)).requires_grad_()
    out = (target + 0.3 * torch.randn_like(target)).requires_grad_()
    target.requires_grad_()
    loss = loss_fn(out, target, negatives)
    assert loss.dim() == 0
    loss.backward()
    assert out.grad.abs().sum() > 0 and negatives.grad.abs().sum() > 0
    assert target.grad is None  # the positive is a constant
    # the restored image equal to the ground truth scores lower than a noisy one
    assert loss_fn(target.detach(), target.detach(), negatives.detach()) < loss.detach()
    detached = cplfast.ContrastivePromptLoss(detach_negatives=True)
    negatives.grad = None
    detached(out, target, negatives).backward()
    assert negatives.grad is None
    # weight scales linearly
    twice = cplfast.ContrastivePromptLoss(weight=0.2)(out, target, negatives)
    torch.testing.assert_close(twice, 2 * loss.detach(), rtol=1e-5, atol=1e-6)


def test_contrastive_loss_accepts_custom_features():
    pool = torch.nn.AvgPool2d(2)
    loss_fn = cplfast.ContrastivePromptLoss(features=lambda img: [img, pool(img)])
    out, target, negatives = torch.rand(1, 4, 8, 6), torch.rand(1, 4, 8, 6), torch.rand(2, 1, 4, 8, 6)
    expected = functional.infonce(out, target, negatives) + functional.infonce(pool(out), pool(target), pool(negatives.flatten(0, 1)).unflatten(0, (2, 1)))
    torch.testing.assert_close(loss_fn(out, target, negatives), 0.1 * expected, rtol=1e-5, atol=1e-6)


def test_contrastive_loss_vgg16_never_downloads(tmp_path):
    with pytest.raises((ImportError, FileNotFoundError), match="torchvision|not found"):
        cplfast.ContrastivePromptLoss(features="vgg16", vgg_weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="layers"):
        VGG16Features(layers=("relu9_9",))


# ----------------------------------------------------------------------------------------------------
# SupConLoss (SPEC §4.9)


def test_supcon_loss_module():
    z = torch.randn(8, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 2, 0, 3])
    loss = cplfast.SupConLoss(temperature=0.2)(z, labels)
    torch.testing.assert_close(loss, functional.supcon(z, labels, temperature=0.2))
    loss.backward()
    assert z.grad.abs().sum() > 0
    assert cplfast.SupConLoss()(torch.randn(4, 3), torch.arange(4)).item() == 0.0
    assert cplfast.SupConLoss(reduction="none")(z, labels).shape == (8,)


# ----------------------------------------------------------------------------------------------------
# Bad input: every layer raises a clear error naming the argument (SPEC §9)

X = torch.randn(B, 10, H, W)

BAD_CALLS = [
    ("PromptGenBlock x channels", lambda: cplfast.PromptGenBlock(4, 3, 3, 10)(torch.randn(B, 9, H, W)), ValueError, r"^x must have shape"),
    ("PromptGenBlock x rank", lambda: cplfast.PromptGenBlock(4, 3, 3, 10)(torch.randn(10, H, W)), ValueError, r"^x must have 4"),
    ("PromptGenBlock x dtype", lambda: cplfast.PromptGenBlock(4, 3, 3, 10)(torch.ones(B, 10, H, W, dtype=torch.long)), TypeError, r"^x must be a floating"),
    ("PromptGenBlock prompt_len", lambda: cplfast.PromptGenBlock(4, 0, 3, 10), ValueError, r"prompt_len"),
    ("SparsePromptModule top_k", lambda: cplfast.SparsePromptModule(4, 3, 3, 10, top_k=4), ValueError, r"top_k"),
    ("SparsePromptModule temperature", lambda: cplfast.SparsePromptModule(4, 3, 3, 10, temperature=0), ValueError, r"temperature"),
    ("PromptInPrompt x channels", lambda: make_pip()(torch.randn(B, 9, H, W)), ValueError, r"^x must have shape"),
    ("PromptInPrompt x type", lambda: make_pip()(X.numpy()), TypeError, r"^x must be a torch.Tensor"),
    ("PromptInPrompt heads", lambda: cplfast.PromptInPrompt(10, 9, 5, heads=2), ValueError, r"prompt_dim=9 .*heads=2"),
    ("PromptInPrompt prompt_size", lambda: cplfast.PromptInPrompt(10, 8, 0), ValueError, r"prompt_size"),
    ("Selective x channels", lambda: cplfast.SelectivePromptFeatureInteraction(8, 8, 2)(torch.randn(B, 7, H, W), torch.randn(B, 8, H, W)), ValueError, r"^x must have shape"),
    ("Selective prompt channels", lambda: cplfast.SelectivePromptFeatureInteraction(8, 8, 2)(torch.randn(B, 8, H, W), torch.randn(B, 6, H, W)), ValueError, r"^prompt must have shape"),
    ("Selective prompt size", lambda: cplfast.SelectivePromptFeatureInteraction(8, 8, 2)(torch.randn(B, 8, H, W), torch.randn(B, 8, H, W + 1)), ValueError, r"^prompt must have the batch and spatial size"),
    ("Selective prompt batch", lambda: cplfast.SelectivePromptFeatureInteraction(8, 8, 2)(torch.randn(B, 8, H, W), torch.randn(B + 1, 8, H, W)), ValueError, r"^prompt must have the batch"),
    ("Selective fractions", lambda: cplfast.SelectivePromptFeatureInteraction(8, 8, 2, fractions=(0.5, 1.5)), ValueError, r"fractions\[1\]"),
    ("Selective fractions too small", lambda: cplfast.SelectivePromptFeatureInteraction(8, 8, 2, fractions=(0.1,)), ValueError, r"fractions\[0\]"),
    ("Prototype x channels", lambda: cplfast.DegradationPrototypeAssignment(10)(torch.randn(B, 3, H, W)), ValueError, r"^x must have shape"),
    ("Prototype labels range", lambda: cplfast.DegradationPrototypeAssignment(10)(X, torch.tensor([0, 5])), ValueError, r"^labels must be class indices"),
    ("Prototype labels dtype", lambda: cplfast.DegradationPrototypeAssignment(10)(X, torch.tensor([True, False])), TypeError, r"^labels"),
    ("Prototype temperature", lambda: cplfast.DegradationPrototypeAssignment(10, temperature=-1.0), ValueError, r"temperature"),
    ("Distribution assignment width", lambda: cplfast.PromptDistribution(4, 3, 6)(torch.rand(2, 5)), ValueError, r"^assignment must have shape"),
    ("Distribution assignment rank", lambda: cplfast.PromptDistribution(4, 3, 6)(torch.rand(4)), ValueError, r"^assignment must have 2"),
    ("Distribution num_tokens", lambda: cplfast.PromptDistribution(4, 0, 6), ValueError, r"num_tokens"),
    ("CrossFusion tokens dim", lambda: cplfast.PromptCrossFusion(10, 2)(X, torch.randn(B, 3, 9)), ValueError, r"^tokens must have shape"),
    ("CrossFusion tokens batch", lambda: cplfast.PromptCrossFusion(10, 2)(X, torch.randn(B + 1, 3, 10)), ValueError, r"^tokens must have shape"),
    ("CrossFusion too many tokens", lambda: cplfast.PromptCrossFusion(10, 2)(X, torch.randn(B, 65, 10)), ValueError, r"^tokens must hold between 1 and 64"),
    ("CrossFusion heads", lambda: cplfast.PromptCrossFusion(10, 3), ValueError, r"dim=10 .*heads=3"),
    ("CPR negatives rank", lambda: cplfast.ContrastivePromptLoss()(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)), ValueError, r"^negatives must have 5"),
    ("CPR negatives shape", lambda: cplfast.ContrastivePromptLoss()(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), torch.rand(2, 2, 3, 8, 8)), ValueError, r"^negatives must have shape"),
    ("CPR target shape", lambda: cplfast.ContrastivePromptLoss()(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9), torch.rand(2, 1, 3, 8, 8)), ValueError, r"^target must have shape"),
    ("CPR no negatives", lambda: cplfast.ContrastivePromptLoss()(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), torch.rand(0, 1, 3, 8, 8)), ValueError, r"^negatives must not be empty"),
    ("CPR features", lambda: cplfast.ContrastivePromptLoss(features="resnet"), ValueError, r"^features must be"),
    ("CPR temperature", lambda: cplfast.ContrastivePromptLoss(temperature=0.0), ValueError, r"^temperature"),
    ("CPR level_weights", lambda: cplfast.ContrastivePromptLoss(level_weights=[1.0])(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), torch.rand(1, 1, 3, 8, 8)), ValueError, r"^level_weights has 1"),
    ("SupCon labels dtype", lambda: cplfast.SupConLoss()(torch.randn(4, 3), torch.rand(4)), TypeError, r"^labels must be an integer"),
    ("SupCon z rank", lambda: cplfast.SupConLoss()(torch.randn(4), torch.arange(4)), ValueError, r"^z must have 2"),
    ("SupCon reduction", lambda: cplfast.SupConLoss(reduction="max"), ValueError, r"^reduction"),
]


@pytest.mark.parametrize("call,error,pattern", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_layers_reject_bad_input(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_every_layer_is_exported():
    names = ["PromptGenBlock", "SparsePromptModule", "PromptInPrompt", "SelectivePromptFeatureInteraction",
             "DegradationPrototypeAssignment", "PromptDistribution", "PromptCrossFusion",
             "ContrastivePromptLoss", "SupConLoss"]
    for name in names:
        assert issubclass(getattr(cplfast, name), torch.nn.Module)
        assert name in cplfast.__all__


# ----------------------------------------------------------------------------------------------------
# The layers through the Triton kernels (the interpreter on CPU): the views they pass (expanded queries,
# channel chunks, transposed heads) must give the reference's values and gradients.

LAYER_CASES = {
    "PromptInPrompt": (lambda: make_pip(), lambda m, x: m(x)),
    "SelectivePromptFeatureInteraction": (
        lambda: cplfast.SelectivePromptFeatureInteraction(10, 8, 2),
        lambda m, x: m(x, x[:, :8].flip(1) * 0.5),
    ),
    "PromptCrossFusion": (lambda: cplfast.PromptCrossFusion(10, 2), lambda m, x: m(x, x.mean(dim=3)[:, :, :5].transpose(1, 2))),
    "SparsePromptModule": (lambda: cplfast.SparsePromptModule(4, 5, 3, 10, top_k=2), lambda m, x: m(x)),
}


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_layers_give_the_same_result_through_the_triton_kernels(name, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    make, call = LAYER_CASES[name]
    layer = make()
    x = torch.randn(B, 10, H, W)
    results = {}
    for backend in ("reference", "triton"):
        layer.zero_grad()
        xb = x.clone().requires_grad_()
        with cplfast.use_backend(backend):
            out = call(layer, xb)
            out.backward(torch.ones_like(out) + torch.arange(out.numel()).view_as(out) % 3)
        results[backend] = [out.detach(), xb.grad, *(p.grad.clone() for p in layer.parameters())]
    for ref, tri in zip(results["reference"], results["triton"]):
        torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Negative routing: exact contract (SparsePromptModule.negative_routing docstring), k = 1 and k = 2,
# ordered and random. Random keys are fixed by replacing torch.rand, so the slot assignment is pinned.


def _spm(n, k):
    return cplfast.SparsePromptModule(prompt_dim=2, prompt_len=n, prompt_size=2, lin_dim=3, top_k=k)


def _neg(entries, n, batch=2):
    """A (B, N) routing with ``entries`` = [(row, index, value), ...]."""
    out = torch.zeros(batch, n)
    for row, index, value in entries:
        out[row, index] = value
    return out


def _fixed_rand(monkeypatch, keys, calls):
    real = torch.rand

    def fake(*size, generator=None, device=None, **kw):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        calls.append((shape, generator))
        assert shape == tuple(keys.shape)
        return keys.clone()

    monkeypatch.setattr(torch, "rand", fake)
    return real


def test_negative_routing_contract_top1_ordered():
    spm = _spm(5, 1)
    routing = _neg([(0, 2, 0.7), (1, 0, 0.4)], 5)  # row 0 kept prompt 2, row 1 kept prompt 0
    neg = spm.negative_routing(routing, 4, mode="ordered")
    # unselected in index order: row 0 -> 0, 1, 3, 4; row 1 -> 1, 2, 3, 4
    for j, (u0, u1) in enumerate([(0, 1), (1, 2), (3, 3), (4, 4)]):
        torch.testing.assert_close(neg[j], _neg([(0, u0, 0.7), (1, u1, 0.4)], 5), rtol=0, atol=0)


def test_negative_routing_contract_top1_random(monkeypatch):
    spm = _spm(5, 1)
    routing = _neg([(0, 2, 0.7), (1, 0, 0.4)], 5)
    calls = []
    _fixed_rand(monkeypatch, torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.4, 0.6]]), calls)
    g = torch.Generator().manual_seed(3)
    neg = spm.negative_routing(routing, 3, generator=g)  # random is the default mode
    assert calls == [((2, 4), g)]  # one key per unselected prompt and image, from the given generator
    # row 0: unselected [0, 1, 3, 4] sorted by keys [0.9, 0.1, 0.5, 0.3] -> [1, 4, 3, 0]
    # row 1: unselected [1, 2, 3, 4] sorted by keys [0.2, 0.8, 0.4, 0.6] -> [1, 3, 4, 2]
    for j, (u0, u1) in enumerate([(1, 1), (4, 3), (3, 4)]):
        torch.testing.assert_close(neg[j], _neg([(0, u0, 0.7), (1, u1, 0.4)], 5), rtol=0, atol=0)


def test_negative_routing_contract_top2_ordered():
    spm = _spm(6, 2)
    # row 0 keeps 2 (0.5) then 0 (0.3); row 1 keeps 5 (0.6) then 1 (0.2)
    routing = _neg([(0, 0, 0.3), (0, 2, 0.5), (1, 1, 0.2), (1, 5, 0.6)], 6)
    neg = spm.negative_routing(routing, 2, mode="ordered")
    # unselected: row 0 -> 1, 3, 4, 5; row 1 -> 0, 2, 3, 4; the largest kept weight goes first
    want0 = _neg([(0, 1, 0.5), (0, 3, 0.3), (1, 0, 0.6), (1, 2, 0.2)], 6)
    want1 = _neg([(0, 4, 0.5), (0, 5, 0.3), (1, 3, 0.6), (1, 4, 0.2)], 6)
    torch.testing.assert_close(neg, torch.stack([want0, want1]), rtol=0, atol=0)


def test_negative_routing_contract_top2_random(monkeypatch):
    spm = _spm(6, 2)
    routing = _neg([(0, 0, 0.3), (0, 2, 0.5), (1, 1, 0.2), (1, 5, 0.6)], 6)
    calls = []
    _fixed_rand(monkeypatch, torch.tensor([[0.4, 0.1, 0.3, 0.2], [0.9, 0.8, 0.7, 0.6]]), calls)
    neg = spm.negative_routing(routing, 2, mode="random")
    assert calls == [((2, 4), None)]
    # row 0: [1, 3, 4, 5] by keys [0.4, 0.1, 0.3, 0.2] -> [3, 5, 4, 1]; row 1: [0, 2, 3, 4] -> [4, 3, 2, 0]
    want0 = _neg([(0, 3, 0.5), (0, 5, 0.3), (1, 4, 0.6), (1, 3, 0.2)], 6)
    want1 = _neg([(0, 4, 0.5), (0, 1, 0.3), (1, 2, 0.6), (1, 0, 0.2)], 6)
    torch.testing.assert_close(neg, torch.stack([want0, want1]), rtol=0, atol=0)


def test_negative_routing_ties_keep_lower_index_first():
    spm = _spm(5, 2)
    routing = torch.tensor([[0.0, 0.25, 0.0, 0.25, 0.1]])  # top-2 of a dense row with an exact tie
    neg = spm.negative_routing(routing, 1, mode="ordered")
    # kept: 1 then 3 (tie, lower index first); unselected in index order: 0, 2, 4 -> 0.25 on 0 and on 2
    torch.testing.assert_close(neg[0], _neg([(0, 0, 0.25), (0, 2, 0.25)], 5, batch=1), rtol=0, atol=0)


def test_negative_routing_random_is_reproducible_and_covers_every_unselected_prompt():
    spm = _spm(5, 1)
    routing = _neg([(0, 4, 0.9), (1, 4, 0.8)], 5)
    draws = [spm.negative_routing(routing, 1, generator=torch.Generator().manual_seed(s)) for s in range(40)]
    again = [spm.negative_routing(routing, 1, generator=torch.Generator().manual_seed(s)) for s in range(40)]
    assert all(torch.equal(a, b) for a, b in zip(draws, again))
    used = torch.stack(draws)[:, 0].gt(0).any(dim=1).any(dim=0)  # (N,) over draws and images
    assert used.tolist() == [True, True, True, True, False]
    with pytest.raises(ValueError, match="mode"):
        spm.negative_routing(routing, 1, mode="shuffled")


# ----------------------------------------------------------------------------------------------------
# Extensions against routing collapse (not in CPL): load balancing, noisy top-k gating


def test_load_balance_loss_values():
    from cplfast.layers.prompt_gen import load_balance_loss

    uniform = torch.full((4, 4), 0.25)
    routing = torch.eye(4) * 0.25  # each image keeps a different prompt
    torch.testing.assert_close(load_balance_loss(uniform, routing, 1), torch.tensor(1.0))
    collapsed = torch.tensor([[0.0, 0.0, 1.0, 0.0]]).expand(4, 4)
    torch.testing.assert_close(load_balance_loss(collapsed, collapsed, 1), torch.tensor(4.0))
    # N * sum_n f_n P_n with f = (1/2, 1/2, 0, 0), P = (0.3, 0.2, 0.4, 0.1)
    probs = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.1, 0.3, 0.5, 0.1]])
    routing = torch.tensor([[0.5, 0, 0, 0], [0, 0.3, 0, 0]])
    torch.testing.assert_close(load_balance_loss(probs, routing, 1), torch.tensor(4 * (0.5 * 0.3 + 0.5 * 0.2)))


def test_spm_load_balance_and_gate_noise():
    torch.manual_seed(0)
    spm = cplfast.SparsePromptModule(4, 5, 3, 10, top_k=1, load_balance=True).train()
    x = torch.randn(B, 10, H, W)
    spm(x)
    assert set(spm.last_aux) == {"load_balance"}
    spm.last_aux["load_balance"].backward()
    assert spm.linear_layer.weight.grad.abs().sum() > 0
    plain = cplfast.SparsePromptModule(4, 5, 3, 10, top_k=1)
    plain.load_state_dict(spm.state_dict())
    torch.testing.assert_close(spm(x), plain(x))  # the loss changes nothing in the forward
    spm.eval()
    spm(x)
    assert spm.last_aux == {}
    noisy = cplfast.SparsePromptModule(4, 5, 3, 10, top_k=2, gate_noise=50.0)
    noisy.load_state_dict(plain.state_dict())
    plain.top_k = 2
    noisy.eval()
    torch.testing.assert_close(noisy(x), plain(x))  # eval: no noise, same as the fused path
    noisy.train()
    routes = {tuple(torch.nonzero(noisy.last_routing[0]).flatten().tolist()) for _ in range(20) if noisy(x) is not None}
    assert len(routes) > 1  # the noise changes which prompts are kept
    assert all(len(r) == 2 for r in routes)
    noisy.zero_grad()
    noisy(x).sum().backward()
    assert noisy.linear_layer.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="gate_noise"):
        cplfast.SparsePromptModule(4, 5, 3, 10, gate_noise=-1.0)


# ----------------------------------------------------------------------------------------------------
# DPPD's open choices: contract tests with small hard-coded cases


def test_dppd_predefined_prototypes_are_fixed_orthonormal():
    m = cplfast.DegradationPrototypeAssignment(6, embed_dim=4, num_degradations=3)  # predefined by default
    assert m.prototype_mode == "predefined"
    assert "prototypes" not in dict(m.named_parameters()) and "prototypes" in m.state_dict()
    assert not m.prototypes.requires_grad
    torch.testing.assert_close(m.prototypes, torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
    torch.testing.assert_close(m.prototypes @ m.prototypes.T, torch.eye(3), rtol=0, atol=0)
    # e = (0, 2, 0, 0) is prototype 1's direction: cos = (0, 1, 0), a = softmax(cos / 0.1)
    with torch.no_grad():
        for layer in (m.mlp[0], m.mlp[2]):
            layer.weight.zero_()
            layer.bias.zero_()
        m.mlp[2].bias.copy_(torch.tensor([0.0, 2.0, 0.0, 0.0]))
    a = m(torch.randn(2, 6, 3, 3))
    torch.testing.assert_close(a, torch.softmax(torch.tensor([[0.0, 10.0, 0.0]]), dim=1).expand(2, 3))
    with pytest.raises(ValueError, match="predefined"):
        cplfast.DegradationPrototypeAssignment(6, embed_dim=2, num_degradations=3)
    with pytest.raises(ValueError, match="prototypes"):
        cplfast.DegradationPrototypeAssignment(6, prototypes="fixed")


def _dppd_distribution(sampling):
    m = cplfast.PromptDistribution(3, 1, 2, sampling=sampling)
    with torch.no_grad():
        m.mu.copy_(torch.tensor([[[1.0, 2.0]], [[10.0, 20.0]], [[100.0, 200.0]]]))
        m.log_var.copy_(torch.log(torch.tensor([[[1.0, 4.0]], [[9.0, 16.0]], [[25.0, 36.0]]])))  # sigma 1..6
    return m


ASSIGNMENT = torch.tensor([[0.2, 0.7, 0.1], [0.5, 0.2, 0.3]])


def test_dppd_assigned_sampling_uses_the_argmax_prototype_gaussian():
    m = _dppd_distribution("assigned").train()
    torch.manual_seed(5)
    eps = torch.randn(2, 2)
    torch.manual_seed(5)
    tokens = m(ASSIGNMENT)
    # image 0 -> prototype 1 (mu 10, 20; sigma 3, 4); image 1 -> prototype 0 (mu 1, 2; sigma 1, 2)
    want = torch.tensor([[10.0 + 3 * eps[0, 0], 20.0 + 4 * eps[0, 1]], [1.0 + 1 * eps[1, 0], 2.0 + 2 * eps[1, 1]]])
    torch.testing.assert_close(tokens, want.view(2, 1, 2))
    m.eval()
    torch.testing.assert_close(m(ASSIGNMENT), torch.tensor([[[10.0, 20.0]], [[1.0, 2.0]]]), rtol=0, atol=0)
    torch.testing.assert_close(m(ASSIGNMENT), m(ASSIGNMENT), rtol=0, atol=0)  # eval is deterministic
    # reparameterised: gradients reach mu, log_var of the assigned prototypes and (straight through) a
    m.train()
    a = ASSIGNMENT.clone().requires_grad_()
    m(a).sum().backward()
    assert m.mu.grad[2].abs().sum() == 0 and m.mu.grad[:2].abs().sum() > 0
    assert m.log_var.grad[:2].abs().sum() > 0 and a.grad.abs().sum() > 0


def test_dppd_mixture_sampling_mixes_every_gaussian():
    m = _dppd_distribution("mixture").train()
    torch.manual_seed(5)
    eps = torch.randn(2, 2)
    torch.manual_seed(5)
    tokens = m(ASSIGNMENT)
    mu = torch.tensor([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]])
    sigma = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    want = ASSIGNMENT @ mu + (ASSIGNMENT @ sigma) * eps  # sum_t a_t (mu_t + sigma_t eps), one eps per image
    torch.testing.assert_close(tokens, want.view(2, 1, 2))
    m.eval()
    torch.testing.assert_close(m(ASSIGNMENT), (ASSIGNMENT @ mu).view(2, 1, 2))
    with pytest.raises(ValueError, match="sampling"):
        cplfast.PromptDistribution(3, 1, 2, sampling="argmax")
