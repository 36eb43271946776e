"""Training loop, schedule, EMA and checkpoints (cplfast.train, cplfast.checkpoint)."""

import dataclasses
import json
import math

import pytest
import torch

from cplfast import checkpoint as ckpt
from cplfast.train import EMA, TrainConfig, Trainer, inference_model, lr_at, schedule_progress

# Commands and deterministic runs change process-wide torch settings; the fixture puts them back.
pytestmark = pytest.mark.usefixtures("restore_torch_globals")


# Tiny runs: 16x16 patches, batch 2, a few steps.
FAST = dict(preset="tiny", patch=16, batch=2, save_every=0, lr=1e-3, tasks=("noise", "haze"))


def _weights(folder):
    tensors, _ = ckpt.load_tensors(folder / ckpt.STATE_FILE)
    return {k: v for k, v in tensors.items() if not k.startswith("rng.")}


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    config = TrainConfig(**FAST, steps=4, num_negatives=1, ema=0.9, deterministic=True, seed=int(torch.randint(0, 99, ())))
    full = Trainer(config, tmp_path / "full", progress=False)
    full.fit()
    part = Trainer(config, tmp_path / "part", progress=False)
    part.fit(until=2)
    assert part.step == 2
    resumed = Trainer.resume(tmp_path / "part", progress=False)
    assert resumed.step == 2
    resumed.fit()
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert set(a) == set(b)
    assert any(k.startswith("optim.") for k in a) and any(k.startswith("ema.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the run really trained: the weights moved away from a fresh model's
    fresh = Trainer(config, tmp_path / "fresh", progress=False)
    assert not all(torch.equal(v, a[f"model.{k}"]) for k, v in fresh.model.state_dict().items())


def test_saved_model_rebuilds_with_ema_weights(tmp_path):
    config = TrainConfig(**FAST, steps=2, num_negatives=0, ema=0.5, prompt="promptir")
    trainer = Trainer(config, tmp_path, progress=False)
    result = trainer.fit()
    model, saved = inference_model(tmp_path)
    assert saved["model"]["prompt"] == "promptir" and saved["tasks"] == ["noise", "haze"] and saved["weights"] == "ema"
    assert json.loads((tmp_path / ckpt.CONFIG_FILE).read_text())["step"] == 2
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, trainer.ema.shadow[k].to(v.dtype))
    x = torch.rand(1, 3, 24, 16)
    out, routing = model.restore(x)
    assert out.shape == x.shape and set(routing) == {"prompt1", "prompt2", "prompt3"}
    assert result.model_path == tmp_path / ckpt.MODEL_FILE


# dppd's auxiliary losses are off by default (the paper's figure shows none): turned on by their weights
@pytest.mark.parametrize("prompt,overrides", [("pip", {}),
                                              ("dppd", {"loss_weights": {"assignment_ce": 0.1, "kl": 1e-4}})])
def test_variants_train_with_their_aux_losses(tmp_path, prompt, overrides):
    trainer = Trainer(TrainConfig(**FAST, steps=1, prompt=prompt, ema=0, model_overrides=overrides), tmp_path,
                      progress=False)
    batch = next(iter(torch.utils.data.DataLoader(trainer.dataset, batch_size=2)))
    loss, parts = trainer._loss(batch)
    assert loss.requires_grad and math.isfinite(float(loss.detach()))
    assert len(parts) > 1  # l1 plus the variant's regularisers
    assert abs(float(loss.detach()) - sum(parts.values())) < 1e-4


def test_schedule_and_ema():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, warmup=0.1)
    assert lr_at(0.05, cfg) == pytest.approx(5e-4)
    assert lr_at(0.1, cfg) == pytest.approx(1e-3)
    assert lr_at(1.0, cfg) == pytest.approx(1e-5)
    values = [lr_at(p / 100, cfg) for p in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    d = min(0.9, 2 / 11)
    assert torch.allclose(ema.shadow["weight"], d * before["weight"] + (1 - d) * model.weight)


def test_time_budget_progress():
    plain = TrainConfig(steps=100)
    assert schedule_progress(50, 1e6, plain) == 0.5  # no budget: steps only
    cfg = TrainConfig(steps=1000, time_budget=10.0, min_steps=40, time_limit=15.0)
    assert schedule_progress(100, 5.0, cfg) == pytest.approx(0.5)  # fast machine: time decides
    assert schedule_progress(20, 6.0, cfg) == pytest.approx(0.5)  # slow: steps short of min_steps hold it back
    assert schedule_progress(20, 12.0, cfg) == pytest.approx(0.8)  # past the budget, the limit takes over
    assert schedule_progress(40, 12.0, cfg) == pytest.approx(1.0)
    assert schedule_progress(30, 15.0, cfg) == pytest.approx(1.0)  # but never past the limit
    assert schedule_progress(1000, 1.0, cfg) == 1.0
    with pytest.raises(ValueError, match="time_limit"):
        TrainConfig(time_budget=10.0, time_limit=5.0).validate()


def test_config_validation():
    with pytest.raises(ValueError, match="patch"):
        TrainConfig(patch=20).validate()
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0).validate()
    with pytest.raises(ValueError, match="ema"):
        TrainConfig(ema=1.0).validate()
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(warmup=1.5).validate()


