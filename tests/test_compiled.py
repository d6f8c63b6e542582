"""torch.compile(fullgraph=True) of usp attention (Note [compiled attention] in usp/compiled.py) and FSDP2.

Compiled vs eager on 1x2, 2x1 and 2x2 (gloo, float64, the reference kernel: the same kernels run, so out and
gradients are compared bitwise), dense and packed, forward and backward; no graph break (a fullgraph compile whose
forward and backward graphs are recorded and must hold usp's ops); a call the ranks disagree on raises on every rank
under compile too; FSDP2 (HSDP over a (dp, cp) DeviceMesh) with activation checkpointing and compiled blocks equals
one process. Compile backend "aot_eager" (dynamo + AOT autograd, no code generation: inductor is slow on 2 cores).
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from distributed import run_world  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "train_compile_fsdp.py")


def _recording_backend(graphs):
    """aot_eager that keeps every forward/backward FX graph it is given."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


def _ops(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "usp" in str(n.target)]


def _sinks(heads, sinks):
    """``sinks`` case option: None, "grad" (a differentiable [heads] tensor) or "nograd"."""
    import torch

    if sinks is None:
        return lambda: None
    values = torch.randn(heads, dtype=torch.float64)
    return lambda: values.clone().requires_grad_(sinks == "grad")


def _results(out, q, k, v, lse, sinks):
    got = dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)
    if lse is not None:
        got["lse"] = lse
    if sinks is not None and sinks.requires_grad:
        got["dsinks"] = sinks.grad
    return got


def _dense_case(mesh, b, s, heads, kv_heads, d, dv=None, sinks=None, one_tensor=False, **options):
    """Eager and compiled (fullgraph) outputs and gradients of one call on the same shards, and the graphs.
    ``dv``: v's head_dim (MLA); ``sinks``: see ``_sinks``; ``one_tensor``: q, k and v are one tensor."""
    import torch
    import usp

    causal = options.get("causal", True)
    torch.manual_seed(0)
    dv = dv or d
    full = [torch.randn(b, s, n, e, dtype=torch.float64) for n, e in ((heads, d), (kv_heads, d), (kv_heads, dv))]
    dout = usp.shard(torch.randn(b, s, heads, dv, dtype=torch.float64), mesh, dim=1, causal=causal)
    make_sinks = _sinks(heads, sinks)

    def attention(q, k, v, sinks):
        return usp.long_context_attention(q, k, v, mesh, backend="reference", sinks=sinks, **options)

    graphs = []
    results = []
    for fn in (attention, torch.compile(attention, backend=_recording_backend(graphs), fullgraph=True)):
        q, k, v = (usp.shard(x, mesh, dim=1, causal=causal).requires_grad_() for x in full)
        if one_tensor:
            k = v = q
        sink_tensor = make_sinks()
        got = fn(q, k, v, sink_tensor)
        out, lse = got if options.get("return_lse") else (got, None)
        out.backward(dout)
        results.append(_results(out, q, k, v, lse, sink_tensor))
    return results, graphs


def _varlen_case(mesh, module: bool, dv=None, sinks=None, **masks):
    import torch
    import usp

    torch.manual_seed(1)
    cu = torch.tensor([0, 5, 23, 24, 40], dtype=torch.int32)  # odd lengths: padding on every mesh
    heads, kv_heads, d = 4, 2, 8
    dv = dv or d
    full = [torch.randn(int(cu[-1]), n, e, dtype=torch.float64) for n, e in ((heads, d), (kv_heads, d), (kv_heads, dv))]
    dout = usp.shard_varlen(torch.randn(int(cu[-1]), heads, dv, dtype=torch.float64), cu, mesh)
    layer = usp.LongContextAttention(mesh, causal=True, backend="reference", **masks)
    make_sinks = _sinks(heads, sinks)

    def attention(q, k, v, cu_seqlens, sinks):
        if module:
            return layer(q, k, v, cu_seqlens, 24, sinks=sinks)
        return usp.long_context_attention_varlen(q, k, v, cu_seqlens, 24, mesh, backend="reference",
                                                 return_lse=True, sinks=sinks, **masks)

    graphs, results = [], []
    for fn in (attention, torch.compile(attention, backend=_recording_backend(graphs), fullgraph=True)):
        q, k, v = (usp.shard_varlen(x, cu, mesh).requires_grad_() for x in full)
        sink_tensor = make_sinks()
        got = fn(q, k, v, cu, sink_tensor)
        out, lse = (got, None) if module else got
        out.backward(dout)
        results.append(_results(out, q, k, v, lse, sink_tensor))
    return results, graphs


def _check(results, graphs):
    import torch

    eager, compiled = results
    assert eager.keys() == compiled.keys(), (eager.keys(), compiled.keys())
    for name, a in eager.items():
        b = compiled[name]
        assert torch.equal(a, b), f"{name}: compiled differs from eager by {(a - b).abs().max().item()}"
    # one forward and one backward graph: no graph break, and usp's ops are in them
    assert len(graphs) == 2, f"{len(graphs)} graphs: dynamo broke the graph"
    assert _ops(graphs[0]) == ["usp.attention_forward.default"], _ops(graphs[0])
    assert _ops(graphs[1]) == ["usp.attention_backward.default"], _ops(graphs[1])


def _disagreeing_call(mesh, rank):
    """Ranks that differ in ``causal`` raise RankMismatchError on every rank, before any collective, compiled."""
    import torch
    import usp
    from usp.consistency import RankMismatchError

    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    fn = torch.compile(lambda q: usp.long_context_attention(q, q, q, mesh, causal=rank == 0, backend="reference"),
                       backend="aot_eager", fullgraph=True)
    try:
        fn(q)
    except RankMismatchError as error:
        return str(error)
    return "no error"


