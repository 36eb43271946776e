"""Data-parallel training: two gloo processes must train the same weights as one process on the global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cplfast import checkpoint as ckpt
from cplfast.train import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from _gloo import free_port, init_gloo  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

# Tiny runs: 16x16 patches, global batch 4, CPR with one negative, EMA on.
FAST = dict(preset="tiny", patch=16, batch=4, save_every=0, lr=1e-3, tasks=("noise", "haze"), num_negatives=1,
            ema=0.9, device="cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train_rank(rank: int, world: int, port: int, config: TrainConfig, out: str, until: int | None,
                resume: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    try:
        trainer = Trainer.resume(out, progress=False) if resume else Trainer(config, out, progress=False)
        assert trainer.micro_batch == config.batch // (world * config.grad_accum)
        trainer.fit(until=until)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _train_two_ranks(config: TrainConfig, out: Path, *, until: int | None = None, resume: bool = False) -> None:
    mp.start_processes(_train_rank, args=(2, free_port(), config, str(out), until, resume), nprocs=2,
                       start_method="spawn")


def _state(folder: Path) -> dict[str, torch.Tensor]:
    tensors, _ = ckpt.load_tensors(folder / ckpt.STATE_FILE)
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema.", "optim."))}


def _assert_same_training(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to float rounding: the global batch is reduced in a different order."""
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert any(k.startswith("optim.") for k in a) and any(k.startswith("ema.") for k in a)


def _single(config: TrainConfig, out: Path) -> Trainer:
    trainer = Trainer(config, out, progress=False)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("extra", [dict(), dict(grad_accum=2, cpr_batch_negatives=True)], ids=["plain", "accum-batchneg"])
def test_two_processes_train_like_one_process_on_the_global_batch(tmp_path, extra):
    config = TrainConfig(**FAST, **extra, steps=3, seed=int(torch.randint(0, 99, ())))
    _train_two_ranks(config, tmp_path / "ddp")
    # Rank r's micro-batch j holds window item 2j + r, so micro-batch j of both ranks together is micro-batch j
    # of one process with the same grad_accum: the same images meet as batch negatives.
    reference = config
    single = _single(reference, tmp_path / "single")
    assert single.step == 3
    ddp_state = _state(tmp_path / "ddp")
    _assert_same_training(ddp_state, _state(tmp_path / "single"))
    fresh = Trainer(config, tmp_path / "fresh", progress=False)
    assert not all(torch.equal(v, ddp_state[f"model.{k}"]) for k, v in fresh.model.state_dict().items())


def test_batch_negatives_span_the_ranks(tmp_path):
    """With one image per rank, batch negatives exist only across ranks: the run must differ from no batch negatives."""
    config = TrainConfig(**{**FAST, "batch": 2}, steps=2, cpr_batch_negatives=True)
    _train_two_ranks(config, tmp_path / "ddp")
    single = _single(config, tmp_path / "single")  # one process, both images in one batch
    _assert_same_training(_state(tmp_path / "ddp"), _state(tmp_path / "single"))
    plain = _single(TrainConfig(**{**FAST, "batch": 2}, steps=2), tmp_path / "plain")
    assert single.last_loss != pytest.approx(plain.last_loss, rel=1e-6)


def test_resume_restores_every_rank_and_may_change_the_process_count(tmp_path):
    config = TrainConfig(**FAST, steps=4)
    _train_two_ranks(config, tmp_path / "ddp", until=2)
    tensors, meta = ckpt.load_tensors(tmp_path / "ddp" / ckpt.STATE_FILE)
    assert meta["step"] == 2 and meta["world_size"] == 2
    assert "rng.torch" in tensors and "rng.torch.rank1" in tensors
    assert not torch.equal(tensors["rng.torch"], tensors["rng.torch.rank1"])  # per-rank seeds
    _train_two_ranks(config, tmp_path / "ddp", resume=True)
    _single(config, tmp_path / "single")
    _assert_same_training(_state(tmp_path / "ddp"), _state(tmp_path / "single"))
    # a two-process run continues on one process, its global batch of 4 split into 2 micro-batches
    one = Trainer.resume(tmp_path / "ddp", out_dir=tmp_path / "one", steps=5, grad_accum=2, progress=False)
    assert one.step == 4 and one.micro_batch == 2
    one.fit()
    assert one.step == 5


