"""Masked attention cases (issue 11): sliding windows, softcap, sinks, MLA head sizes, through every mesh.

Like ``attention_cases``: full inputs built identically on every rank, usp run on this rank's shards, out, LSE and
every gradient (sinks' included) gathered and compared with an fp64 reference, here an independent autograd
implementation of the masked softmax (explicit mask, softcap, a sink column). Pass rule as there: error <= 2x the
same kernel's single-device error in the same dtype + one float32 ulp. P2P calls are counted per rank and compared
with the spec's statement (``usp.spec.layer_collectives`` with the window, through
``attention_cases.expected_mask_collectives``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Tuple

import torch

from attention_cases import (FP32_ULP, GENERIC_SINKS_PREFIX, Case, _norm, case_backend, dsinks_bound,
                             expected_mask_collectives, run_distributed, sinks_condition)


@dataclass(frozen=True)
class MaskCase:
    ulysses: int
    ring: int
    causal: bool
    dtype: str
    seqlen: int
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    v_head_dim: int = 16
    window: Tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    sinks: bool = False
    head_chunks: int = 1
    batch: int = 1
    backend: str = "auto"

    def name(self) -> str:
        return (f"U{self.ulysses}xR{self.ring}-{'causal' if self.causal else 'full'}-{self.dtype}-s{self.seqlen}"
                f"-h{self.heads}/{self.kv_heads}-d{self.head_dim}/{self.v_head_dim}-w{self.window}"
                f"-cap{self.softcap}-sinks{int(self.sinks)}-chunks{self.head_chunks}-{self.backend}")

    def base(self) -> Case:
        return Case(self.ulysses, self.ring, self.causal, self.dtype, self.batch, self.seqlen, self.heads,
                    self.kv_heads, self.head_dim, self.backend, self.head_chunks)


def reference(q, k, v, sinks, causal, window, softcap, scale):
    """fp64 masked attention with autograd: ``(out, lse)``; ``q [b, s, h, d]``, k/v ``[b, s, h_kv, d(v)]``."""
    b, s, h, d = q.shape
    g = h // k.shape[2]
    kk, vv = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    left, right = window
    allowed = torch.ones(s, s, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks[None, :, None, None].expand(b, h, s, 1)], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)[..., :s]
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vv)
    return out, lse


def run_mask_case(case: MaskCase, mesh, seed: int = 0, device=None) -> dict:
    from usp.kernels import resolve_backend
    from usp.kernels.base import Mask
    from usp.layout import normalize_window
    from usp.ring import apply_sinks, sink_grad

    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(seed)
    b, s, h, hk = case.batch, case.seqlen, case.heads, case.kv_heads
    shapes = {"q": (b, s, h, case.head_dim), "k": (b, s, hk, case.head_dim), "v": (b, s, hk, case.v_head_dim),
              "dout": (b, s, h, case.v_head_dim)}
    device = torch.device("cpu") if device is None else torch.device(device)
    full = {n: torch.randn(sh, generator=gen, dtype=torch.float64).to(dtype) for n, sh in shapes.items()}
    sinks_full = (torch.randn(h, generator=gen, dtype=torch.float64) + 1.0).float() if case.sinks else None
    scale = case.head_dim ** -0.5

    f64 = {n: t.double().requires_grad_(n != "dout") for n, t in full.items()}
    s64 = sinks_full.double().requires_grad_() if case.sinks else None
    out64, lse64 = reference(f64["q"], f64["k"], f64["v"], s64, case.causal, case.window, case.softcap, scale)
    out64.backward(f64["dout"])
    truth = {"out": out64.detach(), "lse": lse64.detach(), "dq": f64["q"].grad, "dk": f64["k"].grad,
             "dv": f64["v"].grad}
    if case.sinks:
        truth["dsinks"] = s64.grad

    # the same kernel, same dtype, one device, whole sequence
    left, right = normalize_window(case.window, case.causal, s)
    mask = Mask(left, 0 if case.causal else right, case.softcap)
    full = {n: t.to(device) for n, t in full.items()}
    sinks_full = sinks_full.to(device) if case.sinks else None
    backend = case_backend(case.backend)  # "contract:<name>": the kernel inside the contract checker
    kernel = resolve_backend(backend, device, dtype, case.head_dim)
    native = case.sinks and kernel.supports_sinks  # the kernel takes the sinks itself (Note [kernel sinks])
    sink_args = {"sinks": sinks_full.to(torch.promote_types(dtype, torch.float32))} if native else {}
    out1, lse1 = kernel.forward(full["q"], full["k"], full["v"], mask, scale, **sink_args)
    if case.sinks and not native:
        out1, lse1 = apply_sinks(out1, lse1, sinks_full)
    dq1, dk1, dv1, *ds1 = kernel.backward(full["dout"], full["q"], full["k"], full["v"], out1, lse1, mask, scale,
                                          **sink_args)
    single = {"out": out1, "lse": lse1, "dq": dq1, "dk": dk1, "dv": dv1}
    if case.sinks:
        single["dsinks"] = ds1[0] if native else sink_grad(full["dout"], out1, lse1, sinks_full)

    sinks = sinks_full.clone().requires_grad_() if case.sinks else None
    run = run_distributed(full, mesh, case.causal, backend=backend, head_chunks=case.head_chunks,
                          window_size=case.window, softcap=case.softcap, sinks=sinks)
    out, q, local, gathered = run["out"], run["q"], run["local"], run["gathered"]
    fwd, bwd = run["collectives"]["forward"], run["collectives"]["backward"]
    if case.sinks:  # a partial sum per rank: summed over the sequence-parallel ranks, like any parameter
        total = sinks.grad.clone()
        torch.distributed.all_reduce(total)
        gathered["dsinks"] = total
    expected = expected_mask_collectives(case.base(), case.window, mesh.ring_rank)
    result = {"case": asdict(case), "tensors": {}, "collectives": {"forward": fwd, "backward": bwd},
              "expected": expected, "shape_ok": tuple(out.shape) == tuple(local["dout"].shape),
              "dtype_ok": out.dtype == dtype and q.grad.dtype == dtype}
    for name, ref in truth.items():
        ref_norm = _norm(ref)
        err = _norm(gathered[name].double().cpu() - ref) / ref_norm
        base = _norm(single[name].double().cpu() - ref) / ref_norm
        result["tensors"][name] = {"error": err, "bound": 2 * base + FP32_ULP, "single": base,
                                   "finite": bool(torch.isfinite(gathered[name]).all())}
    if case.sinks:  # a sum that can cancel: it may also carry the output's bound through its condition number
        condition = sinks_condition(sinks_full, truth["lse"], f64["dout"], truth["out"], truth["dsinks"])
        bound = result["tensors"]["dsinks"]
        bound["condition"] = condition
        bound["bound"] = max(bound["bound"], dsinks_bound(result["tensors"]["out"]["single"], condition))
    return result


def check_mask_result(result: dict) -> List[str]:
    problems = []
    if not result["shape_ok"] or not result["dtype_ok"]:
        problems.append("wrong output shape or dtype")
    for name, t in result["tensors"].items():
        if not t["finite"]:
            problems.append(f"{name}: non-finite")
        if not t["error"] <= t["bound"]:
            problems.append(f"{name}: error {t['error']:.3e} > bound {t['bound']:.3e} (single {t['single']:.3e})")
    for phase in ("forward", "backward"):
        if result["collectives"][phase] != result["expected"][phase]:
            problems.append(f"{phase} collectives {result['collectives'][phase]} != {result['expected'][phase]}")
    return problems


def mask_cases(u: int, r: int) -> List[MaskCase]:
    """Windows smaller than a shard, larger than a shard, larger than the sequence, asymmetric non-causal; softcap;
    sinks; GQA/MQA (replicated K/V heads when U > kv_heads); MLA head sizes; head chunks."""
    from usp.spec import required_multiple

    cases = []
    for causal in (True, False):
        seqlen = required_multiple(u, r, causal) * (6 if r * u <= 4 else 3)
        shard = seqlen // (u * r)
        windows = [(2, 0 if causal else 3), (shard + 3, 0 if causal else 1), (seqlen + 5, -1 if not causal else 0)]
        if not causal:
            windows.append((1, shard + 2))  # asymmetric: a short past and a long future
        for index, window in enumerate(windows):
            sinks = index % 2 == 0 or index == 3
            # the sinks both ways (Note [attention sinks]): in the kernel's own-block calls, and around the ring
            # (the kernel's support hidden); each on the sparse ring of a window and on the dense ring
            generic = sinks and (index == 2) == causal
            cases.append(MaskCase(u, r, causal, ("float32", "bfloat16")[index % 2], seqlen, window=window,
                                  softcap=(0.0, 5.0)[index % 2], sinks=sinks, kv_heads=(2, 1)[index % 2],
                                  backend=GENERIC_SINKS_PREFIX + "reference" if generic else "auto"))
    from usp.attention import valid_head_chunks

    seqlen = required_multiple(u, r, True) * 4
    heads = 8 if u > 2 else 4
    chunks = 2 if 2 in valid_head_chunks(heads, 4, u) else 1
    cases.append(MaskCase(u, r, True, "float32", seqlen, heads=heads, window=(3, 0), v_head_dim=8, sinks=True,
                          kv_heads=4, head_chunks=chunks, backend=GENERIC_SINKS_PREFIX + "reference"))
    cases.append(MaskCase(u, r, False, "float32", required_multiple(u, r, False) * 4, softcap=2.0, v_head_dim=24))
    return cases
