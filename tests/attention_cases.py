"""Correctness cases for the hybrid attention, run inside a distributed world (CPU/gloo or GPU/NCCL).

Every case builds the full tensors identically on every rank, runs usp on this rank's shards, gathers out, LSE and
dq/dk/dv, and compares them with an fp64 reference computed on the same (dtype-rounded) full inputs. The pass rule:
the distributed error (relative Frobenius norm, ||x - ref|| / ||ref||) is at most twice the error that the same
kernel in the same dtype has on one device against that reference, plus one float32 ulp (the accumulators are
float32). Max-abs errors are recorded too.
Collective calls are counted for every forward and backward and compared with the spec's counts
(``usp.spec.layer_collectives``) and with the planner's (``PassCost.a2a_calls``, ``ring_transfers``).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

FP32_ULP = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class Case:
    ulysses: int
    ring: int
    causal: bool
    dtype: str  # "float32" | "bfloat16" | "float16" | "float64"
    batch: int
    seqlen: int  # global
    heads: int
    kv_heads: int
    head_dim: int
    backend: str = "auto"
    head_chunks: int = 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def name(self) -> str:
        return (
            f"U{self.ulysses}xR{self.ring}-{'causal' if self.causal else 'full'}-{self.dtype}-b{self.batch}"
            f"-s{self.seqlen}-h{self.heads}/{self.kv_heads}-d{self.head_dim}-{self.backend}"
            + (f"-chunks{self.head_chunks}" if self.head_chunks != 1 else "")
        )


@contextlib.contextmanager
def count_collectives(p2p_dtypes: Optional[set] = None):
    """Count calls of the collectives usp uses (patched on the torch.distributed module, restored after); with
    ``p2p_dtypes``, also collect ``(tag, dtype)`` of every tensor the P2P calls carry."""
    counts = {"all_to_all_single": 0, "batch_isend_irecv": 0}
    originals = {name: getattr(dist, name) for name in counts}

    def wrap(name):
        def counted(*args, **kwargs):
            counts[name] += 1
            if name == "batch_isend_irecv" and p2p_dtypes is not None:
                p2p_dtypes.update((op.tag, str(op.tensor.dtype)) for op in args[0])
            return originals[name](*args, **kwargs)

        return counted

    for name in counts:
        setattr(dist, name, wrap(name))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def expected_collectives(case: Case, documents_cut: bool = True) -> Dict[str, Dict[str, int]]:
    """The collective calls of one case's layer (it returns the LSE) as the spec states them
    (``usp.spec.layer_collectives``), keyed as ``count_collectives`` counts them. ``documents_cut``: for packed
    documents, whether the layout cuts any document over the ring."""
    from usp.spec import layer_collectives

    calls = layer_collectives(case.ulysses, case.ring, case.heads, case.kv_heads, case.head_chunks, case.causal,
                              return_lse=True, documents_cut=documents_cut)
    return {phase: {"all_to_all_single": getattr(calls, phase).all_to_all,
                    "batch_isend_irecv": getattr(calls, phase).p2p} for phase in ("forward", "backward")}


def expected_transfer_dtypes(case: Case) -> set:
    """``(tag, dtype)`` of what the backward's ring rotations carry, as ``usp.spec.ring_transfer_dtypes`` states
    it: K/V (tag 0) and the dK/dV partial sums (tag 1); nothing without a ring."""
    from usp.ring import _DKV_TAG, _KV_TAG
    from usp.spec import head_groups, replicated_kv_heads, ring_transfer_dtypes

    if case.ring == 1:
        return set()
    replicated = replicated_kv_heads(case.kv_heads, case.ulysses)
    groups = head_groups(case.heads, replicated, case.ulysses, case.head_chunks)
    kv_per_pass = replicated // (case.ulysses * groups)  # the K/V heads of one head group's ring passes
    kv, dkv = ring_transfer_dtypes(case.ring, chunks_share_kv=case.head_chunks > kv_per_pass)
    name = {"input": str(case.torch_dtype), "float32": str(torch.float32)}
    sent = {(_DKV_TAG, name[dkv])}
    if case.ring > 2 or case.head_chunks > 1:  # a ring of 2 keeps the last K/V block: none travels backward
        sent.add((_KV_TAG, name[kv]))
    return sent


@functools.lru_cache(maxsize=None)
def planner_collectives(case: Case) -> Dict[str, Dict[str, int]]:
    """The collective calls the planner prices for the case's split (``PassCost.a2a_calls``, ``ring_transfers``),
    plus the forward's LSE trade the case asks for (a training layer returns none, so the planner leaves it out)."""
    from usp.planner import predict

    cand = predict(case.ulysses, case.ring, case.seqlen, case.heads, case.kv_heads, case.head_dim, case.batch,
                   causal=case.causal, head_chunks=case.head_chunks)
    lse = 1 if case.ulysses > 1 else 0
    return {"forward": {"all_to_all_single": cand.forward.a2a_calls + lse,
                        "batch_isend_irecv": cand.forward.ring_transfers},
            "backward": {"all_to_all_single": cand.backward.a2a_calls,
                         "batch_isend_irecv": cand.backward.ring_transfers}}


