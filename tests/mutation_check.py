"""Mutation check: does the test suite catch small, deliberate bugs in the kernels, references and layers?

Not a pytest module (pytest collects ``test_*.py`` only); run it by hand before every kernel change::

    python tests/mutation_check.py               # every mutant, one at a time
    python tests/mutation_check.py --list        # the mutants, with their test selections
    python tests/mutation_check.py --only 'sp_*' in_log1p_as_log --jobs 2

Each mutant is ``(file, exact original snippet, replacement, test selection, description)``. For every
mutant the working tree (tracked and untracked files that git does not ignore; no ``.git``, no ignored
artefacts) is copied to a temporary folder, the snippet is replaced there, and ``pytest -x -q -m "not slow"``
runs the mutant's test files (or node ids) in the copy under a per-mutant timeout. The copy is what gets
imported: ``PYTHONPATH`` points at it, and ``cplfast/kernels`` and ``cplfast/export`` are links to its
``kernels/`` and ``export/`` (the package-dir mapping of pyproject.toml), so Python's path finder resolves
``cplfast``, ``cplfast.kernels`` and ``cplfast.export`` there before the editable install's finder, which
comes last on ``sys.meta_path``. Child processes (gloo ranks, CLI calls) inherit the environment.

A mutant is caught when a test fails (a failure or an error during a test, not a timeout, not a
collection error). At the end the first failing test of every caught mutant is run once more on the
unmutated copy: it must pass there, so a mutant is never credited with a test that fails anyway.
A mutant whose snippet is not found exactly once in its file is *stale* (the list is maintained with
the code). Prints a table (mutant, tests run, caught, seconds), writes it as markdown (``--markdown``)
and exits 1 if any mutant survives, times out, is stale, or its catching test is not green without it.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_LINKS = {"cplfast/kernels": "../kernels", "cplfast/export": "../export"}  # pyproject's package-dir
PLUGIN = "_mutation_check_plugin"
# Loaded with -p in every run: a failing Hypothesis test is not shrunk (under the interpreter shrinking
# takes minutes) and no example database carries failures from one mutant's run into another's.
PLUGIN_SOURCE = """\
try:
    from hypothesis import Phase, settings
except ImportError:
    pass
else:
    settings.register_profile("mutation_check", database=None, phases=[Phase.explicit, Phase.generate])
    settings.load_profile("mutation_check")