def test_checkpoint_files_are_validated(tmp_path):
    ckpt.save_tensors(tmp_path / "x.safetensors", {"a": torch.rand(3)}, {"kind": "model"})
    with pytest.raises(ckpt.CheckpointError, match="model config"):
        ckpt.load_model_file(tmp_path / "x.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ckpt.CheckpointError, match="not a valid safetensors"):
        ckpt.load_tensors(tmp_path / "bad.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match="not a cplfast checkpoint"):
        ckpt.load_model_file(tmp_path / "foreign.safetensors")
    with pytest.raises(FileNotFoundError):
        ckpt.load_model_file(tmp_path / "missing.safetensors")
    # an atomic write leaves no temporary files behind
    ckpt.atomic_write_json(tmp_path / "c.json", {"k": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "c.json", "foreign.safetensors", "x.safetensors"]


def test_optimizer_state_roundtrip():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.rand(2, 4)).sum().backward()
    opt.step()
    tensors, meta = ckpt.flatten_optimizer_state(opt.state_dict())
    restored = ckpt.unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))
    opt2 = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1e-2)
    opt2.load_state_dict(restored)
    for s1, s2 in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        for key in s1:
            assert torch.equal(s1[key], s2[key])


def test_log_has_a_line_every_log_every_steps_and_resume_drops_lines_past_the_checkpoint(tmp_path):
    config = TrainConfig(**{**FAST, "save_every": 2}, steps=5, num_negatives=1, log_every=2)
    trainer = Trainer(config, tmp_path, progress=False)
    trainer.fit(until=5)
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]  # and the last step
    assert all({"loss", "l1", "cpr", "lr", "elapsed_s", "images_per_s"} <= set(r) for r in records)
    assert all(r["loss"] == pytest.approx(r["l1"] + r["cpr"], rel=1e-5) and r["images_per_s"] > 0 for r in records)
    # a crash after step 5 with the last checkpoint at step 4: the log must not keep step 5 twice
    tensors, meta = ckpt.load_tensors(tmp_path / ckpt.STATE_FILE)
    ckpt.save_tensors(tmp_path / ckpt.STATE_FILE, tensors, {**meta, "step": 4})
    resumed = Trainer.resume(tmp_path, progress=False)
    resumed.fit(until=4)  # nothing to train yet, but the log is cut back to the checkpoint
    assert [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()] == [2, 4]
    resumed.fit()
    assert [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()] == [2, 4, 5]


def _record_negatives(monkeypatch):
    """Every negative routing the model draws, in order."""
    from cplfast.layers import SparsePromptModule

    seen = []
    real = SparsePromptModule.negative_routing

    def spy(self, routing, num_negatives, **kw):
        out = real(self, routing, num_negatives, **kw)
        seen.append((kw.get("mode"), out.clone()))
        return out

    monkeypatch.setattr(SparsePromptModule, "negative_routing", spy)
    return seen