#: ``Case.backend`` values of this form name a kernel wrapped in the contract checker (``usp.kernels.contract``)
CONTRACT_PREFIX = "contract:"
#: the same, with the kernel's own sink support hidden: the ring applies the sinks around it (Note [attention
#: sinks] in ``usp/ring.py``), so one kernel runs both ways of computing them
GENERIC_SINKS_PREFIX = "contract-generic-sinks:"


def case_backend(name: str, varlen: bool = False):
    """The ``backend=`` argument for a case's backend name: the name itself, or for ``"contract:<name>"`` that
    kernel (dense or varlen) inside the checker that rejects anything Note [kernel contract] forbids
    (``"contract-generic-sinks:<name>"``: and claims no sink support)."""
    prefix = next((p for p in (CONTRACT_PREFIX, GENERIC_SINKS_PREFIX) if name.startswith(p)), None)
    if prefix is None:
        return name
    from usp.kernels import BACKENDS
    from usp.kernels.contract import ContractCheckingKernel, ContractCheckingVarlenKernel
    from usp.kernels.varlen import VARLEN_BACKENDS

    inner = name[len(prefix):]
    if varlen:
        return ContractCheckingVarlenKernel(VARLEN_BACKENDS[inner])
    return ContractCheckingKernel(BACKENDS[inner], native_sinks=prefix == CONTRACT_PREFIX)


def _max_abs(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.double())) if x.numel() else 0.0


def sinks_condition(sinks: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, out: torch.Tensor,
                    dsinks: torch.Tensor) -> float:
    """How much the sinks gradient ``dsinks_h = -sum over rows of p_sink (dout . out)`` amplifies the rows' errors:
    ``|sqrt(sum over rows (p_sink |dout| |out|)^2)| / |dsinks|`` over the heads, from the fp64 truth (``lse [...,
    h, rows]``, ``dout``/``out`` ``[..., rows, h, d]``). With a random ``dout`` the sum cancels (``|dsinks|`` is
    far below the sum of its terms' sizes), so a rounding of ``out`` that the other tensors' 2x rule tolerates moves
    it a lot; the rows' roundings are independent, so their effects add in quadrature (a worst-case sum of
    absolute values would allow errors larger than ``dsinks`` itself, and catch nothing)."""
    p_sink = torch.exp(sinks.double().cpu()[:, None] - lse.double().cpu())  # [..., h, rows]
    rows = (dout.double().cpu().norm(dim=-1) * out.double().cpu().norm(dim=-1)).transpose(-1, -2)
    terms = (p_sink * rows).reshape(-1, *p_sink.shape[-2:]).transpose(0, 1).reshape(p_sink.shape[-2], -1)
    return _norm(terms.norm(dim=1)) / _norm(dsinks)


def dsinks_bound(out_single_error: float, condition: float) -> float:
    """The bound a sinks gradient may also take (besides twice the single-device kernel's own error): the
    single-device output's error, doubled as every tensor's, carried through ``sinks_condition``, plus one float32
    ulp of that magnitude."""
    return (2 * out_single_error + FP32_ULP) * condition