"""


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # test files or node ids, relative to the repository root
    description: str
    keyword: str | None = None  # pytest -k expression narrowing the selection (keeps the check fast)
    timeout: float = 300.0

    @property
    def selection(self) -> list[str]:
        return list(self.tests) + (["-k", self.keyword] if self.keyword else [])


SP = "kernels/sparse_prompt.py"
TA = "kernels/token_attention.py"
CA = "kernels/channel_attention.py"
IN = "kernels/infonce.py"
SC = "kernels/supcon.py"
T_SP = "tests/test_sparse_prompt.py"
T_TA = "tests/test_prompt_token_attention.py"
T_CA = "tests/test_topm_channel_attention.py"
T_IN = "tests/test_infonce.py"
T_SC = "tests/test_supcon.py"
T_LAYERS = "tests/test_layers.py"
T_CPR = "tests/test_cpr.py"
T_PROTO = "tests/test_prototype_assignment.py"


def M(name, path, original, replacement, tests, description, **kw) -> Mutant:
    return Mutant(name, path, original, replacement, tuple([tests] if isinstance(tests, str) else tests),
                  description, **kw)


MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ sparse_prompt kernel
    M("sp_router_first_split_only", SP,
      "        for s in range(SPLIT):\n            emb += tl.load(part_ptr",
      "        for s in range(1):\n            emb += tl.load(part_ptr",
      T_SP, "router sums only the first spatial split's GAP partial", keyword="kernel_with_cuda_plan or forced_small_blocks"),
    M("sp_topk_tie_higher_index", SP,
      'rank = tl.where(select, n, BLOCK_N - n)',
      'rank = tl.where(select, BLOCK_N - n, BLOCK_N - n)',
      T_SP, "top-k (k <= N/2) breaks ties to the higher index", keyword="ties"),
    M("sp_topk_drop_tie_lower_index", SP,
      'rank = tl.where(select, n, BLOCK_N - n)',
      'rank = tl.where(select, n, n)',
      T_SP, "top-k (k > N/2) drops the lower index of tied smallest weights", keyword="ties"),
    M("sp_gap_mask_le", SP,
      "mask = c_ok[:, None] & (hw < HW)[None, :]",
      "mask = c_ok[:, None] & (hw <= HW)[None, :]",
      T_SP, "GAP mask off by one at the H*W tile edge (`<` -> `<=`)", keyword="kernel"),
    M("sp_gap_wrong_row_stride", SP,
      "offset = (hw // W).to(tl.int64) * sxh + (hw % W).to(tl.int64) * sxw",
      "offset = (hw // W).to(tl.int64) * (W * sxw) + (hw % W).to(tl.int64) * sxw",
      T_SP, "GAP of a non-foldable view steps rows by W*stride(W) instead of stride(H)", keyword="kernel"),
    M("sp_softmax_no_max", SP,
      "e = tl.where(n_ok, tl.exp(z - tl.max(z, axis=1)[:, None]), 0.0)",
      "e = tl.where(n_ok, tl.exp(z), 0.0)",
      T_SP, "router softmax without the max subtraction (overflows for large logits)", keyword="large_logits"),
    M("sp_fwd_renorm_dropped", SP,
      '        if RENORM:\n            w = tl.fdiv(w, tl.sum(w, axis=1)[:, None])',
      '        if RENORM:\n            w = w',
      T_SP, "forward forgets the renormalisation of the kept weights", keyword="kernel"),
    M("sp_bwd_renorm_term_dropped", SP,
      'dp = tl.where(keep, tl.fdiv(dw - tl.sum(dw * w, axis=1)[:, None], kept_mass[:, None]), 0.0)',
      'dp = tl.where(keep, tl.fdiv(dw, kept_mass[:, None]), 0.0)',
      T_SP, "renorm backward drops the `- sum(dw * w)` term", keyword="kernel"),
    M("sp_bwd_router_partials_first_block", SP,
      "for p0 in range(0, PARTS, BLOCK_P):",
      "for p0 in range(0, BLOCK_P, BLOCK_P):",
      T_SP, "router-grad reduces only the first block of dL/dw partials (drops the other splits')",
      keyword="forced_small_blocks or kernel_with_cuda_plan"),
    M("sp_bwd_dmix_reads_unwritten_slot", SP,
      "mask=(b < tl.where(j > 0, B, 0))[:, None]",
      "mask=(b < tl.where(j >= 0, B, 0))[:, None]",
      T_SP, "prompt-grad adds its dL/dw slot before the first channel wrote it", keyword="kernel"),
    M("sp_bwd_window_edge_le", SP,
      "ah = tl.where(oh < OH, _tap_weight(oh, ih, scale_h, SH), 0.0)",
      "ah = tl.where(oh <= OH, _tap_weight(oh, ih, scale_h, SH), 0.0)",
      T_SP, "transposed resize reads one output row past the edge (`<` -> `<=`)", keyword="kernel"),
    M("sp_bwd_no_temperature", SP,
      'dlogits = tl.where(bn_mask, tl.fdiv(p * (dp - tl.sum(p * dp, axis=1)[:, None]), temperature), 0.0)',
      'dlogits = tl.where(bn_mask, p * (dp - tl.sum(p * dp, axis=1)[:, None]), 0.0)',
      T_SP, "softmax backward forgets the 1/temperature", keyword="kernel"),
    # ------------------------------------------------------------------ prompt-token attention kernel
    M("ta_softmax_no_max", TA,
      "expd = tl.exp2((raw - tl.max(raw, axis=1)[:, None]) * qk_scale)",
      "expd = tl.exp2(raw * qk_scale)",
      T_TA, "softmax without the max subtraction (overflows for large logits)", keyword="large_logits"),
    M("ta_bwd_rowsum_dropped", TA,
      "return probs, probs * (dprobs - tl.sum(probs * dprobs, axis=1)[:, None])",
      "return probs, probs * dprobs",
      T_TA, "dS = P * dP: the `- rowsum(P * dP)` term dropped", keyword="triton"),
    M("ta_sum_partials_first_split", TA,
      "    for s in range(0, splits):\n        acc += tl.load(src + s * size",
      "    for s in range(0, 1):\n        acc += tl.load(src + s * size",
      T_TA, "dk/dv: only the first split's partial is summed", keyword="split_reductions or cuda_plans"),
    M("ta_padded_tokens_in_softmax", TA,
      "raw = tl.where(tok_ok[None, :], raw, float(\"-inf\"))",
      "raw = tl.where(tok_ok[None, :] | True, raw, float(\"-inf\"))",
      T_TA, "softmax counts the padded tokens past M (score 0) in its sum", keyword="triton"),
    M("ta_dk_chunk1_unscaled", TA,
      "_store_partial(ws, dk1 * scale, dv1,",
      "_store_partial(ws, dk1, dv1,",
      T_TA, "dk of the second head-dimension chunk misses the scale", keyword="triton"),
    M("ta_fwd_v_token_stride", TA,
      "v_rows = v_ptr + batch * sv_b + head * sv_h + tok * sv_m\n    o_rows",
      "v_rows = v_ptr + batch * sv_b + head * sv_h + tok * sv_d * D\n    o_rows",
      T_TA, "forward steps v's tokens by d*stride(d) instead of stride(M) (wrong for views)", keyword="fused_projections or non_contiguous"),
    # ------------------------------------------------------------------ top-m channel attention kernel
    M("ca_topm_count_le", CA,
      "kept = tl.where(ranks < COUNTS[j], expd, 0.0)\n        else:\n            kept = expd\n        w = _fraction_weight",
      "kept = tl.where(ranks <= COUNTS[j], expd, 0.0)\n        else:\n            kept = expd\n        w = _fraction_weight",
      T_CA, "forward top-m keeps m+1 entries (`ranks < m` -> `<=`)", keyword="triton"),
    M("ca_rank_tie_higher_index", CA,
      "beats = (other > this) | ((other == this) & (s[None, None, :] < this_col))",
      "beats = (other > this) | ((other == this) & (s[None, None, :] > this_col))",
      T_CA, "rank count breaks ties to the higher column", keyword="triton"),
    M("ca_eps_clamp_dropped", CA,
      "ghat = gram / tl.maximum(qnorm, 1e-12)[:, None] / tl.maximum(knorm, 1e-12)[None, :]",
      "ghat = gram / qnorm[:, None] / knorm[None, :]",
      T_CA, "normalisation without the eps clamp (a zero row gives NaN)", keyword="triton"),
    M("ca_softmax_no_max", CA,
      "expd = tl.exp(scores - tl.max(scores, axis=1)[:, None])  # the row max",
      "expd = tl.exp(scores)  # the row max",
      T_CA, "forward softmax without the max subtraction (overflows for large temperatures)", keyword="large_temperature or large_logits"),
    M("ca_gram_mask_le", CA,
      "        pix_ok = pix < L\n        a = tl.load(a_rows",
      "        pix_ok = pix <= L\n        a = tl.load(a_rows",
      T_CA, "Gram partials read one pixel past L at the last block (`<` -> `<=`)", keyword="triton"),
    M("ca_gram_first_split_only", CA,
      "    for s in range(0, n_splits):\n        part = (bh * n_splits + s) * C",
      "    for s in range(0, 1):\n        part = (bh * n_splits + s) * C",
      T_CA, "probs kernel reduces only the first split's Gram partial", keyword="triton"),
    M("ca_ak_first_row_block_only", CA,
      "for r in range(0, n_score_blocks):",
      "for r in range(0, 1):",
      T_CA, "a_k sums only the first row block's colsum partial", keyword="triton"),
    M("ca_dq_norm_term_dropped", CA,
      "dq -= aq[:, None] * q_rows",
      "dq -= 0.0 * q_rows",
      T_CA, "normalisation backward drops the `- a_q * q` term", keyword="triton"),
    M("ca_apply_v_channel_stride", CA,
      "v = tl.load(v_base + ks.to(tl.int64)[:, None] * sv_c,",
      "v = tl.load(v_base + ks.to(tl.int64)[:, None] * (L * sv_l),",
      T_CA, "P @ v steps v's channels by L*stride(L) instead of stride(c) (wrong for views)", keyword="triton"),
    # ------------------------------------------------------------------ InfoNCE kernel
    M("in_last_channel_chunk_only", IN,
      "        aa += tl.sum(a * a, axis=1)\n        pp += tl.sum(p * p, axis=1)\n        ap += tl.sum(a * p, axis=1)\n"
      "        an += tl.sum(a[None, :, :] * n, axis=2)\n        nn += tl.sum(n * n, axis=2)",
      "        aa = tl.sum(a * a, axis=1)\n        pp = tl.sum(p * p, axis=1)\n        ap = tl.sum(a * p, axis=1)\n"
      "        an = tl.sum(a[None, :, :] * n, axis=2)\n        nn = tl.sum(n * n, axis=2)",
      T_IN, "forward keeps only the last channel chunk's sums", keyword="kernel"),
    M("in_log1p_as_log", IN,
      "loss = (m - s_p) + _log1p(rest)",
      "loss = (m - s_p) + tl.log(1.0 + rest)",
      T_IN, "forward takes log(1 + x) instead of log1p (a near-zero loss rounds to 0)", keyword="kernel"),
    M("in_bwd_wp_minus_one_cancels", IN,
      "c_p = -g * (negative_mass / total) * inv_tau",
      "c_p = g * (e_p / total - 1.0) * inv_tau",
      T_IN, "backward forms w_p - 1 by subtraction (cancels for a well-separated positive)", keyword="kernel"),
    M("in_bwd_radial_term_dropped", IN,
      "da = a_from_p[:, None] * p + tl.sum(a_from_n[:, :, None] * n, axis=0) - a_self[:, None] * a",
      "da = a_from_p[:, None] * p + tl.sum(a_from_n[:, :, None] * n, axis=0)",
      T_IN, "anchor gradient drops the normalisation's radial term", keyword="kernel"),
    M("in_negatives_wrong_stride", IN,
      "n_ptr + off_n[:, :, None] + ch[None, None, :] * snc,\n            mask=k_ok",
      "n_ptr + off_n[:, :, None] + ch[None, None, :] * sac,\n            mask=k_ok",
      T_IN, "forward reads the negatives with the anchor's channel stride", keyword="kernel"),
    M("in_eps_clamp_dropped", IN,
      "scale_a = inv_tau / tl.maximum(norm_a, EPS)",
      "scale_a = inv_tau / norm_a",
      T_IN, "forward divides by the anchor norm without the eps clamp (a zero anchor gives NaN)", keyword="zero_vectors or kernel_matches"),
    # ------------------------------------------------------------------ SupCon kernel
    M("sc_self_not_excluded", SC,
      "live = col_ok[None, :] & (cols[None, :] != self_col[:, None])",
      "live = col_ok[None, :] & (self_col[:, None] >= 0)",
      T_SC, "forward does not exclude the query itself from the log-sum-exp and the positives", keyword="kernel"),
    M("sc_key_labels_without_stride", SC,
      "label_k = tl.load(yk_ptr + cols64 * syk, mask=col_ok, other=0)",
      "label_k = tl.load(yk_ptr + cols64, mask=col_ok, other=0)",
      T_SC, "forward reads the key labels without their stride", keyword="kernel"),
    M("sc_online_rescale_dropped", SC,
      "run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(",
      "run_sum = run_sum + tl.sum(",
      T_SC, "online log-sum-exp does not rescale the running sum when the max grows", keyword="kernel"),
    M("sc_bwd_column_term_dropped", SC,
      "grad_s += _pair_grad(s, live, pos, lse_c[None, :], npos_c[None, :], g_c[None, :])",
      "grad_s += 0.0",
      T_SC, "backward drops the column (key-side) term of the gradient", keyword="kernel"),
    # ------------------------------------------------------------------ references (the oracle)
    M("ref_sp_renorm_over_batch", "cplfast/reference/sparse_prompt.py",
      "w = w / w.sum(dim=1, keepdim=True)",
      "w = w / w.sum()",
      T_SP, "reference renormalises over the whole batch, not per image", keyword="reference"),
    M("ref_sp_topk_ascending", "cplfast/reference/sparse_prompt.py",
      "order = torch.sort(w, dim=1, descending=True, stable=True).indices[:, :k]",
      "order = (w.shape[1] - 1 - torch.sort(w.flip(1), dim=1, descending=True, stable=True).indices)[:, :k]",
      T_SP, "reference top-k keeps the higher index on ties", keyword="reference or topk"),
    M("ref_ta_default_scale", "cplfast/reference/token_attention.py",
      "scale = q.shape[-1] ** -0.5",
      "scale = q.shape[-2] ** -0.5",
      T_TA, "reference default scale from L instead of d", keyword="reference"),
    M("ref_infonce_negatives_wrong_axis", "cplfast/reference/infonce.py",
      "n = F.normalize(negatives, dim=dim + 1, eps=1e-12)",
      "n = F.normalize(negatives, dim=dim, eps=1e-12)",
      T_IN, "reference normalises the negatives along the wrong axis", keyword="reference"),
    M("ref_supcon_self_is_positive", "cplfast/reference/supcon.py",
      "pos = (labels[:, None] == key_labels[None, :]) & ~self_mask",
      "pos = labels[:, None] == key_labels[None, :]",
      T_SC, "reference counts a sample as its own positive", keyword="reference"),
    M("ref_ca_topm_off_by_one", "cplfast/reference/channel_attention.py",
      "masked = A.masked_fill(rank >= m, float(\"-inf\"))",
      "masked = A.masked_fill(rank > m, float(\"-inf\"))",
      T_CA, "reference top-m keeps m+1 entries", keyword="reference"),
    M("ref_prototype_temperature", "cplfast/reference/prototype.py",
      "return torch.softmax(cos / temperature, dim=1)",
      "return torch.softmax(cos * temperature, dim=1)",
      T_PROTO, "reference prototype assignment multiplies by the temperature"),
    # ------------------------------------------------------------------ layer contracts
    M("nr_unselected_by_weight", "cplfast/layers/prompt_gen.py",
      "unselected = order[:, k:].sort(dim=1).values",
      "unselected = order[:, k:]",
      T_LAYERS, "negative routing lists the unselected prompts by weight, not index", keyword="negative_routing"),
    M("nr_kept_weights_reversed", "cplfast/layers/prompt_gen.py",
      "kept_values = torch.gather(routing, 1, order[:, :k])",
      "kept_values = torch.gather(routing, 1, order[:, :k].flip(1))",
      T_LAYERS, "negative routing puts the kept weights on the slots in reverse order", keyword="negative_routing"),
    M("nr_overlapping_slots", "cplfast/layers/prompt_gen.py",
      "targets = unselected[:, j * k: (j + 1) * k]",
      "targets = unselected[:, j: j + k]",
      T_LAYERS, "negative j starts at unselected slot j instead of j*k (negatives overlap for k > 1)",
      keyword="negative_routing"),
    M("nr_random_shared_across_images", "cplfast/layers/prompt_gen.py",
      "keys = torch.rand(unselected.shape, device=routing.device, generator=generator)",
      "keys = torch.rand(unselected.shape[1:], device=routing.device, generator=generator).expand_as(unselected)",
      T_LAYERS, "random negatives: one permutation shared by every image", keyword="negative_routing"),
    M("pip_sum_over_t", "cplfast/layers/pip.py",
      "degradation_prompt = (weights @ self.degradation_prompts) / self.num_degradations",
      "degradation_prompt = weights @ self.degradation_prompts",
      T_LAYERS, "PIP's degradation prompt is the sum over T, not the mean", keyword="pip"),
    M("pip_router_softmax_over_batch", "cplfast/layers/pip.py",
      "routing = torch.softmax(logits, dim=1)",
      "routing = torch.softmax(logits, dim=0)",
      T_LAYERS, "PIP's blind router normalises over the batch instead of the degradations", keyword="pip"),
    M("dppd_eps_shared_across_batch", "cplfast/layers/dppd.py",
      "tokens = tokens + sigma * torch.randn_like(tokens)",
      "tokens = tokens + sigma * torch.randn_like(tokens[:1])",
      T_LAYERS, "DPPD sampling draws one eps for the whole batch", keyword="dppd or prompt_distribution"),
    M("dppd_sigma_not_applied", "cplfast/layers/dppd.py",
      "tokens = tokens + sigma * torch.randn_like(tokens)",
      "tokens = tokens + torch.randn_like(tokens)",
      T_LAYERS, "DPPD sampling adds unit noise (sigma not applied)", keyword="dppd or prompt_distribution"),
    M("dppd_variance_for_sigma", "cplfast/layers/dppd.py",
      "sigma = a @ torch.exp(0.5 * self.log_var).view(t, m * d)",
      "sigma = a @ torch.exp(self.log_var).view(t, m * d)",
      T_LAYERS, "DPPD sampling scales eps by the variance instead of sigma", keyword="dppd or prompt_distribution"),
    M("dppd_no_straight_through", "cplfast/layers/dppd.py",
      "a = hard + (a - a.detach())",
      "a = hard",
      T_LAYERS, "assigned sampling loses its straight-through gradient to the assignment",
      keyword="dppd or prompt_distribution"),
]


# ---------------------------------------------------------------------------------------------- runner


def _source_files(repo: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         check=True, capture_output=True).stdout.decode()
    return sorted({f for f in out.split("\0") if f and (repo / f).is_file()})


def make_copy(repo: Path, dest: Path) -> Path:
    """The working tree's source files under ``dest``, importable as ``cplfast`` with ``PYTHONPATH=dest``."""
    for rel in _source_files(repo):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, target)
    for link, to in PACKAGE_LINKS.items():
        if (dest / link).exists() or (dest / link).is_symlink():
            raise RuntimeError(f"{link} exists in the tree; the package-dir link cannot be made")
        os.symlink(to, dest / link, target_is_directory=True)
    (dest / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE)
    return dest


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a same-size edit within a second would reuse a stale .pyc
    env.pop("PYTEST_ADDOPTS", None)
    return env


