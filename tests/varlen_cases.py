"""Cases for the varlen path (``usp.varlen``), run inside a distributed world (CPU/gloo or GPU/NCCL).

Every case builds the whole packed batch identically on every rank, runs usp on this rank's ``shard_varlen``
shards, gathers out, LSE and dq/dk/dv with ``gather_varlen``, and compares them with an fp64 reference computed one
document at a time (the dense reference kernel) on the same dtype-rounded inputs. Pass rule (as
``attention_cases``): the relative Frobenius error is at most twice the same-dtype single-device varlen kernel's
error (the same kernel on the whole packed batch) plus one float32 ulp (the sinks gradient, a sum that can cancel,
may also carry the output's bound times that sum's condition number); fp64 must be exact to 1e-12. Collective
counts per forward/backward are checked, and padding rows must come out as out = 0, LSE = -inf, zero gradients.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import torch

from usp.kernels.reference import ReferenceKernel
from attention_cases import FP32_ULP, _norm, case_backend, dsinks_bound, sinks_condition
from usp.kernels.varlen import VarlenSeqs, resolve_varlen_backend


# ---------------------------------------------------------------------------------------------- scenarios
def scenario_lengths(name: str, ulysses: int, ring: int) -> Tuple[int, ...]:
    """Document lengths of the named packed batch for a mesh (some depend on the chunk count)."""
    if name == "short":  # every document shorter than the 2R chunks it is cut into
        return (1, 2, 3, 1, 2)
    if name == "one_doc":  # one document filling the batch, not a multiple of anything
        return (37,)
    if name == "tiny_many":  # many tiny documents
        return (1, 2, 1, 1, 3, 1, 2, 1, 1, 1, 2, 1, 1, 3, 1, 1, 2)
    if name == "exact":  # nothing to pad (multiples of the chunk count and of U), with an empty document
        unit = 2 * ring * ulysses
        return (unit, 0, 2 * unit, unit)
    if name == "mixed":  # long-tailed: one long document and short ones
        return (29, 3, 1, 11, 2, 7)
    if name == "placed":  # Note [document placement]: the long document(s) cut, the rest placed whole
        return (80, 48) + tuple(3 + (i * 5) % 7 for i in range(60))
    if name == "all_whole":  # every document placed whole: nothing travels round the ring
        return (4,) * 32
    if name == "gpu_mixed":  # GPU sizes: long-tailed, ~6K tokens
        return (3001, 17, 1, 500, 1203, 33, 2, 999, 250, 5)
    if name == "gpu_placed":  # GPU sizes: one document cut over a ring of 2, 60 placed whole (~17K tokens)
        return (3001,) + tuple(40 + (i * 53) % 400 for i in range(60))
    if name == "gpu_tiny":  # GPU sizes: 300 documents of 1..20 tokens
        return tuple(1 + (7 * i * i + 3 * i) % 20 for i in range(300))
    raise KeyError(name)


@dataclass(frozen=True)
class VarlenCase:
    ulysses: int
    ring: int
    causal: bool
    dtype: str
    scenario: str
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    backend: str = "auto"
    #: mask options (issue 11), inside each document
    window: Tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    sinks: bool = False

    @property
    def masked(self) -> bool:
        return tuple(self.window) != (-1, -1) or bool(self.softcap) or self.sinks

    def name(self) -> str:
        masks = f"-w{tuple(self.window)}-cap{self.softcap}-sinks{int(self.sinks)}" if self.masked else ""
        return (f"U{self.ulysses}xR{self.ring}-{'causal' if self.causal else 'full'}-{self.dtype}-{self.scenario}"
                f"-h{self.heads}/{self.kv_heads}-d{self.head_dim}-{self.backend}{masks}")


def cases_for(ulysses: int, ring: int, full: bool = True) -> List[VarlenCase]:
    scenarios = ("short", "one_doc", "tiny_many", "exact", "mixed", "placed", "all_whole") if full \
        else ("mixed", "short", "placed")
    cases = []
    for scenario in scenarios:
        for causal in (True, False):
            kv = {"short": 1, "one_doc": 4, "tiny_many": 2, "exact": 2, "mixed": 2, "placed": 2,
                  "all_whole": 1}[scenario]
            cases.append(VarlenCase(ulysses, ring, causal, "float64", scenario, kv_heads=kv))
    if full:
        cases += [
            VarlenCase(ulysses, ring, True, "float32", "mixed", head_dim=24),
            VarlenCase(ulysses, ring, False, "float32", "short", kv_heads=1),
            VarlenCase(ulysses, ring, True, "bfloat16", "mixed"),
            VarlenCase(ulysses, ring, False, "bfloat16", "tiny_many", kv_heads=4),
        ]
    return cases


# ---------------------------------------------------------------------------------------------- references
def per_document_reference(q, k, v, dout, lengths, causal, scale):
    """fp64 truth: the dense reference kernel on every document separately, concatenated (LSE ``[h, total]``)."""
    kernel = ReferenceKernel()
    outs, lses, dqs, dks, dvs = [], [], [], [], []
    start = 0
    for n in lengths:
        if n == 0:
            continue
        rows = slice(start, start + n)
        args = [x[rows].unsqueeze(0) for x in (q, k, v)]
        out, lse = kernel.forward(*args, causal, scale)
        dq, dk, dv = kernel.backward(dout[rows].unsqueeze(0), *args, out, lse, causal, scale)
        outs.append(out[0]), lses.append(lse[0]), dqs.append(dq[0]), dks.append(dk[0]), dvs.append(dv[0])
        start += n
    return {"out": torch.cat(outs), "lse": torch.cat(lses, dim=1), "dq": torch.cat(dqs), "dk": torch.cat(dks),
            "dv": torch.cat(dvs)}


def masked_cases_for(ulysses: int, ring: int, backend: str = "auto") -> List[VarlenCase]:
    """Windows on packed documents (``mixed``: chunks of 1 to 8 rows per document on these meshes): smaller and
    larger than a chunk, reaching back over document starts (which they must not cross), asymmetric non-causal,
    with softcap, sinks and GQA/MQA; and softcap with sinks without a window."""
    return [
        VarlenCase(ulysses, ring, True, "float32", "mixed", kv_heads=2, backend=backend, window=(3, 0), sinks=True),
        VarlenCase(ulysses, ring, True, "bfloat16", "mixed", kv_heads=1, backend=backend, window=(12, 0),
                   softcap=5.0),
        VarlenCase(ulysses, ring, False, "float32", "mixed", kv_heads=2, backend=backend, window=(2, 5),
                   softcap=4.0),
        VarlenCase(ulysses, ring, False, "bfloat16", "short", kv_heads=1, backend=backend, window=(9, 1),
                   sinks=True),
        VarlenCase(ulysses, ring, True, "float64", "tiny_many", kv_heads=4, backend=backend, window=(1, 0)),
        # windows on cut and whole documents (Note [document placement])
        VarlenCase(ulysses, ring, True, "float32", "placed", kv_heads=2, backend=backend, window=(6, 0),
                   sinks=True),
        VarlenCase(ulysses, ring, False, "float64", "placed", kv_heads=1, backend=backend, window=(3, 20)),
        # no window: softcap and sinks on the dense packed calls
        VarlenCase(ulysses, ring, False, "float32", "short", kv_heads=2, backend=backend, softcap=3.0, sinks=True),
    ]


def masked_per_document_reference(q, k, v, dout, lengths, causal, window, softcap, sinks, scale):
    """fp64 truth with masks: ``mask_cases.reference`` (an independent autograd implementation: explicit mask,
    softcap, a sink column) on every document separately, the window over positions in the document."""
    from mask_cases import reference

    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    sinks = None if sinks is None else sinks.detach().double().clone().requires_grad_()
    outs, lses, start = [], [], 0
    for n in lengths:
        if n:
            rows = slice(start, start + n)
            out, lse = reference(q[rows][None], k[rows][None], v[rows][None], sinks, causal, window, softcap, scale)
            outs.append(out[0]), lses.append(lse[0])
            start += n
    out = torch.cat(outs)
    out.backward(dout)
    truth = {"out": out.detach(), "lse": torch.cat(lses, dim=1).detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if sinks is not None:
        truth["dsinks"] = sinks.grad
    return truth


# ---------------------------------------------------------------------------------------------- world functions
def run_varlen_case(case: VarlenCase, mesh, device, seed: int = 0) -> dict:
    """Run one case on every rank of ``mesh``; return errors, baselines, checks and collective counts."""
    import usp.varlen as uv
    from attention_cases import count_collectives

    dtype = getattr(torch, case.dtype)
    lengths = scenario_lengths(case.scenario, case.ulysses, case.ring)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)  # on a GPU: the host-copy memo's path
    total = cu[-1]
    gen = torch.Generator().manual_seed(seed)
    shapes = {"q": (total, case.heads, case.head_dim), "k": (total, case.kv_heads, case.head_dim),
              "v": (total, case.kv_heads, case.head_dim), "dout": (total, case.heads, case.head_dim)}
    full = {n: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device) for n, s in shapes.items()}
    scale = case.head_dim ** -0.5
    sinks_full = (torch.randn(case.heads, generator=gen, dtype=torch.float64) + 1.0).float().to(device) \
        if case.sinks else None
    if case.masked:
        truth = masked_per_document_reference(*(full[n].double().cpu() for n in ("q", "k", "v", "dout")), lengths,
                                              case.causal, tuple(case.window), case.softcap,
                                              None if sinks_full is None else sinks_full.cpu(), scale)
    else:
        truth = per_document_reference(*(full[n].double() for n in ("q", "k", "v", "dout")), lengths, case.causal,
                                       scale)

    # the same kernel, same dtype, one device, the whole packed batch (each document one square sequence, so the
    # window over positions in the document is the kernel's bottom-right window)
    from usp.kernels.base import Mask, MaskNeeds
    from usp.ring import apply_sinks, sink_grad

    left, right = case.window
    mask = Mask(left, 0 if case.causal else right, case.softcap)
    backend = case_backend(case.backend, varlen=True)
    kernel = resolve_varlen_backend(backend, device, dtype, case.head_dim,
                                    needs=MaskNeeds(window=mask.windowed, softcap=bool(case.softcap)))
    nonempty = [n for n in lengths if n]
    seqs = VarlenSeqs(nonempty, nonempty)
    out1, lse1 = kernel.forward(full["q"], full["k"], full["v"], seqs, mask, scale)
    if case.sinks:
        out1, lse1 = (x[0] for x in apply_sinks(out1[None], lse1[None], sinks_full))
    grads1 = kernel.backward(full["dout"], full["q"], full["k"], full["v"], out1, lse1, seqs, mask, scale)
    single = {"out": out1, "lse": lse1, "dq": grads1[0], "dk": grads1[1], "dv": grads1[2]}
    if case.sinks:
        single["dsinks"] = sink_grad(full["dout"][None], out1[None], lse1[None], sinks_full)

    local = {n: uv.shard_varlen(t, cu_seqlens, mesh, causal=case.causal) for n, t in full.items()}
    q, k, v = (local[n].clone().requires_grad_() for n in ("q", "k", "v"))
    sinks = sinks_full.clone().requires_grad_() if case.sinks else None
    masks = dict(window_size=tuple(case.window), softcap=case.softcap, sinks=sinks) if case.masked else {}
    with count_collectives() as fwd_counts:
        out, lse = uv.long_context_attention_varlen(
            q, k, v, cu_seqlens, max(lengths), mesh, causal=case.causal, return_lse=True, backend=backend, **masks
        )
    fwd_counts = dict(fwd_counts)
    with count_collectives() as bwd_counts:
        out.backward(local["dout"])
    bwd_counts = dict(bwd_counts)

    pad = uv.padding_mask_varlen(cu_seqlens, mesh, causal=case.causal, device=device)
    padding_ok = bool(
        (out[pad] == 0).all() and torch.isneginf(lse[:, pad]).all()
        and all((t.grad[pad] == 0).all() for t in (q, k, v))
    )
    gathered = {
        "out": uv.gather_varlen(out.detach(), cu_seqlens, mesh, causal=case.causal),
        "lse": uv.gather_varlen(lse, cu_seqlens, mesh, dim=1, causal=case.causal),
        "dq": uv.gather_varlen(q.grad, cu_seqlens, mesh, causal=case.causal),
        "dk": uv.gather_varlen(k.grad, cu_seqlens, mesh, causal=case.causal),
        "dv": uv.gather_varlen(v.grad, cu_seqlens, mesh, causal=case.causal),
    }
    if case.sinks:  # a partial sum per rank: summed over the sequence-parallel ranks, like any parameter
        total = sinks.grad.clone()
        torch.distributed.all_reduce(total)
        gathered["dsinks"] = total
    local_positions = uv.position_ids_varlen(cu_seqlens, mesh, causal=case.causal, device=device)
    positions = uv.gather_varlen(local_positions, cu_seqlens, mesh, causal=case.causal)
    positions_ok = torch.equal(positions.cpu(), torch.cat([torch.arange(n) for n in lengths]))
    layout = uv.varlen_layout(cu_seqlens, mesh, causal=case.causal)
    result = {
        "case": asdict(case), "kernel": kernel.name, "padding_ok": padding_ok, "positions_ok": positions_ok,
        "layout_padding": layout.padding, "documents_cut": layout.cut_rows > 0,
        "placement": [len(layout.cut_docs)] + [len(docs) for docs in layout.whole_docs],
        "dtypes": {"out": str(out.dtype), "dq": str(q.grad.dtype), "lse": str(lse.dtype)},
        "shapes_ok": tuple(out.shape) == tuple(local["q"].shape) and tuple(lse.shape) == (case.heads, out.shape[0]),
        "collectives": {"forward": fwd_counts, "backward": bwd_counts}, "tensors": {},
    }
    for name, ref in truth.items():
        ref_norm = _norm(ref)
        error = _norm(gathered[name].double().cpu() - ref.cpu()) / ref_norm
        base = _norm(single[name].double().cpu() - ref.cpu()) / ref_norm
        result["tensors"][name] = {"error": error, "single_device_error": base,
                                   "finite": bool(torch.isfinite(gathered[name]).all())}
    if case.sinks:
        # dsinks_h = -sum over rows of p_sink * (dout . out): a sum that can cancel. Its error is the output's error
        # carried through that sum, so it is bounded by the output's (relative) error times the sum's condition
        # number sum |p_sink| |dout| |out| / |dsinks|, and its rounding floor is one ulp of that magnitude
        result["tensors"]["dsinks"]["condition"] = sinks_condition(sinks_full, truth["lse"], full["dout"],
                                                                   truth["out"], truth["dsinks"])
        result["tensors"]["dsinks"]["out_single_device_error"] = result["tensors"]["out"]["single_device_error"]
    return result


def expected_collectives(ulysses: int, ring: int, heads: int, kv_heads: int,
                         documents_cut: bool = True) -> Dict[str, Dict[str, int]]:
    """The dense path's counts (``attention_cases.expected_collectives``): same Ulysses pipeline and ring loop;
    no ring rotation when the layout cuts no document (Note [document placement])."""
    from attention_cases import Case, expected_collectives as dense_expected

    return dense_expected(Case(ulysses, ring, True, "float32", 1, 0, heads, kv_heads, 1), documents_cut)


def check_varlen_result(result: dict) -> List[str]:
    """Problems found in one case's result (empty list = pass)."""
    case = VarlenCase(**result["case"])
    problems = []
    if not result["shapes_ok"]:
        problems.append("output or LSE has the wrong local shape")
    if result["dtypes"]["out"] != f"torch.{case.dtype}" or result["dtypes"]["dq"] != f"torch.{case.dtype}":
        problems.append(f"dtype changed: {result['dtypes']}")
    if not result["padding_ok"]:
        problems.append("padding rows are not out=0 / lse=-inf / zero gradient")
    if not result["positions_ok"]:
        problems.append("gathered position_ids_varlen do not restart at every document")
    if case.scenario == "exact" and result["layout_padding"] != 0:
        problems.append(f"'exact' scenario padded {result['layout_padding']} tokens")
    for name, t in result["tensors"].items():
        bound = 1e-12 if case.dtype == "float64" else \
            2 * t["single_device_error"] + FP32_ULP * max(1.0, t.get("condition", 1.0))
        if "out_single_device_error" in t and case.dtype != "float64":  # dsinks: the output's bound carried over
            bound = max(bound, dsinks_bound(t["out_single_device_error"], t["condition"]))
        if not t["finite"]:
            problems.append(f"{name}: non-finite values")
        if not t["error"] <= bound:
            problems.append(f"{name}: error {t['error']:.3e} > bound {bound:.3e} "
                            f"(single-device error {t['single_device_error']:.3e})")
    expected = expected_collectives(case.ulysses, case.ring, case.heads, case.kv_heads, result["documents_cut"])
    for phase in ("forward", "backward"):
        if result["collectives"][phase] != expected[phase]:
            problems.append(f"{phase} collectives {result['collectives'][phase]} != expected {expected[phase]}")
    return problems