def test_resumed_run_draws_the_same_random_negatives(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    config = TrainConfig(**FAST, steps=4, num_negatives=2, ema=0, seed=3)
    assert config.cpr_negatives == "random"
    seen = _record_negatives(monkeypatch)
    Trainer(config, tmp_path / "full", progress=False).fit()
    full = list(seen)
    seen.clear()
    Trainer(config, tmp_path / "part", progress=False).fit(until=2)
    Trainer.resume(tmp_path / "part", progress=False).fit()
    assert len(full) == len(seen) == 4 * 3  # steps x prompt slots
    assert all(mode == "random" for mode, _ in full)
    for (_, a), (_, b) in zip(full, seen):
        assert torch.equal(a, b)
    # and they are random: not all the same prompt for a slot over the steps
    slot3 = torch.stack([n for _, n in full[2::3]])  # (steps, K, B, N)
    assert len({tuple(r.nonzero()[:, -1].tolist()) for r in slot3}) > 1


@pytest.mark.parametrize("negative_grad", [False, True])
def test_cpr_negatives_carry_no_graph_unless_asked(tmp_path, monkeypatch, negative_grad):
    """Default (official CPL): negatives restored without autograd, so CPR never trains a prompt to restore badly."""
    from cplfast.models import PromptIR

    seen = []
    original = PromptIR._negatives

    def spy(self, *args, **kwargs):
        negatives, routing = original(self, *args, **kwargs)
        seen.append(negatives.requires_grad)
        return negatives, routing

    monkeypatch.setattr(PromptIR, "_negatives", spy)
    config = TrainConfig(**FAST, steps=1, num_negatives=1, ema=0, cpr_negative_grad=negative_grad)
    trainer = Trainer(config, tmp_path, progress=False)
    assert trainer.cpr.detach_negatives is not negative_grad
    loss, parts = trainer._loss(next(iter(trainer._batches(1))))
    assert seen == [negative_grad] and "cpr" in parts
    loss.backward()  # the output still gets CPR's gradient either way
    assert TrainConfig().cpr_negative_grad is False


def test_cpr_on_dense_prompts_needs_batch_negatives(tmp_path):
    config = TrainConfig(**{**FAST, "prompt": "promptir"}, steps=2, num_negatives=1, ema=0, log_every=1,
                         cpr_negatives="batch")
    trainer = Trainer(config, tmp_path / "cpr", progress=False)
    assert trainer.cpr is not None
    trainer.fit()
    lines = [json.loads(line) for line in (tmp_path / "cpr" / "train_log.jsonl").read_text().splitlines()]
    assert all("cpr" in line and math.isfinite(line["cpr"]) for line in lines)
    # promptir with the default cpr_negatives trains without CPR, as before
    assert Trainer(TrainConfig(**{**FAST, "prompt": "promptir"}, num_negatives=2), tmp_path / "plain",
                   progress=False).cpr is None
    with pytest.raises(ValueError, match="needs prompt='promptir'"):
        TrainConfig(**FAST, cpr_negatives="batch").validate()
    with pytest.raises(ValueError, match="num_negatives must be <="):
        Trainer(dataclasses.replace(config, num_negatives=config.batch), tmp_path / "many", progress=False)


def test_cpr_options_and_routing_health_log(tmp_path, monkeypatch):
    seen = _record_negatives(monkeypatch)
    config = TrainConfig(**FAST, steps=2, num_negatives=1, ema=0, log_every=1, cpr_negatives="ordered",
                         cpr_form="l1-push", load_balance=0.01, gate_noise=0.1)
    trainer = Trainer(config, tmp_path, progress=False)
    assert trainer.cpr.form == "l1-push" and trainer.model.prompt1.gate_noise == 0.1
    assert trainer.model.loss_weights["load_balance"] == 0.01
    trainer.fit()
    assert {mode for mode, _ in seen} == {"ordered"}
    lines = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["cpr"] < 0  # the l1-push term is negative
    assert "prompt1.load_balance" in lines[0]
    health = lines[-1]["routing_health"]
    assert set(health) == {"prompt1", "prompt2", "prompt3"}
    for h in health.values():
        assert h["images"] == 2 and set(h["distribution"]) <= {"noise", "haze"}
        assert 0 <= h["mutual_information_bits"] <= 1.0 + 1e-9  # two tasks: at most 1 bit
    with pytest.raises(ValueError, match="cpr_negatives"):
        TrainConfig(cpr_negatives="first").validate()
    with pytest.raises(ValueError, match="cpr_form"):
        TrainConfig(cpr_form="ratio").validate()
    with pytest.raises(ValueError, match="prompt='cpl'"):
        TrainConfig(prompt="promptir", gate_noise=1.0).validate()
    with pytest.raises(ValueError, match="cpr_vgg_weights"):
        TrainConfig(cpr_vgg_weights="x.pth").validate()
    with pytest.raises(FileNotFoundError, match="VGG16 weights not found"):
        Trainer(TrainConfig(**FAST, steps=1, cpr_features="vgg16", cpr_vgg_weights=str(tmp_path / "no.pth")),
                tmp_path / "vgg", progress=False)
