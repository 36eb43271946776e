"""The study runner: equal-budget runs, exact resume, statistics, verdicts and the report."""

import json
import math

import pytest
import torch

from cplfast.study import (
    VARIANTS, StudyConfig, markdown, run_dir, run_study, summarise, t_interval, train_one, variant_config, verdict,
    write_report,
)
from cplfast.train import Trainer

TINY = dict(steps=4, eval_every=2, eval_crops_per_image=1, overrides={"patch": 16, "batch": 5, "log_every": 1})


def test_every_variant_builds_a_valid_config_with_the_shared_recipe():
    configs = {v: variant_config(v, steps=10, seed=1) for v in VARIANTS}
    shared = {"preset", "patch", "batch", "lr", "steps", "seed", "ema", "zero_init_output"}
    for field in shared:
        assert len({getattr(c, field) for c in configs.values()}) == 1, field
    assert configs["cpl-spm"].num_negatives == 0 and configs["cpl"].num_negatives > 0
    assert configs["cpl-cpr"].prompt == "promptir" and configs["cpl-cpr"].cpr_negatives == "batch"
    assert configs["cpl-balanced"].load_balance > 0 and configs["cpl"].load_balance == 0
    with pytest.raises(ValueError, match="unknown study variant"):
        variant_config("nope")
    with pytest.raises(ValueError, match="unknown variants"):
        StudyConfig(variants=("promptir", "nope")).validate()
    with pytest.raises(ValueError, match="seeds"):
        StudyConfig(seeds=(0, 0)).validate()


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    torch.set_num_threads(1)
    config = StudyConfig(variants=("cpl-cpr",), seeds=(0,), **TINY).validate()
    full = train_one(tmp_path / "full", "cpl-cpr", 0, config)
    assert [p["step"] for p in full["curve"]] == [2, 4] and full["steps"] == 4
    assert full["rgb"]["mean"]["psnr_out"] == full["curve"][-1]["psnr"]
    # an interrupted run: trained to step 2 by hand, then the study takes over
    part = run_dir(tmp_path / "part", "cpl-cpr", 0)
    Trainer(variant_config("cpl-cpr", **config.train_overrides(0)), part, progress=False).fit(until=2)
    resumed = train_one(tmp_path / "part", "cpl-cpr", 0, config)
    assert resumed["rgb"] == full["rgb"] and resumed["y"] == full["y"]
    assert train_one(tmp_path / "part", "cpl-cpr", 0, config) == resumed  # finished runs are kept


def test_run_study_pairs_seeds_refuses_other_settings_and_writes_the_report(tmp_path):
    torch.set_num_threads(1)
    config = StudyConfig(variants=("promptir", "cpl"), seeds=(0, 1), **TINY)
    finals = run_study(config, tmp_path, progress=False)
    assert [(f["variant"], f["seed"]) for f in finals] == [("promptir", 0), ("cpl", 0), ("promptir", 1), ("cpl", 1)]
    with pytest.raises(ValueError, match="other settings"):
        run_study(StudyConfig(variants=("promptir", "cpl"), seeds=(0, 1), **{**TINY, "steps": 6}), tmp_path,
                  progress=False)
    written = write_report(tmp_path, finals, config=config.to_json())
    assert {p.name for p in written} >= {"results.json", "results.md", "curves.png", "tasks.png", "routing_cpl.png"}
    saved = json.loads((tmp_path / "results.json").read_text())
    claim = saved["summary"]["claims"][0]
    assert claim["variant"] == "cpl" and claim["seeds"] == [0, 1]
    diffs = [f["rgb"]["mean"]["psnr_out"] for f in finals if f["variant"] == "cpl"]
    base = [f["rgb"]["mean"]["psnr_out"] for f in finals if f["variant"] == "promptir"]
    assert claim["diff_db"] == pytest.approx(sum(a - b for a, b in zip(diffs, base)) / 2)
    assert "| CPL (SPM + CPR) beats PromptIR |" in (tmp_path / "results.md").read_text()
    assert set(saved["summary"]["variants"]["cpl"]["routing"]) == {"prompt1", "prompt2", "prompt3"}


def test_t_interval_and_verdicts():
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t_{0.975, 2} · sd / √n
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert verdict(0.1, 0.5) == "reproduced"
    assert verdict(-0.5, -0.1) == "not at this scale"
    assert verdict(-0.1, 0.5) == "inconclusive"
    assert verdict(float("nan"), float("nan")) == "inconclusive"


def _final(variant, seed, psnr):
    task = {"task": "noise", "count": 1, "psnr_in": 20.0, "psnr_out": psnr, "ssim_in": 0.5, "ssim_out": 0.6}
    scores = {"mean": {**task, "task": "mean"}, "tasks": [task]}
    return {"variant": variant, "seed": seed, "train_seconds": 1.0, "parameters": 10, "rgb": scores, "y": scores,
            "routing_health": {}, "selection": {}, "curve": [{"step": 1, "psnr": psnr}]}


def test_summary_verdicts_follow_the_paired_intervals():
    finals = [_final("promptir", s, 25.0 + s) for s in range(3)]
    finals += [_final("cpl", s, 25.5 + s + 0.01 * s) for s in range(3)]  # +0.5 dB on every seed
    finals += [_final("dppd", s, 25.0 + s + (0.3, -0.3, 0.05)[s]) for s in range(3)]  # noise around 0
    finals += [_final("pip", s, 24.0 + s) for s in range(3)]  # -1 dB on every seed
    claims = {c["variant"]: c for c in summarise(finals)["claims"]}
    assert claims["cpl"]["verdict"] == "reproduced" and claims["cpl"]["diff_db"] == pytest.approx(0.51)
    assert claims["dppd"]["verdict"] == "inconclusive"
    assert claims["pip"]["verdict"] == "not at this scale"
    assert claims["cpl"]["ssim_verdict"] == "inconclusive"  # the SSIM of these finals is the same for all
    text = markdown(summarise(finals))
    assert "**reproduced**" in text and "**not at this scale**" in text


def test_cli_seeds_and_report_only_errors(tmp_path, capsys):
    from cplfast.cli import main

    assert main(["study", "--out", str(tmp_path), "--report-only"]) != 0
    assert "no finished runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["study", "--seeds", "zero"])