def run_distributed(full: Dict[str, torch.Tensor], mesh, causal: bool, **options) -> dict:
    """usp on this rank's shards of the full ``q, k, v, dout`` (forward with ``return_lse``, backward), counting the
    collectives of each pass; returns the local tensors and the gathered out, LSE and dq/dk/dv."""
    import usp

    local = {name: usp.shard(t, mesh, dim=1, causal=causal) for name, t in full.items()}
    q, k, v = (local[n].clone().requires_grad_() for n in ("q", "k", "v"))
    with count_collectives() as fwd_counts:
        out, lse = usp.long_context_attention(q, k, v, mesh, causal=causal, return_lse=True, **options)
    fwd_counts = dict(fwd_counts)
    sent = set()
    with count_collectives(sent) as bwd_counts:
        out.backward(local["dout"])
    gathered = {
        "out": usp.gather(out.detach(), mesh, dim=1, causal=causal),
        "lse": usp.gather(lse, mesh, dim=2, causal=causal),
        "dq": usp.gather(q.grad, mesh, dim=1, causal=causal),
        "dk": usp.gather(k.grad, mesh, dim=1, causal=causal),
        "dv": usp.gather(v.grad, mesh, dim=1, causal=causal),
    }
    return {"out": out, "lse": lse, "q": q, "local": local, "gathered": gathered,
            "collectives": {"forward": fwd_counts, "backward": dict(bwd_counts)},
            "backward_p2p_dtypes": sorted(sent)}


def run_case(case: Case, mesh, device: torch.device, seed: int = 0) -> dict:
    """Run one case on every rank of ``mesh``; return errors, baselines, ratios and collective counts."""
    from usp.kernels import resolve_backend
    from usp.kernels.reference import ReferenceKernel

    dtype = case.torch_dtype
    gen = torch.Generator().manual_seed(seed)
    shape_q = (case.batch, case.seqlen, case.heads, case.head_dim)
    shape_kv = (case.batch, case.seqlen, case.kv_heads, case.head_dim)
    full = {
        name: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
        for name, shape in (("q", shape_q), ("k", shape_kv), ("v", shape_kv), ("dout", shape_q))
    }
    scale = case.head_dim ** -0.5

    # fp64 truth on the dtype-rounded inputs
    truth_kernel = ReferenceKernel()
    f64 = {name: t.double() for name, t in full.items()}
    out64, lse64 = truth_kernel.forward(f64["q"], f64["k"], f64["v"], case.causal, scale)
    dq64, dk64, dv64 = truth_kernel.backward(f64["dout"], f64["q"], f64["k"], f64["v"], out64, lse64, case.causal, scale)
    truth = {"out": out64, "lse": lse64, "dq": dq64, "dk": dk64, "dv": dv64}

    # the same kernel, same dtype, one device, whole sequence
    backend = case_backend(case.backend)
    kernel = resolve_backend(backend, device, dtype, case.head_dim)
    out1, lse1 = kernel.forward(full["q"], full["k"], full["v"], case.causal, scale)
    dq1, dk1, dv1 = kernel.backward(full["dout"], full["q"], full["k"], full["v"], out1, lse1, case.causal, scale)
    single = {"out": out1, "lse": lse1, "dq": dq1, "dk": dk1, "dv": dv1}

    run = run_distributed(full, mesh, case.causal, backend=backend, head_chunks=case.head_chunks)
    out, lse, q, local, gathered = run["out"], run["lse"], run["q"], run["local"], run["gathered"]
    fwd_counts, bwd_counts = run["collectives"]["forward"], run["collectives"]["backward"]
    result = {"case": asdict(case), "kernel": kernel.name, "tensors": {},
              "collectives": {"forward": fwd_counts, "backward": bwd_counts},
              "backward_p2p_dtypes": run["backward_p2p_dtypes"],
              "dtypes": {"out": str(out.dtype), "dq": str(q.grad.dtype), "lse": str(lse.dtype)},
              "shapes_ok": tuple(out.shape) == tuple(local["q"].shape) and tuple(lse.shape) == (
                  case.batch, case.heads, local["q"].shape[1])}
    for name, ref in truth.items():
        # relative Frobenius error (robust to a single double-rounded element); max-abs kept for the record
        ref_norm = _norm(ref)
        dist_err = _norm(gathered[name].double() - ref) / ref_norm
        base_err = _norm(single[name].double() - ref) / ref_norm
        bound = 2 * base_err + FP32_ULP
        result["tensors"][name] = {
            "error": dist_err,
            "single_device_error": base_err,
            "bound": bound,
            "ratio": dist_err / base_err if base_err > 0 else (0.0 if dist_err == 0 else float("inf")),
            "max_abs_error": _max_abs(gathered[name].double() - ref),
            "max_abs_single_device_error": _max_abs(single[name].double() - ref),
            "finite": bool(torch.isfinite(gathered[name]).all()),
        }
    return result