def test_bad_distributed_settings_name_the_argument():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(batch=6, grad_accum=4).validate()
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0).validate()
    with pytest.raises(ValueError, match="num_negatives"):
        TrainConfig(cpr_batch_negatives=True, num_negatives=0).validate()
    with pytest.raises(ValueError, match="prompt"):
        TrainConfig(cpr_batch_negatives=True, prompt="pip").validate()


def test_grad_accumulation_equals_the_full_batch(tmp_path):
    config = TrainConfig(**FAST, steps=2)
    whole = _single(config, tmp_path / "whole")
    accum = _single(TrainConfig(**FAST, steps=2, grad_accum=2), tmp_path / "accum")
    assert accum.micro_batch == 2 and whole.micro_batch == 4
    _assert_same_training(_state(tmp_path / "whole"), _state(tmp_path / "accum"))


def test_torchrun_cli_writes_one_checkpoint_that_restore_loads(tmp_path):
    from PIL import Image

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
         "-m", "cplfast", "train", "--preset", "tiny", "--steps", "2", "--batch", "4", "--patch", "16",
         "--tasks", "noise,haze", "--negatives", "1", "--cpr-batch-negatives", "--out", str(run_dir), "--quiet"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 2 steps") == 1  # rank 0 alone reports
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([ckpt.CONFIG_FILE, ckpt.MODEL_FILE, ckpt.STATE_FILE,
                                                                "train_log.jsonl"])
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2]  # written once, by rank 0
    image = tmp_path / "in.png"
    Image.fromarray(torch.randint(0, 256, (40, 56, 3), dtype=torch.uint8).numpy()).save(image)
    restored = subprocess.run([sys.executable, "-m", "cplfast", "restore", str(image), "-o", str(tmp_path / "out.png"),
                               "--checkpoint", str(run_dir)], capture_output=True, text=True, env=env, timeout=300)
    assert restored.returncode == 0, restored.stderr[-2000:]
    assert Image.open(tmp_path / "out.png").size == (56, 40)


@pytest.mark.parametrize("prompt,negatives", [("cpl", 1), ("cpl", 0), ("promptir", 0), ("pip", 0), ("dppd", 0), ("none", 0)])
def test_every_trainable_parameter_gets_a_gradient_each_step(tmp_path, prompt, negatives):
    """What DDP without find_unused_parameters needs: no trainable parameter left out of a training step."""
    trainer = Trainer(TrainConfig(**{**FAST, "num_negatives": negatives, "ema": 0}, steps=1, prompt=prompt), tmp_path,
                      progress=False)
    batch = next(iter(trainer._batches(1)))
    loss, _ = trainer._loss(batch)
    loss.backward()
    missing = [name for name, p in trainer.model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_official_unused_layers_are_frozen():
    from cplfast.models import PromptIR

    model = PromptIR(prompt="promptir", preset="base")
    frozen = {name.split(".")[0] for name, p in model.named_parameters() if not p.requires_grad}
    assert len(frozen) == 6


def test_torchrun_resume_of_a_missing_run_fails_on_every_rank(tmp_path):
    """Rank 0 alone reads the run; its error must reach the other ranks instead of leaving them in a collective."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
         "-m", "cplfast", "train", "--resume", str(tmp_path / "missing"), "--quiet"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode != 0
    assert done.stderr.count("no training state to resume") == 2  # each rank reports the same cause
    assert "Connection closed by peer" not in done.stderr  # no rank was left waiting for rank 0