def _world(rank, world_size, meshes):
    import torch
    import usp

    torch._dynamo.config.cache_size_limit = 64
    report = {}
    for u, r in meshes:
        mesh = usp.SequenceParallelMesh(ulysses=u, ring=r)
        cases = {
            "causal_gqa": dict(b=2, s=16, heads=4, kv_heads=2, d=8),
            "noncausal_lse": dict(b=1, s=8, heads=4, kv_heads=4, d=8, causal=False, return_lse=True),
            # Ulysses: K/V heads replicated (1 -> 2), two head groups (8 heads, 4 K/V heads); ring: head chunks
            "mqa_replicated": dict(b=1, s=16, heads=4, kv_heads=1, d=8),
            "groups_chunks": dict(b=1, s=16, heads=8, kv_heads=4, d=8, head_chunks=2),
        }
        if world_size == 2:  # the mask options (Note [compiled attention]); 1x2 runs the sparse ring's kept halos
            cases.update({
                "window_softcap_sinks": dict(b=1, s=32, heads=4, kv_heads=2, d=8, window_size=(5, 0), softcap=5.0,
                                             sinks="grad"),
                "mla_window_noncausal": dict(b=1, s=16, heads=4, kv_heads=1, d=8, dv=4, causal=False,
                                             window_size=(3, 2), return_lse=True, sinks="nograd"),
                "mla_sinks_chunks": dict(b=1, s=16, heads=8, kv_heads=4, d=8, dv=16, head_chunks=2, sinks="grad"),
                "one_tensor_window": dict(b=1, s=16, heads=2, kv_heads=2, d=8, window_size=(4, 0), one_tensor=True),
            })
        for name, case in cases.items():
            torch._dynamo.reset()
            shapes = {key: case.pop(key) for key in ("b", "s", "heads", "kv_heads", "d")}
            _check(*_dense_case(mesh, **shapes, **case))
            report[f"{u}x{r} {name}"] = "ok"
        for module in (False, True):
            torch._dynamo.reset()
            _check(*_varlen_case(mesh, module))
            report[f"{u}x{r} varlen module={module}"] = "ok"
        if world_size == 2:
            torch._dynamo.reset()
            _check(*_varlen_case(mesh, False, dv=4, sinks="grad", softcap=5.0, window_size=(6, 0)))
            report[f"{u}x{r} varlen mla_window_softcap_sinks"] = "ok"
        torch._dynamo.reset()
        report[f"{u}x{r} disagree"] = _disagreeing_call(mesh, rank)
    return report


@pytest.fixture(scope="module", params=[2, 4])
def world_results(request):
    meshes = {2: [(1, 2), (2, 1)], 4: [(2, 2)]}[request.param]
    return meshes, run_world(request.param, _world, meshes, timeout=400)


def test_compiled_equals_eager_without_graph_breaks(world_results):
    meshes, reports = world_results
    for report in reports:
        for case, outcome in report.items():
            if case.endswith("disagree"):
                assert "causal differs" in outcome, (case, outcome)
            else:
                assert outcome == "ok", (case, outcome)
    assert len(reports[0]) == (12 if len(meshes) == 2 else 7) * len(meshes)


# ---------------------------------------------------------------------------------------------- FSDP2
def _load_example():
    spec = importlib.util.spec_from_file_location("train_compile_fsdp", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fsdp_world(rank, world_size, cp_kind, compile_backend):
    """HSDP over (dp 2, cp 2), usp on cp, checkpointed (and compiled) blocks: one step's loss and every gradient
    (after FSDP's reduction, gathered whole) against the same model and global batch on one process."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import usp

    ex = _load_example()
    torch.manual_seed(0)
    config = dict(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2)
    reference = ex.Llama(**config).double()
    device_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    mesh = usp.SequenceParallelMesh.from_device_mesh(device_mesh, **{f"{cp_kind}_dim": "cp"})
    model = ex.Llama(**config, mesh=mesh).double()
    model.load_state_dict(reference.state_dict())
    ex.parallelize(model, device_mesh, compile_backend)

    seqlen, batch = 16, 1
    tokens, labels = ex.make_batch(0, 2 * batch, seqlen, config["vocab"], "cpu")
    total = 2 * batch * (seqlen - 1)
    # one process: the mean loss over the whole global batch
    ref_loss = ex.token_loss_sum(reference, tokens, labels, torch.arange(seqlen)) / total
    ref_loss.backward()

    dp = device_mesh.get_local_rank("dp")
    rows = slice(dp * batch, (dp + 1) * batch)
    local = [usp.shard(x[rows], mesh, dim=1, causal=True) for x in (tokens, labels)]
    loss = ex.token_loss_sum(model, *local, usp.position_ids(seqlen, mesh)) * (world_size / total)
    loss.backward()
    summed = loss.detach().clone()
    dist.all_reduce(summed)
    errors = {"loss": abs(summed.item() / world_size - ref_loss.item())}
    for (name, p), (ref_name, ref) in zip(model.named_parameters(), reference.named_parameters()):
        grad = p.grad.full_tensor()
        errors[name] = (grad - ref.grad).abs().max().item() / max(ref.grad.abs().max().item(), 1e-30)
    return errors


@pytest.mark.parametrize("cp_kind,compile_backend", [("ring", "aot_eager"), ("ulysses", None)])
def test_fsdp2_hsdp_with_usp_equals_one_process(cp_kind, compile_backend):
    errors = run_world(4, _fsdp_world, cp_kind, compile_backend, timeout=300)
    for rank_errors in errors:
        worst = max(rank_errors.items(), key=lambda item: item[1])
        assert worst[1] < 1e-10, f"{cp_kind}: largest relative error {worst}"
