"""The communication pieces on their own (4 gloo ranks): Ulysses all-to-all and the ring rotation."""
from __future__ import annotations

import pytest

from distributed import run_world


def _comm_world(rank, world_size):
    import torch
    import torch.distributed as dist

    from usp.comm import RingRotation, all_to_all_heads_to_seq, all_to_all_seq_to_heads

    checks = {}
    gen = torch.Generator().manual_seed(3)
    b, s_local, h, d = 2, 3, 8, 5
    full = torch.randn(b, s_local * world_size, h, d, generator=gen, dtype=torch.float64)
    local = full[:, rank * s_local:(rank + 1) * s_local].clone().requires_grad_()
    heads = all_to_all_seq_to_heads(local, None)
    hl = h // world_size
    checks["seq_to_heads"] = torch.equal(heads, full[:, :, rank * hl:(rank + 1) * hl])
    back = all_to_all_heads_to_seq(heads, None)
    checks["round_trip"] = torch.equal(back, local)
    # backward of each is the inverse: d/dlocal of sum(w * heads) = the matching slice of w
    weight = torch.randn(b, s_local * world_size, h, d, generator=gen, dtype=torch.float64)
    (heads * weight[:, :, rank * hl:(rank + 1) * hl]).sum().backward()
    checks["backward"] = torch.equal(local.grad, weight[:, rank * s_local:(rank + 1) * s_local])

    rotation = RingRotation(None, (rank + 1) % world_size, (rank - 1) % world_size, tag=7)
    mine = [torch.full((4,), float(rank)), torch.full((2, 3), float(rank) + 0.5)]
    rotation.start(mine)
    got = rotation.wait()
    prev = (rank - 1) % world_size
    checks["rotation"] = torch.equal(got[0], torch.full((4,), float(prev))) and torch.equal(
        got[1], torch.full((2, 3), prev + 0.5))
    try:
        rotation.start(got)
        rotation.start(got)
        checks["refuses_double_start"] = False
    except RuntimeError:
        checks["refuses_double_start"] = True
    rotation.wait()
    dist.barrier()
    return checks


@pytest.mark.timeout(180)
def test_all_to_all_and_rotation_on_four_ranks():
    per_rank = run_world(4, _comm_world, timeout=150)
    for rank, checks in enumerate(per_rank):
        assert all(checks.values()), (rank, checks)
