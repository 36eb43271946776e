"""One small launch of every Triton kernel, forward and backward, for NVIDIA compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_launches.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_launches.py --ops infonce supcon

Every fused op runs once on small, odd-sized CUDA inputs (non-contiguous where the op reads strides)
under the ``triton`` backend: forward, then backward to every input. Outputs and gradients are compared
with the reference at a loose tolerance (memory safety is the point here; tests/ check accuracy) and
checked for NaN/Inf. Exits 1 if any op fails, 0 otherwise (ops without a kernel module are reported
and skipped). ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` is set before torch is imported, so memcheck sees
out-of-bounds accesses that would otherwise land inside the caching allocator's larger blocks.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import torch  # noqa: E402

TOLERANCE = 5e-2  # relative to the reference's largest magnitude (TF32 dots are allowed)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def sparse_prompt_inputs(device):
    x = torch.randn(2, 9, 7, 5, device=device).permute(0, 3, 1, 2)  # (2,5,9,7) channels-last strides
    weight, bias = torch.randn(7, 5, device=device), torch.randn(7, device=device)
    prompts = torch.rand(7, 3, 6, 6, device=device)
    leaves = (_leaf(x), _leaf(weight), _leaf(bias), _leaf(prompts))
    return [(leaves, dict(k=k)) for k in (1, 3, 7)]


def channel_attention_inputs(device):
    q, k, v = (torch.randn(2, 3, 5, 37, device=device) for _ in range(3))
    temperature = torch.rand(3, device=device) + 0.5
    mix = torch.rand(4, device=device)
    leaves = tuple(_leaf(t) for t in (q, k, v, temperature))
    return [(leaves, dict(fractions=(1 / 2, 2 / 3, 3 / 4, 4 / 5), mix=_leaf(mix))), (leaves, dict(fractions=None))]


def token_attention_inputs(device):
    q = torch.randn(2, 37, 3, 16, device=device).transpose(1, 2)
    k = torch.randn(2, 5, 3, 16, device=device).transpose(1, 2)
    v = torch.randn(2, 5, 3, 16, device=device).transpose(1, 2)
    return [((_leaf(q), _leaf(k), _leaf(v)), {})]


def infonce_inputs(device):
    anchor = torch.randn(2, 5, 7, 9, device=device)
    positive = torch.randn(2, 5, 7, 9, device=device)
    negatives = torch.randn(3, 2, 5, 7, 9, device=device)
    return [((_leaf(anchor), _leaf(positive), _leaf(negatives)), dict(temperature=0.1)),
            ((_leaf(anchor), positive, _leaf(negatives)), dict(temperature=0.1, reduction="none"))]


def supcon_inputs(device):
    z = torch.randn(37, 16, device=device)
    labels = torch.randint(0, 3, (37,), device=device)
    return [((_leaf(z), labels), dict(temperature=0.1))]


OPS = {
    "sparse_prompt": sparse_prompt_inputs,
    "topm_channel_attention": channel_attention_inputs,
    "prompt_token_attention": token_attention_inputs,
    "infonce": infonce_inputs,
    "supcon": supcon_inputs,
}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _run(fn, args, kwargs, grad_seed):
    out = _first(fn(*args, **kwargs))
    leaves = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
    generator = torch.Generator(device=out.device).manual_seed(grad_seed)
    grad = torch.randn(out.shape, device=out.device, generator=generator)
    grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    return out.detach(), [None if g is None else g.detach() for g in grads]


def _compare(name: str, got: torch.Tensor | None, want: torch.Tensor | None) -> str | None:
    if got is None or want is None:
        return None if got is None and want is None else f"{name}: gradient missing on one side"
    if not torch.isfinite(got).all():
        return f"{name}: non-finite values"
    scale = max(want.abs().max().item(), 1e-6)
    err = (got.float() - want.float()).abs().max().item() / scale
    return f"{name}: relative error {err:.2e} > {TOLERANCE}" if err > TOLERANCE else None


def check_op(op: str, device: torch.device) -> list[str]:
    import cplfast
    from cplfast import functional, reference

    problems = []
    for i, (args, kwargs) in enumerate(OPS[op](device)):
        with cplfast.use_backend("triton"):
            out, grads = _run(getattr(functional, op), args, kwargs, grad_seed=i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        want_out, want_grads = _run(getattr(reference, op), args, kwargs, grad_seed=i)
        for name, got, want in [("output", out, want_out)] + [
                (f"grad[{j}]", g, w) for j, (g, w) in enumerate(zip(grads, want_grads))]:
            problem = _compare(f"{op} variant {i} {name}", got, want)
            if problem:
                problems.append(problem)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", choices=tuple(OPS), default=list(OPS))
    parser.add_argument("--device", default="cuda",
                        help="cuda (default); cpu runs the same checks under TRITON_INTERPRET=1 (to test this script)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitize_launches: no CUDA device; nothing to launch", file=sys.stderr)
        return 2

    device = torch.device(args.device)
    torch.manual_seed(0)
    failed = 0
    for op in args.ops:
        try:
            problems = check_op(op, device)
        except Exception:  # noqa: BLE001 - report every op, then fail at the end
            print(f"{op}: ERROR\n{traceback.format_exc()}")
            failed += 1
            continue
        if problems:
            failed += 1
            print(f"{op}: FAIL\n  " + "\n  ".join(problems))
        else:
            print(f"{op}: ok (forward + backward launched)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
