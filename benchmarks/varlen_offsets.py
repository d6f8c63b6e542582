"""torch_flash's varlen calls past 2**31 elements (Note [varlen row offsets] in ``usp/kernels/varlen.py``), one
case per process (a fault ends the CUDA context):

    for c in "600000 1111 32" "1048576 1942 32"; do
      python benchmarks/varlen_offsets.py $c --unsplit; python benchmarks/varlen_offsets.py $c; done

``TOKENS DOCUMENTS HEADS``: one causal call over ``DOCUMENTS`` equal documents (the last takes the remainder),
``HEADS`` query heads and ``--kv-heads`` K/V heads (default 8), head_dim 128, bf16, forward then backward.
``--unsplit``: PyTorch's kernel called once over every sequence, as usp did before the note (prints a fault if it
faults). Otherwise usp's ``torch_flash`` varlen kernel (split into runs where needed), and the first and last three
documents checked against calls of their own: out and LSE bitwise, gradients to bf16 rounding.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from usp.kernels.varlen import VarlenSeqs, _row_limit, resolve_varlen_backend  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tokens", type=int)
    parser.add_argument("documents", type=int)
    parser.add_argument("heads", type=int)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--unsplit", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    kernel = resolve_varlen_backend("torch_flash", device, torch.bfloat16, 128)
    base = args.tokens // args.documents
    lengths = [base] * args.documents
    lengths[-1] += args.tokens - base * args.documents
    seqs = VarlenSeqs(lengths, lengths)
    gen = torch.Generator(device=device).manual_seed(0)
    q, dout = (torch.randn(args.tokens, args.heads, 128, device=device, dtype=torch.bfloat16, generator=gen)
               for _ in range(2))
    k, v = (torch.randn(args.tokens, args.kv_heads, 128, device=device, dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    scale = 128 ** -0.5
    case = f"{args.tokens} tokens, {args.documents} documents, {args.heads}/{args.kv_heads} heads"
    if args.unsplit:
        cu_q, cu_k = seqs.cu_tensors(device)
        try:
            out, lse = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, seqs.max_q, seqs.max_k, 0.0,
                                                               True, False, scale=scale)[:2]
            philox = torch.zeros(2, dtype=torch.int64, device=device)
            torch.ops.aten._flash_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, seqs.max_q, seqs.max_k,
                                                     0.0, True, philox, philox, scale=scale)
            torch.cuda.synchronize()
            print(f"{case}, one call: no fault")
        except Exception as error:  # noqa: BLE001 - the fault is the result
            print(f"{case}, one call: {type(error).__name__}: {str(error).splitlines()[0]}")
        return
    runs = seqs.runs(_row_limit(q), _row_limit(k, v))
    out, lse = kernel.forward(q, k, v, seqs, True, scale)
    grads = kernel.backward(dout, q, k, v, out, lse, seqs, True, scale)
    torch.cuda.synchronize()
    worst = 0.0
    for a, b in ((0, 3), (args.documents - 3, args.documents)):
        r0, r1 = seqs.cu_q[a], seqs.cu_q[b]
        alone = VarlenSeqs(lengths[a:b], lengths[a:b])
        out_a, lse_a = kernel.forward(q[r0:r1], k[r0:r1], v[r0:r1], alone, True, scale)
        grads_a = kernel.backward(dout[r0:r1], q[r0:r1], k[r0:r1], v[r0:r1], out_a, lse_a, alone, True, scale)
        assert torch.equal(out_a, out[r0:r1]) and torch.equal(lse_a, lse[:, r0:r1]), "forward differs"
        for mine, whole in zip(grads_a, grads):
            worst = max(worst, float((mine.float() - whole[r0:r1].float()).abs().max() / mine.float().abs().max()))
    assert worst < 1e-2, worst
    print(f"{case}, usp torch_flash: {len(runs)} run(s), no fault; the first and last documents' out and LSE "
          f"equal to calls of their own, gradients within {worst:.1e} relative")


if __name__ == "__main__":
    main()