def _pytest(copy: Path, selection: list[str], timeout: float, *, stop_first: bool = True
            ) -> tuple[str, float, str]:
    """Run pytest in ``copy``: ``("passed" | "failed" | "timeout" | "error", seconds, output)``."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", "-p", PLUGIN,
           "-o", "console_output_style=classic", "-rfE"]
    if stop_first:
        cmd.append("-x")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd + selection, cwd=copy, env=_env(copy), capture_output=True, text=True,
                              timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return "timeout", time.perf_counter() - start, out
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    # 0 passed, 1 tests failed, 2 interrupted / collection error, 5 nothing collected
    status = {0: "passed", 1: "failed"}.get(proc.returncode, "error")
    return status, seconds, out


FAILED = re.compile(r"^(FAILED|ERROR) (\S+)", re.M)


def _first_failure(output: str) -> str | None:
    m = FAILED.search(output)
    return m.group(2) if m else None


@dataclasses.dataclass
class Result:
    mutant: Mutant
    status: str  # caught | survived | timeout | stale | error | not-green
    seconds: float
    failing: str | None = None
    detail: str = ""

    @property
    def caught(self) -> bool:
        return self.status == "caught"


def run_mutant(mutant: Mutant, copy: Path) -> Result:
    target = copy / mutant.path
    if not target.is_file():
        return Result(mutant, "stale", 0.0, detail=f"{mutant.path} does not exist")
    source = target.read_text()
    count = source.count(mutant.original)
    if count != 1:
        return Result(mutant, "stale", 0.0, detail=f"original snippet found {count} times in {mutant.path}")
    target.write_text(source.replace(mutant.original, mutant.replacement))
    try:
        status, seconds, out = _pytest(copy, mutant.selection, mutant.timeout)
    finally:
        target.write_text(source)
    failing = _first_failure(out)
    if status == "failed" and failing:
        return Result(mutant, "caught", seconds, failing)
    if status == "passed":
        return Result(mutant, "survived", seconds)
    if status == "timeout":
        return Result(mutant, "timeout", seconds, detail=f"no result within {mutant.timeout:.0f} s")
    tail = "\n".join(out.strip().splitlines()[-15:])
    return Result(mutant, "error", seconds, failing, detail=f"pytest did not run the tests:\n{tail}")


def confirm_green(results: list[Result], copy: Path, timeout: float) -> float:
    """Run every catching test once on the unmutated copy; a caught mutant whose test fails there too
    becomes ``not-green``. Returns the seconds taken."""
    ids = sorted({r.failing for r in results if r.caught and r.failing})
    if not ids:
        return 0.0
    status, seconds, out = _pytest(copy, ids, timeout, stop_first=False)
    if status == "passed":
        return seconds
    bad = {m[1] for m in FAILED.findall(out)}
    for r in results:
        if r.caught and (r.failing in bad or status not in ("passed", "failed")):
            r.status = "not-green"
            r.detail = f"{r.failing} fails without the mutant too" if r.failing in bad else f"baseline run: {status}"
    return seconds


def table(results: list[Result]) -> str:
    rows = ["| mutant | file | tests run | caught | first failing test | s |", "|---|---|---|---|---|---:|"]
    for r in results:
        m = r.mutant
        tests = ", ".join(t.replace("tests/", "") for t in m.tests) + (f" -k `{m.keyword}`" if m.keyword else "")
        caught = "yes" if r.caught else f"**no ({r.status})**"
        failing = (r.failing or "").replace("tests/", "").replace("|", "\\|")
        rows.append(f"| `{m.name}`: {m.description} | {m.path} | {tests} | {caught} | {failing} | {r.seconds:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only (shell patterns: 'sp_*')")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    parser.add_argument("--timeout", type=float, default=None, help="per-mutant timeout in seconds (overrides each)")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="write the table here (default: mutation_check.md in the temporary folder, kept)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    args = parser.parse_args(argv)

    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        raise SystemExit("duplicate mutant names")
    mutants = MUTANTS
    if args.only:
        unknown = [p for p in args.only if not fnmatch.filter(names, p)]
        if unknown:
            parser.error(f"no mutant matches {', '.join(unknown)} (see --list)")
        mutants = [m for m in MUTANTS if any(fnmatch.fnmatchcase(m.name, p) for p in args.only)]
    if args.list:
        for m in mutants:
            print(f"{m.name:36s} {m.path:34s} {' '.join(m.selection)}\n{'':36s} {m.description}")
        print(f"{len(mutants)} mutants")
        return 0
    if args.timeout is not None:
        mutants = [dataclasses.replace(m, timeout=args.timeout) for m in mutants]

    tmp = Path(tempfile.mkdtemp(prefix="cplfast-mutants-"))
    jobs = max(1, min(args.jobs, len(mutants)))
    copies = [make_copy(REPO, tmp / f"copy{i}") for i in range(jobs)]
    print(f"{len(mutants)} mutants, {jobs} at a time, copies under {tmp}", flush=True)
    start = time.perf_counter()
    results: list[Result | None] = [None] * len(mutants)
    free = list(copies)

    def work(i: int) -> tuple[int, Result]:
        copy = free.pop()
        try:
            return i, run_mutant(mutants[i], copy)
        finally:
            free.append(copy)

    with cf.ThreadPoolExecutor(jobs) as pool:
        for fut in cf.as_completed([pool.submit(work, i) for i in range(len(mutants))]):
            i, r = fut.result()
            results[i] = r
            note = f" ({r.failing})" if r.failing else (f" - {r.detail.splitlines()[0]}" if r.detail else "")
            print(f"[{sum(x is not None for x in results):2d}/{len(mutants)}] {r.mutant.name:36s} "
                  f"{r.status:9s} {r.seconds:6.1f} s{note}", flush=True)
    done = [r for r in results if r is not None]
    green_s = confirm_green(done, copies[0], max(m.timeout for m in mutants) * 2)
    total = time.perf_counter() - start

    md = table(done)
    bad = [r for r in done if not r.caught]
    summary = (f"{len(done) - len(bad)}/{len(done)} mutants caught in {total:.0f} s "
               f"(catching tests re-run green on the unmutated copy: {green_s:.0f} s)")
    print("\n" + md + "\n\n" + summary)
    for r in bad:
        print(f"\n{r.mutant.name}: {r.status}" + (f"\n{r.detail}" if r.detail else ""))
    out = args.markdown or tmp / "mutation_check.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md + "\n\n" + summary + "\n")
    print(f"\nmarkdown: {out}")
    if not args.keep:
        for c in copies:
            shutil.rmtree(c, ignore_errors=True)
        if args.markdown is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
