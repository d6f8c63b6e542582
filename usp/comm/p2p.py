"""Asynchronous ring rotation: send tensors to the next ring rank while receiving the previous rank's.

A ``RingRotation`` owns its receive buffers. ``start(tensors)`` posts one batched isend/irecv (one NCCL group)
and returns immediately; ``wait()`` returns the received tensors. Because at most one rotation per object is in
flight and ``wait`` must come before the next ``start``, the compute of step ``i`` overlaps the transfer for step
``i + 1`` (double buffering: the tensors being computed on are never the ones being received into).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist


class RingRotation:
    """One logical stream of ring transfers (e.g. K/V in forward, dK/dV in backward).

    Args:
        group: the ring's process group (``mesh.ring_group``).
        next_rank, prev_rank: global ranks of the ring neighbours.
        tag: message tag, distinct per concurrent rotation on the same ring (gloo matches on it; NCCL
            matches in issue order, which every rank keeps identical).
    """

    def __init__(self, group: Optional[dist.ProcessGroup], next_rank: int, prev_rank: int, tag: int = 0):
        self.group = group
        self.tag = tag
        self.next_rank = next_rank
        self.prev_rank = prev_rank
        self._requests: Optional[list] = None
        self._incoming: Optional[List[torch.Tensor]] = None
        self._spare: Optional[List[torch.Tensor]] = None

    def start(self, tensors: Sequence[torch.Tensor]) -> None:
        if self._requests is not None:
            raise RuntimeError("RingRotation.start called while a rotation is in flight; call wait() first")
        incoming = self._spare
        if incoming is None or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(incoming, tensors)):
            incoming = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
        self._spare = None
        ops = [dist.P2POp(dist.isend, t, self.next_rank, self.group, self.tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev_rank, self.group, self.tag) for t in incoming]
        self._requests = dist.batch_isend_irecv(ops)
        self._incoming = incoming

    def wait(self) -> List[torch.Tensor]:
        if self._requests is None:
            raise RuntimeError("RingRotation.wait called before start")
        for request in self._requests:
            request.wait()
        received, self._requests, self._incoming = self._incoming, None, None
        return received

    def recycle(self, tensors: Sequence[torch.Tensor]) -> None:
        """Hand back buffers no longer needed (already sent and computed on) to receive into next time."""
        self._spare = list(tensors)