def check_result(result: dict) -> List[str]:
    """Problems found in one case's result (empty list = pass)."""
    case = Case(**result["case"])
    problems = []
    if not result["shapes_ok"]:
        problems.append("output or LSE has the wrong local shape")
    if result["dtypes"]["out"] != str(case.torch_dtype) or result["dtypes"]["dq"] != str(case.torch_dtype):
        problems.append(f"dtype changed: {result['dtypes']}")
    for name, t in result["tensors"].items():
        if not t["finite"]:
            problems.append(f"{name}: non-finite values")
        if not t["error"] <= t["bound"]:
            problems.append(
                f"{name}: error {t['error']:.3e} > bound {t['bound']:.3e} "
                f"(single-device error {t['single_device_error']:.3e}, ratio {t['ratio']:.2f})"
            )
    sent = {tuple(x) for x in result["backward_p2p_dtypes"]}
    if sent != expected_transfer_dtypes(case):
        problems.append(f"backward ring transfers carried {sorted(sent)}, usp.spec says "
                        f"{sorted(expected_transfer_dtypes(case))}")
    expected, priced = expected_collectives(case), planner_collectives(case)
    for phase in ("forward", "backward"):
        if result["collectives"][phase] != expected[phase]:
            problems.append(f"{phase} collectives {result['collectives'][phase]} != usp.spec's {expected[phase]}")
        if result["collectives"][phase] != priced[phase]:
            problems.append(f"{phase} collectives {result['collectives'][phase]} != the planner's {priced[phase]}")
    return problems


def run_cases(cases: List[Case], device: torch.device, placement: str = "ulysses_inner") -> List[dict]:
    """Run every case (building one mesh per distinct (U, R)); every rank returns its results, rank 0's matter."""
    import usp

    meshes: Dict[tuple, object] = {}
    results = []
    for case in cases:
        key = (case.ulysses, case.ring)
        if key not in meshes:
            meshes[key] = usp.SequenceParallelMesh(ulysses=case.ulysses, ring=case.ring, placement=placement)
        results.append(run_case(case, meshes[key], device))
    return results


def standard_cases(ulysses: int, ring: int, dtypes=("float32", "bfloat16"), backend: str = "auto",
                   head_dims=(64, 80), heads: int = 8, base_len: Optional[int] = None) -> List[Case]:
    """The CPU matrix for one mesh: causal and not, MHA and GQA (kv_heads 1, 2 and < U), two head_dims, two
    sequence lengths chosen so the local shard (and each zigzag chunk) has an odd length."""
    from usp.spec import required_multiple

    cases = []
    kv_options = [heads, 2, 1]
    for dtype in dtypes:
        for causal in (True, False):
            multiple = required_multiple(ulysses, ring, causal)
            for i, kv_heads in enumerate(kv_options):
                head_dim = head_dims[i % len(head_dims)]
                odd = (5, 11, 17)[i] if base_len is None else base_len
                cases.append(Case(ulysses, ring, causal, dtype, batch=1 + i % 2, seqlen=multiple * odd,
                                  heads=heads, kv_heads=kv_heads, head_dim=head_dim, backend=backend))
    return cases


def expected_mask_collectives(case: Case, window_size, ring_rank: int) -> Dict[str, Dict[str, int]]:
    """``expected_collectives`` for a masked layer, as the spec states them (``usp.spec.layer_collectives`` with
    the window: the ring's P2P calls are ``usp.spec.SlidingWindow.collectives`` of this ring rank, only the steps
    its window reaches; a window that binds nowhere is the dense count), per head group and head chunk."""
    from usp.spec import layer_collectives

    calls = layer_collectives(case.ulysses, case.ring, case.heads, case.kv_heads, case.head_chunks, case.causal,
                              return_lse=True, window_size=window_size, seqlen=case.seqlen, ring_rank=ring_rank)
    return {phase: {"all_to_all_single": getattr(calls, phase).all_to_all,
                    "batch_isend_irecv": getattr(calls, phase).p2p} for phase in ("forward", "backward")}
