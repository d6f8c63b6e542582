# torchrun --nproc-per-node 8 examples/use_gpu.py      (GPUs, NCCL, bfloat16; on 2 GPUs tests/test_examples.py runs it)
import os, torch, torch.distributed as dist, torch.nn.functional as F, usp

torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")
b, s, heads, kv_heads, d = 1, 32768, 32, 8, 128
# The planner models the machine it is told about: a preset (`usp-plan --list-presets`) or `usp-plan probe`'s YAML.
plan = usp.plan(dist.get_world_size(), seqlen=s, heads=heads, kv_heads=kv_heads, head_dim=d, batch=b,
                dtype=torch.bfloat16, causal=True, topology="dgx-h100")
mesh = usp.SequenceParallelMesh.from_plan(plan)
attn = usp.LongContextAttention(mesh, causal=True)

torch.manual_seed(0)                                               # the same full tensors on every rank
like = dict(device="cuda", dtype=torch.bfloat16)
q_full = torch.randn(b, s, heads, d, **like)
k_full, v_full = torch.randn(b, s, kv_heads, d, **like), torch.randn(b, s, kv_heads, d, **like)
dout_full = torch.randn(b, s, heads, d, **like)

q, k, v = (usp.shard(x, mesh, dim=1, causal=True).requires_grad_() for x in (q_full, k_full, v_full))
out = attn(q, k, v)                                                # [b, s/P, heads, d]: this rank's shard
out.backward(usp.shard(dout_full, mesh, dim=1, causal=True))
full = [usp.gather(x, mesh, dim=1, causal=True) for x in (out.detach(), q.grad, k.grad, v.grad)]


def sdpa(dtype):  # PyTorch's attention on the full tensors (K/V heads repeated for GQA): out, dq, dk, dv
    qf, kf, vf = (x.to(dtype).requires_grad_() for x in (q_full, k_full, v_full))
    kr, vr = (x.repeat_interleave(heads // kv_heads, dim=2) for x in (kf, vf))
    o = F.scaled_dot_product_attention(qf.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2),
                                       is_causal=True).transpose(1, 2)
    o.backward(dout_full.to(dtype))
    return [o.detach(), qf.grad, kf.grad, vf.grad]


# Check: against float32, usp's bfloat16 error is at most twice that of PyTorch's own bfloat16 attention.
ref, base = sdpa(torch.float32), sdpa(torch.bfloat16)
for name, got, want, same_dtype in zip(("out", "dq", "dk", "dv"), full, ref, base):
    err, base_err = ((x.float() - want).abs().max().item() for x in (got, same_dtype))
    assert err <= 2 * base_err + 1e-6, f"{name}: max error {err:.3g}, PyTorch bfloat16 {base_err:.3g}"
if dist.get_rank() == 0:
    print(f"{plan.summary()}\noutput and gradients within 2x of PyTorch's bfloat16 error on the full sequence")
dist.destroy_process_group()
