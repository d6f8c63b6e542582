"""What the ranks' agreement on every call costs (``usp.consistency``, Note [call agreement]).

    # CPU / gloo (timings of the check are meaningful, attention times are the reference kernel's)
    torchrun --nproc-per-node 2 benchmarks/consistency_overhead.py --device cpu
    torchrun --nproc-per-node 4 benchmarks/consistency_overhead.py --device cpu --mesh 2x2
    # GPU machine, NCCL data groups (the check itself always runs on the mesh's gloo consistency group)
    torchrun --nproc-per-node 2 benchmarks/consistency_overhead.py --device cuda --json $OUT/consistency.json

Measured on every rank, reported by rank 0 as JSON:

* ``validate_us``: the call's own validation (``_validate``), per call;
* ``check_us``: validation + agreement (``agree``: encode, one gloo all-gather of ``SLOTS`` int64, compare), per
  call, in blocks of ``--calls`` back-to-back calls; ``agreement_us = check_us - validate_us`` is what
  ``check_calls="always"`` adds to a call before any data moves; dense and packed (``--docs`` documents);
* ``attention``: one forward and one forward+backward of the whole call at each ``--seqlens``, with the agreement
  (``long_context_attention``) and without it (``_validate`` + the same attention steps), interleaved, median ms;
  ``overhead_pct`` relates the two.
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import usp
from usp.attention import _DENSE_DIMS, _validate, call_fields, sequence_parallel_attention
from usp.consistency import agree
from usp.layout import schedule_for


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_call_us(fn, group, calls, blocks):
    """Median over ``blocks`` of the mean time of ``calls`` back-to-back calls, each block started together."""
    fn()
    means = []
    for _ in range(blocks):
        dist.barrier(group=group)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(means)


def step_ms(fn, device, group, repeats):
    """Median wall ms of ``fn`` (device work included), each repeat started together on every rank."""
    times = []
    for _ in range(repeats):
        _sync(device)
        dist.barrier(group=group)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--mesh", default=None, help="UxR (default: 1xP, a ring over every rank)")
    p.add_argument("--seqlens", default=None, help="global sequence lengths of the attention rows "
                   "(default: 8192,32768,131072 on cuda; 512 on cpu)")
    p.add_argument("--heads", default=None, help="query/kv heads (default 32/8 on cuda, 4/2 on cpu)")
    p.add_argument("--head-dim", type=int, default=None, help="default 128 on cuda, 32 on cpu")
    p.add_argument("--backend", default=None, help="default 'auto' on cuda, 'reference' on cpu")
    p.add_argument("--docs", type=int, default=64, help="documents of the packed check")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--blocks", type=int, default=7)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    u, r = (int(x) for x in args.mesh.split("x")) if args.mesh else (1, world)
    mesh = usp.SequenceParallelMesh(ulysses=u, ring=r)
    group = mesh.consistency_group
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    heads, kv_heads = (int(x) for x in (args.heads or ("32/8" if cuda else "4/2")).split("/"))
    head_dim = args.head_dim or (128 if cuda else 32)
    backend = args.backend or ("auto" if cuda else "reference")
    seqlens = [int(s) for s in (args.seqlens or ("8192,32768,131072" if cuda else "512")).split(",")]
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "world": world, "mesh": f"{u}x{r}",
              "data_backend": dist.get_backend(), "heads": f"{heads}/{kv_heads}", "head_dim": head_dim,
              "dtype": str(dtype), "backend": backend}

    # ---- the check alone, on a small call (its cost does not depend on the tensors' sizes)
    s_local = 2 * u * r
    q = torch.randn(1, s_local, heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(1, s_local, kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)

    def validate():
        return _validate(q, k, v, mesh, True, None, backend, 1)

    def describe(checked):
        return dict(call_fields(q, k, v, mesh, _DENSE_DIMS, True, checked[1], False, checked[0]), head_chunks=1)

    validate_us = per_call_us(validate, group, args.calls, args.blocks)
    check_us = per_call_us(lambda: agree(mesh, "long_context_attention", validate, describe), group, args.calls,
                           args.blocks)
    result["dense"] = {"validate_us": validate_us, "check_us": check_us, "agreement_us": check_us - validate_us}

    from usp.varlen import _VARLEN_DIMS, _documents, _validate as validate_varlen

    doc = 4 * u * r
    cu = [i * doc for i in range(args.docs + 1)]
    t_local = usp.varlen_layout(cu, mesh).local_tokens
    vq = torch.randn(t_local, heads, head_dim, device=device, dtype=dtype)
    vk = torch.randn(t_local, kv_heads, head_dim, device=device, dtype=dtype)

    def validate_packed():
        return validate_varlen(vq, vk, vk, cu, None, mesh, True, None, backend)

    def describe_packed(checked):
        return dict(call_fields(vq, vk, vk, mesh, _VARLEN_DIMS, True, checked[2], False, checked[1]),
                    documents=_documents(checked[0]))

    validate_us = per_call_us(validate_packed, group, args.calls, args.blocks)
    check_us = per_call_us(lambda: agree(mesh, "long_context_attention_varlen", validate_packed, describe_packed),
                           group, args.calls, args.blocks)
    result["packed"] = {"docs": args.docs, "validate_us": validate_us, "check_us": check_us,
                        "agreement_us": check_us - validate_us}

    # ---- whole calls, with and without the agreement
    result["attention"] = []
    for seqlen in seqlens:
        s_local = seqlen // (u * r)
        q = torch.randn(1, s_local, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(1, s_local, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        dout = torch.randn_like(q)

        def checked():
            return usp.long_context_attention(q, k, v, mesh, causal=True, backend=backend)

        def unchecked():
            kernel, scale = _validate(q, k, v, mesh, True, None, backend, 1)
            return sequence_parallel_attention(q, k, v, mesh, kernel, schedule_for(True), scale, False)[0]

        row = {"seqlen": seqlen}
        for mode in ("fwd", "fwd_bwd"):
            def run(fn, mode=mode):
                if mode == "fwd":
                    with torch.no_grad():
                        fn()
                else:
                    fn().backward(dout)
            for fn in (checked, unchecked):
                run(fn)  # warm-up (kernel JIT, allocator)
            on, off = [], []
            for _ in range(args.repeats):
                on.append(step_ms(lambda: run(checked), device, group, 1))
                off.append(step_ms(lambda: run(unchecked), device, group, 1))
            on_ms, off_ms = statistics.median(on), statistics.median(off)
            row[mode] = {"checked_ms": on_ms, "unchecked_ms": off_ms, "overhead_pct": 100 * (on_ms / off_ms - 1)}
        result["attention"].append(row)

    if dist.get_rank() == 0:
        text = json.dumps(result, indent=1)
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
