"""``--check``: before timing a configuration, compare usp's output and gradients on every mesh, and PyTorch CP's
on every rotate method, with the single-GPU kernel on the gathered sequence. The results are kept on the runner,
which attaches them to the timed records (the report never shows a time whose check failed)."""
from __future__ import annotations

import time
from typing import Optional

from bench_runtime import _t
from bench_suites import Task


def run_check(runner, task: Task, t0: float) -> None:
    """Compare every usp mesh and CP variant with the single-GPU kernel on the full sequence (out and grads)."""
    torch = _t()
    from usp import gather, long_context_attention, shard

    cfg = task.config
    kernel, scale, causal = runner.kernel, runner.scale(cfg), cfg.causal
    rtol = runner.args.check_rtol if runner.args.check_rtol is not None else (
        1e-4 if cfg.dtype in ("float32", "float64") else 2e-2)
    shape_q = (cfg.batch, cfg.seqlen, cfg.heads, cfg.head_dim)
    shape_kv = (cfg.batch, cfg.seqlen, cfg.kv_heads, cfg.head_dim)
    full = (runner.randn(shape_q, cfg, 21), runner.randn(shape_kv, cfg, 22), runner.randn(shape_kv, cfg, 23),
            runner.randn(shape_q, cfg, 24))  # q, k, v, dout: identical on every rank
    q, k, v, dout = full
    with torch.no_grad():
        ref_out, ref_lse = kernel.forward(q, k, v, causal, scale)
        ref = dict(zip(("out", "dq", "dk", "dv"),
                       (ref_out, *kernel.backward(dout, q, k, v, ref_out, ref_lse, causal, scale))))
    del ref_out, ref_lse

    def compare(got: dict) -> dict:
        errors = {}
        for name, value in got.items():
            expected = ref[name].float()
            err = (value.float() - expected).abs().max().item()
            errors[name] = {"max_abs_err": err, "rel_err": err / max(expected.abs().max().item(), 1e-12)}
        ok = all(e["rel_err"] <= rtol for e in errors.values())
        worst = max(errors, key=lambda n: errors[n]["rel_err"])
        return {"ok": ok, "rtol": rtol, "errors": errors,
                "summary": f"worst {worst} rel err {errors[worst]['rel_err']:.2e} (rtol {rtol:.0e})"}

    def usp_check(mesh):
        ql, kl, vl, dl = (shard(t, mesh, causal=causal).detach() for t in full)
        for t in (ql, kl, vl):
            t.requires_grad_(True)
        out = long_context_attention(ql, kl, vl, mesh, causal=causal, backend=kernel,
                                     head_chunks=runner.args.head_chunks)
        out.backward(dl)
        got = {name: gather(t.detach(), mesh, causal=causal) for name, t in
               (("out", out), ("dq", ql.grad), ("dk", kl.grad), ("dv", vl.grad))}
        return {"check": compare(got)}

    def cp_check(local, info):
        lq, lk, lv, ldout = local
        for t in (lq, lk, lv):
            t.requires_grad_(True)
        out = runner.cp.attention(lq, lk, lv, causal, scale)
        out.backward(ldout)
        out_f, dq_f, dk_f, dv_f = (t.transpose(1, 2) for t in  # [b, h, s, d] -> [b, s, h, d]
                                   runner.cp.unshard([out.detach(), lq.grad, lk.grad, lv.grad]))
        if dk_f.shape[2] != cfg.kv_heads:  # K/V were expanded for CP: sum each KV head's query group
            group = cfg.heads // cfg.kv_heads
            dk_f = dk_f.unflatten(2, (cfg.kv_heads, group)).sum(3)
            dv_f = dv_f.unflatten(2, (cfg.kv_heads, group)).sum(3)
        return {"check": compare({"out": out_f, "dq": dq_f, "dk": dk_f, "dv": dv_f})}

    def record(probe: Task, outcome: dict, extra: Optional[dict] = None) -> None:
        result = outcome.get("check") or {"ok": False, "summary": f"{outcome['status']}: {outcome.get('reason')}"}
        result = {**result, **(extra or {})}
        runner.check_results[runner.check_key(probe)] = result
        runner.log(f"check {probe.label} {cfg.describe()}: {'ok' if result['ok'] else 'FAILED'} "
                 f"{result['summary']}")

    for (u, r), mesh in runner.meshes.items():
        outcome = runner.guarded(lambda: usp_check(mesh), collective=True)
        record(Task("usp", cfg, mesh=(u, r), gpus=task.gpus), outcome)

    if runner.cp is not None and not ((runner.args.cp_mha_only or runner.suite.cp_mha_only)
                                    and cfg.heads != cfg.kv_heads):
        for method in runner.args.methods or runner.suite.methods:
            if method.startswith("cp_"):
                outcome, gqa_mode = runner._cp_with_gqa_fallback(cfg, method[3:], cp_check, source=full)
                record(Task("torch_cp", cfg, rotate=method[3:], gpus=task.gpus), outcome, {"gqa": gqa_mode})
    q = k = v = dout = full = ref = None  # release before timing (the closures above are done with them)
    runner.free()
    runner.log(f"check {cfg.describe()} done [{time.monotonic() - t0:.1f}s]")