def validation_checks(mesh) -> Dict[str, Tuple[str, str]]:
    """Run every bad input on this rank; ``{check: (exception type, message)}`` (``("none", "")`` if none raised)."""
    import usp.varlen as uv

    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    layout = uv.varlen_layout(cu, mesh)
    t, h, kvh, d = layout.local_tokens, 4, 2, 16
    q, k, v = torch.randn(t, h, d), torch.randn(t, kvh, d), torch.randn(t, kvh, d)

    def attn(*args, **kwargs):
        return lambda: uv.long_context_attention_varlen(*args, **kwargs)

    checks = {
        "ndim": attn(q.unsqueeze(0), k, v, cu, None, mesh),
        "cu float": attn(q, k, v, cu.float(), None, mesh),
        "cu 2-D": attn(q, k, v, cu.unsqueeze(0), None, mesh),
        "cu start": attn(q, k, v, cu + 1, None, mesh),
        "cu decreasing": attn(q, k, v, torch.tensor([0, 7, 5]), None, mesh),
        "cu type": attn(q, k, v, "0,5,12", None, mesh),
        "local tokens": attn(q, k, v, torch.tensor([0, 5, 12 + 4 * mesh.ulysses * mesh.ring]), None, mesh),
        "max_seqlen": attn(q, k, v, cu, 3, mesh),
        "max_seqlen type": attn(q, k, v, cu, 7.5, mesh),
        "dtype": attn(q, k.double(), v, cu, None, mesh),
        "kv_heads": attn(q, torch.randn(t, 3, d), torch.randn(t, 3, d), cu, None, mesh),
        "head_dim": attn(q, torch.randn(t, kvh, 8), torch.randn(t, kvh, 8), cu, None, mesh),
        "mesh": attn(q, k, v, cu, None, "mesh"),
        "causal": attn(q, k, v, cu, None, mesh, causal=1),
        "softmax_scale": attn(q, k, v, cu, None, mesh, softmax_scale=-1.0),
        "backend unknown": attn(q, k, v, cu, None, mesh, backend="fa3"),
        "backend unavailable": attn(q, k, v, cu, None, mesh, backend="fa4"),
        "cudnn unavailable": attn(q, k, v, cu, None, mesh, backend="cudnn"),
        "shard length": lambda: uv.shard_varlen(torch.randn(11, 4), cu, mesh),
        "gather length": lambda: uv.gather_varlen(torch.randn(t + 1, 4), cu, mesh),
    }
    if mesh.ulysses > 1:
        checks["heads vs ulysses"] = attn(
            torch.randn(t, mesh.ulysses + 1, d), torch.randn(t, 1, d), torch.randn(t, 1, d), cu, None, mesh
        )
    results = {}
    for name, fn in checks.items():
        try:
            fn()
            results[name] = ("none", "")
        except Exception as exc:  # recorded, asserted by the parent
            results[name] = (type(exc).__name__, str(exc))
    return results


