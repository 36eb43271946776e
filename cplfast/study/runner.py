"""Train and evaluate every (variant, seed) of a study, resumably, in parallel worker processes.

Layout of a study folder ``out``::

    study.json                         the study's settings (a rerun must use the same ones)
    runs/<variant>/seed<s>/            one cplfast training run folder (checkpoint, train_log.jsonl, state)
    runs/<variant>/seed<s>/curve.jsonl validation after every ``eval_every`` steps: mean and per-task PSNR
    runs/<variant>/seed<s>/final.json  the finished run's scores (RGB and Y, PSNR and SSIM per task),
                                       routing health and chosen-prompt shares on the held-out set

Equal budget: every variant trains the same number of steps on the same data stream (for seed s, batch
i holds the same degraded crops for every variant: the datasets are index-addressed and seeded by s),
with the same optimiser, schedule and recipe (:mod:`cplfast.study.variants`). The CPR variants do more
compute per step (they restore the negatives too); the step budget, not the time, is equal.

Resume: a run with ``final.json`` is done; one with a training state continues from its last
evaluation point (``Trainer.resume``: bit-exact on the CPU), dropping curve points past it. A killed
study rerun with the same command finishes only what is missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .variants import BASELINE, VARIANTS, variant_config

STUDY_FORMAT = 1


@dataclass(frozen=True)
class StudyConfig:
    """What a study trains and how it scores (stored as ``study.json``)."""

    variants: tuple[str, ...] = tuple(VARIANTS)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 1000
    eval_every: int = 200
    data: str | None = None  # training data folder; None: the embedded photographs
    eval_data: str | None = None  # held-out data folder; None: held-out crops of the embedded photographs
    eval_crops_per_image: int = 8  # embedded held-out set: crops of 128² per photograph and task
    device: str = "cpu"
    threads: int = 1  # torch intra-op threads per worker
    overrides: dict[str, Any] = field(default_factory=dict)  # extra TrainConfig fields for every variant

    def validate(self) -> "StudyConfig":
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
        if not self.variants:
            raise ValueError("variants must not be empty")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ValueError(f"seeds must be distinct and not empty, got {self.seeds}")
        for name in ("steps", "eval_every", "eval_crops_per_image", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for variant in self.variants:  # every TrainConfig it will build is valid, before any training
            variant_config(variant, **self.train_overrides(self.seeds[0]))
        return self

    def train_overrides(self, seed: int) -> dict[str, Any]:
        return {**self.overrides, "steps": self.steps, "seed": seed, "data": self.data, "device": self.device}

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["variants"], out["seeds"] = list(self.variants), list(self.seeds)
        return {"format": STUDY_FORMAT, **out}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "StudyConfig":
        obj = {k: v for k, v in obj.items() if k != "format"}
        obj["variants"], obj["seeds"] = tuple(obj["variants"]), tuple(obj["seeds"])
        return cls(**obj)


def run_dir(out: str | os.PathLike, variant: str, seed: int) -> Path:
    return Path(out) / "runs" / variant / f"seed{seed}"


def eval_dataset(config: StudyConfig, tasks: Sequence[str]):
    """The held-out set every variant is scored on (the same items for all)."""
    from ..data import embedded_eval_dataset, folder_dataset

    if config.eval_data is None:
        return embedded_eval_dataset(tasks, crops_per_image=config.eval_crops_per_image)
    return folder_dataset(config.eval_data, patch=None, seed=1234, tasks=tasks)


def _read_curve(path: Path, up_to: int) -> list[dict]:
    if not path.exists():
        return []
    points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [p for p in points if p["step"] <= up_to]


def _write_curve(path: Path, points: list[dict]) -> None:
    from ..checkpoint import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(p) + "\n" for p in points).encode("utf-8"))


def _scores(result) -> dict[str, Any]:
    return {"mean": dataclasses.asdict(result.mean()), "tasks": [dataclasses.asdict(r) for r in result.rows]}


def train_one(out: str | os.PathLike, variant: str, seed: int, config: StudyConfig) -> dict[str, Any]:
    """Train (or finish) one run and score it; returns its ``final.json`` content."""
    import torch

    from ..checkpoint import atomic_write_json
    from ..evaluate import evaluate
    from ..train import Trainer, train_state_path

    torch.set_num_threads(config.threads)
    folder = run_dir(out, variant, seed)
    final_path = folder / "final.json"
    if final_path.exists():
        return json.loads(final_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if train_state_path(folder).exists():
        trainer = Trainer.resume(folder, progress=False)
    else:
        trainer = Trainer(variant_config(variant, **config.train_overrides(seed)), folder, progress=False)
    dataset = eval_dataset(config, trainer.tasks)
    curve_path = folder / "curve.jsonl"
    curve = _read_curve(curve_path, trainer.step)
    rgb = None
    while trainer.step < config.steps:
        target = min(config.steps, (trainer.step // config.eval_every + 1) * config.eval_every)
        trainer.fit(until=target)
        rgb = evaluate(trainer.model_for_eval(), dataset, device=trainer.device)
        curve.append({"step": trainer.step, "psnr": rgb.mean().psnr_out, "train_loss": trainer.last_loss,
                      "elapsed_s": round(trainer.elapsed, 2), "tasks": {r.task: r.psnr_out for r in rgb.rows}})
        _write_curve(curve_path, curve)
    model = trainer.model_for_eval()
    if rgb is None:  # resumed after the last step: score the finished model
        rgb = evaluate(model, dataset, device=trainer.device, channel="rgb")
    y = evaluate(model, dataset, device=trainer.device, channel="y")
    final = {
        "variant": variant, "seed": seed, "steps": trainer.step, "train_seconds": round(trainer.elapsed, 2),
        "wall_seconds_this_session": round(time.perf_counter() - started, 2), "threads": config.threads,
        "parameters": sum(p.numel() for p in model.parameters()),
        "rgb": _scores(rgb), "y": _scores(y),
        "routing_health": rgb.routing_health(),
        "selection": {task: {k: [round(float(v), 5) for v in vec] for k, vec in keys.items()}
                      for task, keys in rgb.selection.items()},
        "curve": curve,
    }
    atomic_write_json(final_path, final, sort_keys=False)
    return final


def _worker(args) -> tuple[str, int, float]:
    out, variant, seed, config_json = args
    start = time.perf_counter()
    train_one(out, variant, seed, StudyConfig.from_json(config_json))
    return variant, seed, time.perf_counter() - start


def run_study(config: StudyConfig, out: str | os.PathLike, *, jobs: int = 1, progress: bool = True) -> list[dict]:
    """Train every missing (variant, seed) run of ``config`` into ``out`` with ``jobs`` processes.

    Runs are ordered seed by seed (every variant of seed 0 first), so a study stopped early still has
    complete, paired seeds. Returns every run's ``final.json`` content.
    """
    from ..checkpoint import atomic_write_json

    config = config.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stored = out / "study.json"
    if stored.exists():
        previous = StudyConfig.from_json(json.loads(stored.read_text()))
        if previous != config:
            raise ValueError(f"{out} holds a study with other settings ({stored}); use another --out or the same "
                             "settings to resume it")
    else:
        atomic_write_json(stored, config.to_json(), sort_keys=False)
    todo = [(str(out), v, s, config.to_json()) for s in config.seeds for v in config.variants
            if not (run_dir(out, v, s) / "final.json").exists()]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="study", unit="run", dynamic_ncols=True)
    if jobs <= 1:
        for item in todo:
            variant, seed, seconds = _worker(item)
            if bar is not None:
                bar.set_postfix_str(f"{variant} seed {seed}: {seconds:.0f} s")
                bar.update(1)
    elif todo:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_worker, item) for item in todo]
            for future in as_completed(futures):
                variant, seed, seconds = future.result()
                if bar is not None:
                    bar.set_postfix_str(f"{variant} seed {seed}: {seconds:.0f} s")
                    bar.update(1)
    if bar is not None:
        bar.close()
    return [json.loads((run_dir(out, v, s) / "final.json").read_text()) for s in config.seeds for v in config.variants]


__all__ = ["BASELINE", "StudyConfig", "eval_dataset", "run_dir", "run_study", "train_one"]
