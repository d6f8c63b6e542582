# torchrun --nproc-per-node 4 examples/use_cpu.py                    (CPU, gloo; tests/test_examples.py runs it)
import torch, torch.distributed as dist, torch.nn.functional as F, usp

dist.init_process_group("gloo")
mesh = usp.SequenceParallelMesh(ulysses=2, ring=2)                 # 4 ranks: Ulysses 2 x ring 2
attn = usp.LongContextAttention(mesh, causal=True)

torch.manual_seed(0)                                               # the same full tensors on every rank
b, s, heads, kv_heads, d = 1, 1024, 8, 2, 64                       # GQA: 4 query heads per K/V head
q_full = torch.randn(b, s, heads, d)
k_full, v_full = torch.randn(b, s, kv_heads, d), torch.randn(b, s, kv_heads, d)
dout_full = torch.randn(b, s, heads, d)                            # the gradient of some loss w.r.t. the output

q, k, v = (usp.shard(x, mesh, dim=1, causal=True).requires_grad_() for x in (q_full, k_full, v_full))
out = attn(q, k, v)                                                # [b, s/4, heads, d]: this rank's shard
out.backward(usp.shard(dout_full, mesh, dim=1, causal=True))       # q.grad, k.grad, v.grad: shards too
pos = usp.position_ids(s, mesh, causal=True)                       # this shard's global positions (for RoPE)

# Check against PyTorch on the full tensors (float64), on every rank: the output and all three gradients.
full = [usp.gather(x, mesh, dim=1, causal=True) for x in (out.detach(), q.grad, k.grad, v.grad)]
q64, k64, v64 = (x.double().requires_grad_() for x in (q_full, k_full, v_full))
ref = F.scaled_dot_product_attention(q64.transpose(1, 2), k64.transpose(1, 2), v64.transpose(1, 2),
                                     is_causal=True, enable_gqa=True).transpose(1, 2)
ref.backward(dout_full.double())
for name, got, want in zip(("out", "dq", "dk", "dv"), full, (ref, q64.grad, k64.grad, v64.grad)):
    torch.testing.assert_close(got, want.float(), msg=lambda m: f"{name}: {m}")
if dist.get_rank() == 0:
    print(f"Ulysses {mesh.ulysses} x ring {mesh.ring}: output and gradients match PyTorch on the full sequence")
dist.destroy_process_group()