EXPECTED_ERRORS = {
    "ndim": ("ValueError", r"q must have 3 dims"),
    "cu float": ("TypeError", r"cu_seqlens must be an integer tensor"),
    "cu 2-D": ("ValueError", r"cu_seqlens must be 1-D"),
    "cu start": ("ValueError", r"cu_seqlens must start at 0"),
    "cu decreasing": ("ValueError", r"cu_seqlens must be non-decreasing"),
    "cu type": ("TypeError", r"cu_seqlens must be a 1-D integer torch.Tensor or a list of ints"),
    "local tokens": ("ValueError", r"q.shape\[0\]=\d+ but cu_seqlens .* usp.shard_varlen"),
    "max_seqlen": ("ValueError", r"max_seqlen=3 is smaller than the longest document .*7"),
    "max_seqlen type": ("TypeError", r"max_seqlen must be an int or None"),
    "dtype": ("TypeError", r"q, k, v must share one dtype"),
    "kv_heads": ("ValueError", r"heads \(q.shape\[1\]=4\) must be a positive multiple of kv_heads .*valid kv_heads"),
    "head_dim": ("ValueError", r"head_dim mismatch"),
    "mesh": ("TypeError", r"mesh must be a usp.SequenceParallelMesh"),
    "causal": ("TypeError", r"causal must be a bool"),
    "softmax_scale": ("ValueError", r"softmax_scale must be None \(head_dim \*\* -0.5\) or a finite positive float"),
    "backend unknown": (
        "ValueError",
        r"backend='fa3' has no varlen kernel; valid values .*'fa4'.*'fa2'.*'torch_flash'.*'cudnn'.*'reference'"
    ),
    "backend unavailable": ("ValueError", r"backend='fa4' cannot run here"),
    "cudnn unavailable": ("ValueError", r"backend='cudnn' cannot run here: varlen backend 'cudnn'"),
    "shard length": ("ValueError", r"x.shape\[0\]=11 must equal cu_seqlens\[-1\]=12"),
    "gather length": ("ValueError", r"x_local.shape\[0\]=\d+ must be the layout's local_tokens"),
    "heads vs ulysses": ("ValueError", r"divisible by the Ulysses degree ulysses=\d.*valid"),
}


def module_check(mesh, device) -> Dict[str, bool]:
    """``LongContextAttentionVarlen`` equals the functional form, including for non-contiguous ``[t, h, d]`` views
    (what the transformers integration passes), and reports the kernel it resolves."""
    import usp.varlen as uv

    cu = [0, 9, 10, 23]
    gen = torch.Generator().manual_seed(5)
    full = [torch.randn(23, h, 16, generator=gen, dtype=torch.float64).to(device) for h in (4, 2, 2)]
    local = [uv.shard_varlen(t, cu, mesh) for t in full]
    views = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in local]  # same values, [h, t, d] storage
    module = uv.LongContextAttentionVarlen(mesh, causal=True)
    functional = uv.long_context_attention_varlen(*local, cu, None, mesh, causal=True)
    return {
        "module equals functional": torch.equal(module(*local, cu_seqlens=cu, max_seqlen=13), functional),
        "non-contiguous views": torch.equal(module(*views, cu_seqlens=torch.tensor(cu)), functional),
        "resolved backend": module.resolved_backend(local[0]).name == "reference",
    }
