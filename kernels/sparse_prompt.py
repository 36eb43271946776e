"""Triton kernels for ``sparse_prompt`` (SPEC §3.1), forward and backward, and their launchers.

Math (x ``(B,C,H,W)``, weight ``(N,C)``, bias ``(N,)``, prompts ``(N,D,S,S)``, output size ``(H',W')``)::

    emb    = mean_hw(x)                                   (B,C)
    logits = emb @ weight.T + bias                        (B,N)
    p      = softmax(logits / temperature)                (B,N)
    m      = top-k mask of p (ties: lower index)          (B,N)
    w      = m*p, or m*p / sum(m*p) with renorm (k < N)   (B,N)   = routing
    out[b] = sum_n w[b,n] * resize(prompts[n])            (B,D,H',W')

``resize`` is bilinear with ``align_corners=False`` (F.interpolate's source index
``max((o + 0.5) * in/out - 0.5, 0)``, upper tap clamped to the last row/column). Because the resize
is linear, ``resize(sum_n w_n P_n) = sum_n w_n resize(P_n)``: the mix kernel resizes each prompt
component at its output positions once and reuses that for every image of the batch. Neither the
``(B,N,D,S,S)`` repeat nor the pre-resize ``(B,D,S,S)`` mix is ever stored, forward or backward.

Forward, three launches:
  1. ``_gap_partial_kernel``  grid (B, C/BLOCK_C, SPLIT): partial spatial sums of x, read through its
     strides (NCHW, channels-last or any view), fp32.
  2. ``_router_kernel``       grid (B,): emb, logits, softmax, rank-based top-k, renorm.
  3. ``_mix_resize_kernel``   grid (H'W'/BLOCK, D): bilinear taps of the prompt components that any
     image of the batch selected (the others are never read), then one weighted sum per image.

Backward (grad_out ``(B,D,H',W')``, grad_routing ``(B,N)``), three launches:
  4. ``_prompt_grad_kernel``  grid (S*S/BLOCK, D): per prompt pixel, the transposed resize of grad_out
     (a gather over the output window that reads it; no atomics), then
     ``grad_prompts[n] = sum_b w[b,n] G_b`` and partial ``dL/dw[b,n] = <G_b, prompts[n]>``.
  5. ``_router_grad_kernel``  grid (B,): renorm / top-k / softmax Jacobian -> dlogits, and
     ``grad_emb = dlogits @ weight / (H*W)``.
  6. ``_param_grad_kernel``   grid (C/BLOCK_C,): ``grad_weight = dlogits.T @ emb``, ``grad_bias``.
``grad_x`` is ``grad_emb`` broadcast over (H, W); the autograd layer returns it as an expanded view,
so no (B,C,H,W) tensor is written.

HBM bytes (e = element size; S^2 = S*S; prompts read only for selected components, at most N):
  forward : B*C*H*W*e (read x)  +  <= N*D*S^2*e (prompts)  +  B*D*H'*W'*e (write out)  + O(B*(C+N))
  backward: B*D*H'*W'*e (read grad_out) + N*D*S^2*e (read prompts) + N*D*S^2*e (write grad_prompts)
            + O(N*C + B*C)
The two big terms are the output write and the grad_out read (B*D*H'*W'*e each) and the x read.
Example, PromptIR level 1 at 128^2 training patches (B=8, C=96, H=W=S=64, D=64, N=5, fp32):
x 12.6 MB, out 8.4 MB, prompts 5.2 MB -> forward 26.2 MB, backward 8.4 + 2*5.2 = 18.9 MB.
The eager reference additionally writes and re-reads the (B,D,S,S) mix, the interpolate output and a
full (B,C,H,W) grad_x.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_COMPONENTS = 256  # N above this would not fit the rank tile in registers


@triton.jit
def _gap_partial_kernel(
    x_ptr, part_ptr,
    C, W, HW, hw_per_split, SPLIT,
    sxb, sxc, sxh, sxw,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """part[b, split, c] = sum of x[b, c] over this split's share of the H*W positions (fp32)."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    c_ok = c < C
    base = x_ptr + b.to(tl.int64) * sxb + c[:, None] * sxc
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    start = split * hw_per_split
    for i in range(0, hw_per_split, BLOCK_HW):
        hw = start + i + tl.arange(0, BLOCK_HW)
        if FLAT:  # H and W fold into one stride (NCHW-contiguous or channels-last)
            offset = hw * sxw
        else:
            offset = (hw // W) * sxh + (hw % W) * sxw
        mask = c_ok[:, None] & (hw < HW)[None, :]
        acc += tl.load(base + offset[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(part_ptr + (b * SPLIT + split) * C + c, tl.sum(acc, axis=1), mask=c_ok)


@triton.jit
def _topk_keep(p, n, n_ok, k):
    """Mask of the k largest entries of p (ties: lower index first), by counting who beats whom."""
    p_other = p[None, :]
    p_self = p[:, None]
    beats = (p_other > p_self) | ((p_other == p_self) & (n[None, :] < n[:, None]))
    rank = tl.sum((beats & n_ok[None, :]).to(tl.int32), axis=1)
    return (rank < k) & n_ok


@triton.jit
def _router_kernel(
    part_ptr, weight_ptr, bias_ptr,
    emb_ptr, probs_ptr, mixw_ptr, routing_ptr,
    C, N, SPLIT, inv_hw, temperature, k,
    swn, swc, sbn,
    HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One image per program: emb, logits, softmax, top-k and renorm. Writes emb/probs/mixw (fp32)."""
    b = tl.program_id(0)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    logits = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        emb = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s in range(SPLIT):
            emb += tl.load(part_ptr + (b * SPLIT + s) * C + c, mask=c_ok, other=0.0)
        emb = emb * inv_hw
        tl.store(emb_ptr + b * C + c, emb, mask=c_ok)
        w_tile = tl.load(
            weight_ptr + n[:, None] * swn + c[None, :] * swc, mask=n_ok[:, None] & c_ok[None, :], other=0.0
        ).to(tl.float32)
        logits += tl.sum(w_tile * emb[None, :], axis=1)
    if HAS_BIAS:
        logits += tl.load(bias_ptr + n * sbn, mask=n_ok, other=0.0).to(tl.float32)
    z = tl.where(n_ok, logits / temperature, float("-inf"))
    e = tl.where(n_ok, tl.exp(z - tl.max(z, axis=0)), 0.0)
    p = e / tl.sum(e, axis=0)
    keep = _topk_keep(p, n, n_ok, k)
    w = tl.where(keep, p, 0.0)
    if RENORM:
        w = w / tl.sum(w, axis=0)
    tl.store(probs_ptr + b * N + n, p, mask=n_ok)
    tl.store(mixw_ptr + b * N + n, w, mask=n_ok)
    tl.store(routing_ptr + b * N + n, w.to(routing_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _source_taps(dst, scale, in_size):
    """F.interpolate(bilinear, align_corners=False) taps of output index ``dst``: (i0, i1, l0, l1)."""
    src = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)
    i1 = tl.minimum(i0 + 1, in_size - 1)
    l1 = src - i0.to(tl.float32)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _tap_weight(dst, src_index, scale, in_size):
    """Weight of input index ``src_index`` in output index ``dst`` (0 where it is not a tap)."""
    i0, i1, l0, l1 = _source_taps(dst, scale, in_size)
    return tl.where(i0 == src_index, l0, 0.0) + tl.where(i1 == src_index, l1, 0.0)


@triton.jit
def _mix_resize_kernel(
    prompts_ptr, mixw_ptr, out_ptr,
    B, N, SH, SW, OH, OW, scale_h, scale_w,
    spn, spd, sph, spw, sob,
    IDENTITY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[b, d, o] = sum_n mixw[b, n] * resize(prompts[n, d])[o] for a block of output pixels o."""
    d = tl.program_id(1)
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    o_ok = o < OH * OW
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    # components selected by at least one image; the others are not read
    weight_mag = tl.zeros([BLOCK_N], dtype=tl.float32)
    for b in range(B):
        weight_mag = tl.maximum(weight_mag, tl.abs(tl.load(mixw_ptr + b * N + n, mask=n_ok, other=0.0)))
    mask = ((weight_mag != 0.0) & n_ok)[:, None] & o_ok[None, :]
    base = prompts_ptr + d.to(tl.int64) * spd + n[:, None] * spn
    oh = o // OW
    ow = o % OW
    if IDENTITY:
        resized = tl.load(base + (oh * sph + ow * spw)[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        h0, h1, lh0, lh1 = _source_taps(oh, scale_h, SH)
        w0, w1, lw0, lw1 = _source_taps(ow, scale_w, SW)
        top = lw0[None, :] * tl.load(base + (h0 * sph + w0 * spw)[None, :], mask=mask, other=0.0).to(tl.float32)
        top += lw1[None, :] * tl.load(base + (h0 * sph + w1 * spw)[None, :], mask=mask, other=0.0).to(tl.float32)
        bot = lw0[None, :] * tl.load(base + (h1 * sph + w0 * spw)[None, :], mask=mask, other=0.0).to(tl.float32)
        bot += lw1[None, :] * tl.load(base + (h1 * sph + w1 * spw)[None, :], mask=mask, other=0.0).to(tl.float32)
        resized = lh0[None, :] * top + lh1[None, :] * bot
    out_b = out_ptr + d.to(tl.int64) * (OH * OW) + o
    for b in range(B):
        w = tl.load(mixw_ptr + b * N + n, mask=n_ok, other=0.0)
        value = tl.sum(w[:, None] * resized, axis=0)
        tl.store(out_b, value.to(out_ptr.dtype.element_ty), mask=o_ok)
        out_b += sob


@triton.jit
def _first_reader(src_index, scale, in_size):
    """Smallest output index whose bilinear taps can include input ``src_index`` (i0 >= src_index - 1)."""
    t = tl.maximum((src_index.to(tl.float32) - 0.5) / scale - 0.5, 0.0)
    first = t.to(tl.int32)
    i0, _, _, _ = _source_taps(first, scale, in_size)
    return first + (i0 < src_index - 1).to(tl.int32)  # one step corrects the rounding of t


@triton.jit
def _prompt_grad_kernel(
    grad_out_ptr, prompts_ptr, mixw_ptr, grad_prompts_ptr, dmix_part_ptr,
    B, N, D, SH, SW, OH, OW, scale_h, scale_w, win_h, win_w,
    sgb, sgd, sgh, sgw, spn, spd, sph, spw,
    IDENTITY: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr,
):
    """For a block of prompt pixels s of channel d and every image b: G_b[s] = resize^T(grad_out[b, d])[s];
    grad_prompts[n, d, s] = sum_b mixw[b, n] G_b[s]; dmix_part[prog, b, n] = sum_s G_b[s] prompts[n, d, s].

    Images are taken BLOCK_B at a time; the transposed resize gathers, for each pixel, the win_h x win_w
    output window that starts at its first reader (taps that miss the pixel weigh 0 and are not loaded).
    """
    d = tl.program_id(1)
    s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s_ok = s < SH * SW
    ih = s // SW
    iw = s % SW
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    tile_mask = n_ok[:, None] & s_ok[None, :]
    prompt_offsets = n[:, None] * spn + (ih * sph + iw * spw)[None, :]
    prompt_tile = tl.load(prompts_ptr + d.to(tl.int64) * spd + prompt_offsets, mask=tile_mask, other=0.0)
    prompt_tile = prompt_tile.to(tl.float32)
    grad_tile = tl.zeros([BLOCK_N, BLOCK], dtype=tl.float32)
    if not IDENTITY:
        h_start = _first_reader(ih, scale_h, SH)
        w_start = _first_reader(iw, scale_w, SW)
    prog = d * tl.num_programs(0) + tl.program_id(0)
    part_base = dmix_part_ptr + prog.to(tl.int64) * B * BLOCK_N
    grad_base = grad_out_ptr + d.to(tl.int64) * sgd
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b_ok = b < B
        rows = grad_base + b[:, None].to(tl.int64) * sgb
        bs_mask = b_ok[:, None] & s_ok[None, :]
        if IDENTITY:
            g = tl.load(rows + (ih * sgh + iw * sgw)[None, :], mask=bs_mask, other=0.0).to(tl.float32)
        else:
            g = tl.zeros([BLOCK_B, BLOCK], dtype=tl.float32)
            for dy in range(win_h):
                oh = h_start + dy
                ah = tl.where(oh < OH, _tap_weight(oh, ih, scale_h, SH), 0.0)
                for dx in range(win_w):
                    ow = w_start + dx
                    a = ah * tl.where(ow < OW, _tap_weight(ow, iw, scale_w, SW), 0.0)
                    hit = bs_mask & (a != 0.0)[None, :]
                    window = tl.load(rows + (oh * sgh + ow * sgw)[None, :], mask=hit, other=0.0)
                    g += a[None, :] * window.to(tl.float32)
        bn_mask = b_ok[:, None] & n_ok[None, :]
        w = tl.load(mixw_ptr + b[:, None] * N + n[None, :], mask=bn_mask, other=0.0)
        grad_tile += tl.sum(w[:, :, None] * g[:, None, :], axis=0)
        dmix = tl.sum(g[:, None, :] * prompt_tile[None, :, :], axis=2)
        tl.store(part_base + b[:, None] * BLOCK_N + n[None, :], dmix, mask=bn_mask)
    gp_offsets = n[:, None] * (D * SH * SW) + (d * SH * SW + s)[None, :]
    tl.store(grad_prompts_ptr + gp_offsets, grad_tile.to(grad_prompts_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _router_grad_kernel(
    dmix_part_ptr, grad_routing_ptr, probs_ptr, mixw_ptr, weight_ptr,
    dlogits_ptr, grad_emb_ptr,
    B, C, N, PARTS, k, temperature, inv_hw,
    swn, swc,
    RENORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One image per program: dL/dw -> (renorm, top-k, softmax Jacobian) -> dlogits and grad_emb."""
    b = tl.program_id(0)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, PARTS, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        offsets = (parts[:, None].to(tl.int64) * B + b) * BLOCK_N + n[None, :]
        acc += tl.load(dmix_part_ptr + offsets, mask=(parts < PARTS)[:, None] & n_ok[None, :], other=0.0)
    dw = tl.sum(acc, axis=0) + tl.load(grad_routing_ptr + b * N + n, mask=n_ok, other=0.0)
    p = tl.load(probs_ptr + b * N + n, mask=n_ok, other=0.0)
    keep = _topk_keep(p, n, n_ok, k)
    if RENORM:
        w = tl.load(mixw_ptr + b * N + n, mask=n_ok, other=0.0)
        kept_mass = tl.sum(tl.where(keep, p, 0.0), axis=0)
        dp = tl.where(keep, (dw - tl.sum(dw * w, axis=0)) / kept_mass, 0.0)
    else:
        dp = tl.where(keep, dw, 0.0)
    dlogits = p * (dp - tl.sum(p * dp, axis=0)) / temperature
    tl.store(dlogits_ptr + b * N + n, dlogits, mask=n_ok)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        w_tile = tl.load(
            weight_ptr + n[:, None] * swn + c[None, :] * swc, mask=n_ok[:, None] & c_ok[None, :], other=0.0
        ).to(tl.float32)
        grad_emb = tl.sum(dlogits[:, None] * w_tile, axis=0) * inv_hw
        tl.store(grad_emb_ptr + b * C + c, grad_emb.to(grad_emb_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _param_grad_kernel(
    dlogits_ptr, emb_ptr, grad_weight_ptr, grad_bias_ptr,
    B, C, N,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_weight[:, c-block] = dlogits.T @ emb[:, c-block]; program 0 also writes grad_bias."""
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    grad_w = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    grad_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    for b in range(B):
        dl = tl.load(dlogits_ptr + b * N + n, mask=n_ok, other=0.0)
        emb = tl.load(emb_ptr + b * C + c, mask=c_ok, other=0.0)
        grad_w += dl[:, None] * emb[None, :]
        grad_b += dl
    tl.store(
        grad_weight_ptr + n[:, None] * C + c[None, :],
        grad_w.to(grad_weight_ptr.dtype.element_ty),
        mask=n_ok[:, None] & c_ok[None, :],
    )
    if pid == 0:
        tl.store(grad_bias_ptr + n, grad_b.to(grad_bias_ptr.dtype.element_ty), mask=n_ok)


# ----------------------------------------------------------------------------------------- launchers


class ForwardResult(NamedTuple):
    out: torch.Tensor  # (B, D, H', W') in x.dtype, contiguous
    routing: torch.Tensor  # (B, N) in x.dtype
    emb: torch.Tensor  # (B, C) fp32, saved for backward
    probs: torch.Tensor  # (B, N) fp32 softmax before the top-k mask, saved for backward
    mixw: torch.Tensor  # (B, N) fp32 routing, saved for backward


class BackwardResult(NamedTuple):
    grad_emb: torch.Tensor  # (B, C) in grad_out's (= x's) dtype, already divided by H*W: grad_x = broadcast
    grad_weight: torch.Tensor  # (N, C)
    grad_bias: torch.Tensor  # (N,) (the bias gradient, whether or not the op had a bias)
    grad_prompts: torch.Tensor  # (N, D, S, S)


def _empty(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers use comes from here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _pow2(n: int, low: int = 1) -> int:
    return max(low, triton.next_power_of_2(int(n)))


_SM_COUNT: dict[int, int] = {}


def _target_programs(device: torch.device) -> int:
    """Programs worth launching to fill the device (the interpreter prefers few, big ones)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 4 * _SM_COUNT[index]


def _device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_components(n: int) -> None:
    if n > MAX_COMPONENTS:
        raise ValueError(
            f"sparse_prompt: the Triton kernel takes at most {MAX_COMPONENTS} prompt components, got N={n}; "
            "use the 'reference' backend"
        )


def _output_block(count: int, block_n: int, on_gpu: bool) -> int:
    if not on_gpu:
        return min(_pow2(count), 1024)
    return min(_pow2(count, 32), max(64, 2048 // block_n))


def _spatial_sum(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Partial spatial sums of x, (B, SPLIT, C) fp32, and SPLIT."""
    b, c, h, w = x.shape
    hw = h * w
    sxb, sxc, sxh, sxw = x.stride()
    flat = h == 1 or sxh == w * sxw
    if x.is_cuda and sxc == 1 and c > 1:  # channels-last: channels are the contiguous axis
        block_c, block_hw = min(_pow2(c), 64), min(_pow2(hw), 32)
    elif x.is_cuda:
        block_c, block_hw = min(_pow2(c), 4), min(_pow2(hw), 512)
    else:
        block_c, block_hw = min(_pow2(c), 64), min(_pow2(hw), 1024)
    row_programs = b * triton.cdiv(c, block_c)
    split = max(1, min(triton.cdiv(_target_programs(x.device), row_programs), triton.cdiv(hw, block_hw)))
    hw_per_split = triton.cdiv(triton.cdiv(hw, split), block_hw) * block_hw
    split = triton.cdiv(hw, hw_per_split)
    part = _empty((b, split, c), dtype=torch.float32, device=x.device)
    _gap_partial_kernel[(b, triton.cdiv(c, block_c), split)](
        x, part, c, w, hw, hw_per_split, split, sxb, sxc, sxh, sxw,
        FLAT=flat, BLOCK_C=block_c, BLOCK_HW=block_hw,
    )
    return part, split


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    prompts: torch.Tensor,
    k: int,
    temperature: float,
    renorm: bool,
    out_size: tuple[int, int],
) -> ForwardResult:
    """Run the three forward kernels. Arguments are already validated (see cplfast.functional)."""
    b, c, h, w = x.shape
    n, d, sh, sw = prompts.shape
    oh, ow = int(out_size[0]), int(out_size[1])
    _check_components(n)
    device = x.device
    block_n = _pow2(n, 2)
    with _device_guard(x):
        part, split = _spatial_sum(x)
        emb = _empty((b, c), dtype=torch.float32, device=device)
        probs = _empty((b, n), dtype=torch.float32, device=device)
        mixw = _empty((b, n), dtype=torch.float32, device=device)
        routing = _empty((b, n), dtype=x.dtype, device=device)
        _router_kernel[(b,)](
            part, weight, bias if bias is not None else weight,
            emb, probs, mixw, routing,
            c, n, split, 1.0 / (h * w), float(temperature), int(k),
            weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0,
            HAS_BIAS=bias is not None, RENORM=bool(renorm) and k < n,
            BLOCK_N=block_n, BLOCK_C=min(_pow2(c), max(16, 4096 // block_n)),
        )
        out = _empty((b, d, oh, ow), dtype=x.dtype, device=device)
        block = _output_block(oh * ow, block_n, x.is_cuda)
        _mix_resize_kernel[(triton.cdiv(oh * ow, block), d)](
            prompts, mixw, out,
            b, n, sh, sw, oh, ow, sh / oh, sw / ow,
            *prompts.stride(), out.stride(0),
            IDENTITY=(oh, ow) == (sh, sw), BLOCK_N=block_n, BLOCK=block,
        )
    return ForwardResult(out, routing, emb, probs, mixw)


def backward(
    grad_out: torch.Tensor,
    grad_routing: torch.Tensor,
    weight: torch.Tensor,
    prompts: torch.Tensor,
    emb: torch.Tensor,
    probs: torch.Tensor,
    mixw: torch.Tensor,
    k: int,
    temperature: float,
    renorm: bool,
    in_size: tuple[int, int],
) -> BackwardResult:
    """Gradients of (out, routing) w.r.t. the pooled x, weight, bias and prompts.

    ``grad_out`` ``(B,D,H',W')`` is read through its strides; ``grad_routing`` ``(B,N)``;
    ``emb``/``probs``/``mixw`` are the fp32 tensors the forward returned; ``in_size`` is x's (H, W).
    """
    b, d, oh, ow = grad_out.shape
    n, _, sh, sw = prompts.shape
    c = weight.shape[1]
    _check_components(n)
    device = grad_out.device
    block_n = _pow2(n, 2)
    grad_routing = grad_routing.to(torch.float32).contiguous()
    with _device_guard(grad_out):
        if grad_out.is_cuda:
            block_b = min(_pow2(b), 4)
            block = min(_pow2(sh * sw, 32), max(32, 2048 // (block_n * block_b)))
        else:
            block_b, block = min(_pow2(b), 16), min(_pow2(sh * sw), 1024)
        s_blocks = triton.cdiv(sh * sw, block)
        parts = s_blocks * d
        dmix_part = _empty((parts, b, block_n), dtype=torch.float32, device=device)
        grad_prompts = _empty((n, d, sh, sw), dtype=prompts.dtype, device=device)
        _prompt_grad_kernel[(s_blocks, d)](
            grad_out, prompts, mixw, grad_prompts, dmix_part,
            b, n, d, sh, sw, oh, ow, sh / oh, sw / ow, (2 * oh) // sh + 2, (2 * ow) // sw + 2,
            *grad_out.stride(), *prompts.stride(),
            IDENTITY=(oh, ow) == (sh, sw), BLOCK_B=block_b, BLOCK_N=block_n, BLOCK=block,
        )
        dlogits = _empty((b, n), dtype=torch.float32, device=device)
        grad_emb = _empty((b, c), dtype=grad_out.dtype, device=device)
        block_c = min(_pow2(c), max(16, 4096 // block_n))
        _router_grad_kernel[(b,)](
            dmix_part, grad_routing, probs, mixw, weight, dlogits, grad_emb,
            b, c, n, parts, int(k), float(temperature), 1.0 / (in_size[0] * in_size[1]),
            weight.stride(0), weight.stride(1),
            RENORM=bool(renorm) and k < n, BLOCK_N=block_n,
            BLOCK_P=min(_pow2(parts), max(16, 4096 // block_n)), BLOCK_C=block_c,
        )
        grad_weight = _empty((n, c), dtype=weight.dtype, device=device)
        grad_bias = _empty((n,), dtype=weight.dtype, device=device)
        _param_grad_kernel[(triton.cdiv(c, block_c),)](
            dlogits, emb, grad_weight, grad_bias, b, c, n, BLOCK_N=block_n, BLOCK_C=block_c,
        )
    return BackwardResult(grad_emb, grad_weight, grad_bias, grad_prompts)


__all__ = ["BackwardResult", "ForwardResult", "MAX_COMPONENTS", "backward", "forward"]


def audit_cases(dtype: torch.dtype):
    """Launches users reach (PromptIR's three prompt levels at SPEC §8 training and inference shapes, 4K,
    channels-last, up to MAX_COMPONENTS components) for the compile audit (``cplfast.kernels.audit``)."""
    from .audit import AuditCase, fake

    def case(b, c, h, w, n, d, s, k, *, order=None, renorm=False):
        def run():
            x = fake((b, c, h, w), dtype, order)
            weight, bias, prompts = fake((n, c), dtype), fake((n,), dtype), fake((n, d, s, s), dtype)
            res = forward(x, weight, bias, prompts, k, 1.0, renorm, (h, w))
            backward(fake((b, d, h, w), dtype), fake((b, n), dtype), weight, prompts, res.emb, res.probs, res.mixw,
                     k, 1.0, renorm, (h, w))
        return run

    levels = [(96, 64, 64, 64), (192, 128, 32, 32), (384, 320, 16, 16)]  # (C, D, S, H=W) at 128² patches
    for i, (c, d, s, hw) in enumerate(levels, 1):
        yield AuditCase(f"prompt{i} train k=1", case(8, c, hw, hw, 5, d, s, 1), quick=i == 1)
        yield AuditCase(f"prompt{i} train dense", case(8, c, hw, hw, 5, d, s, 5))
        yield AuditCase(f"prompt{i} train channels-last", case(8, c, hw, hw, 5, d, s, 1, order=(0, 2, 3, 1)))
        yield AuditCase(f"prompt{i} 512² infer", case(1, c, hw * 4, hw * 4, 5, d, s, 1))
        yield AuditCase(f"prompt{i} 3840x2160 infer", case(1, c, 2160 >> (i - 1), 3840 >> (i - 1), 5, d, s, 1))
    yield AuditCase("N=64 k=3 renorm", case(4, 96, 64, 64, 64, 64, 64, 3, renorm=True))
    yield AuditCase(f"N={MAX_COMPONENTS} k=1", case(2, 48, 32, 32, MAX_COMPONENTS, 32, 16, 1))
