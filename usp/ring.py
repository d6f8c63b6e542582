"""Ring attention: Q stays, K/V (and in backward dK/dV) travel round the ring; one loop for every variant.

The schedule (``usp.layout``) says which block each step computes; the kernel (``usp.kernels``) computes it.
Forward: ``R - 1`` K/V rotations, each started before the current step's compute (double-buffered), partial results
merged with float32 arithmetic (``usp.merge``; Note [narrow sums] for where the sums are stored). Backward (Note
[reverse backward] below): the forward's steps in reverse, K/V (``R - 2`` rotations) and the dK/dV partial sums
(``R - 1``) travelling the other way round,
every transfer overlapping a block's compute. Block backward uses the *final* merged out and LSE, which is what makes it
exact.

Note [head chunks]. At extreme lengths the ring's working set (float32 out/dQ/dK/dV sums when R > 2, the kernels'
block outputs and gradients, their workspaces, the K/V and dK/dV receive buffers) is a multiple of the local
Q/K/V. Attention is independent per head, so ``head_chunks = C`` runs the whole ring once per group of ``h / C``
query heads (with their ``h_kv / C`` K/V heads), writing each group's result into slices of the outputs: the
working set shrinks ``C`` times while the bytes moved stay the same (``C`` times as many, ``C`` times smaller
messages). The backward cannot keep every group's last K/V block (that would cost a whole K/V), so each group
fetches it first: one exposed K/V transfer of ``1 / C`` of the local K/V per group. With more chunks than K/V
heads (MQA, or GQA at the longest lengths) each K/V head's query heads are split over several chunks, which all
carry that K/V head round the ring (its bytes move once per chunk) and sum its dK/dV in float32 before the one
rounding. Each chunk writes its dQ straight into the slice of the gradient it owns.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from .comm.p2p import RingRotation
from .kernels.base import AttentionKernel
from .merge import merge_attention_
from .mesh import SequenceParallelMesh
from .spec import narrow_sums, ring_transfer_dtypes

Tensor = torch.Tensor
_KV_TAG, _DKV_TAG = 0, 1


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _rows(x: Tensor, rows: slice) -> Tensor:
    """Row (sequence) slice of a ``[b, s, ...]`` tensor."""
    return x if rows == slice(None) else x[:, rows]


def _lse_rows(lse: Tensor, rows: slice) -> Tensor:
    """Row slice of a ``[b, h, s]`` LSE as a view (for merging into it)."""
    return lse if rows == slice(None) else lse[:, :, rows]


class _KernelLse:
    """The final LSE in the form Note [kernel contract] promises a kernel's backward: contiguous, per row slice.

    A row slice of ``[b, h, s]`` (the zigzag half blocks) or a head-chunk slice of it is strided; flash-attn 2 reads
    the LSE by pointer as a dense array and computes wrong gradients from a strided one without any error. Each
    distinct slice is copied once per backward pass (the LSE is ``1 / d`` of the queries' size).
    """

    def __init__(self, lse: Tensor):
        self.lse = lse
        self._slices = {}

    def rows(self, rows: slice) -> Tensor:
        key = (rows.start, rows.stop, rows.step)
        if key not in self._slices:
            self._slices[key] = _lse_rows(self.lse, rows).contiguous()
        return self._slices[key]


def _rotation(mesh: SequenceParallelMesh, tag: int, forward: bool = True) -> RingRotation:
    """K/V go to the next ring rank in forward; the backward walks the ring the other way."""
    nxt, prev = mesh.ring_next_global_rank, mesh.ring_prev_global_rank
    return RingRotation(mesh.ring_group, nxt if forward else prev, prev if forward else nxt, tag)


def ring_forward(
    q: Tensor, k: Tensor, v: Tensor, mesh: SequenceParallelMesh, kernel: AttentionKernel, schedule, scale: float,
    head_chunks: int = 1, sinks: Optional[Tensor] = None, ready: Optional[Callable[[], None]] = None,
) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """Local ``q [b, s, h, d]``, ``k, v [b, s, h_kv, d]`` (this ring rank's sequence) -> ``(out, lse, last_kv)``.

    ``last_kv`` is the K/V block held at the last step (ring rank ``r + 1``'s); the backward starts from it.
    ``head_chunks > 1`` runs the ring once per group of heads (Note [head chunks]); ``last_kv`` is then empty.
    ``sinks [h]`` (or None): Note [attention sinks]; ``out`` and ``lse`` include them.
    ``ready`` (or None): called once step 0's blocks are launched, before the first P2P (Note [deferred
    agreement] in ``usp.consistency``).
    """
    if head_chunks == 1:
        return _ring_forward_pass(q, k, v, mesh, kernel, schedule, scale, sinks, ready)
    out = torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device)
    lse: Optional[Tensor] = None
    for heads, kv_heads in _chunk_slices(q.shape[2], k.shape[2], head_chunks):
        out_c, lse_c, _ = _ring_forward_pass(q[:, :, heads], k[:, :, kv_heads], v[:, :, kv_heads], mesh, kernel,
                                             schedule, scale, None if sinks is None else sinks[heads], ready)
        ready = None  # the first pass settled the call
        out[:, :, heads] = out_c
        if lse is None:
            lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=lse_c.dtype, device=q.device)
        lse[:, heads] = lse_c
    return out, lse, []


def kept_kv_shapes(k_shape, v_shape, mesh: SequenceParallelMesh, schedule, head_chunks: int = 1) -> List[tuple]:
    """Shapes of the ``last_kv`` that ``ring_forward`` returns on this ring rank, from shapes alone: the last
    visiting K/V block (``R > 1``, one head chunk), the received halos in step order when a sparse schedule keeps
    them (``schedule.keep_halos``; they depend on the ring rank), else none (what the autograd functions save)."""
    ring_size, local_len = mesh.ring, k_shape[1]
    if ring_size == 1 or head_chunks != 1:
        return []
    if not schedule.sparse:
        rows = schedule.traveling_rows(local_len)
        if schedule.steps(ring_size) == 1:
            return []
        return [(k_shape[0], rows) + tuple(k_shape[2:]), (v_shape[0], rows) + tuple(v_shape[2:])]
    if not schedule.keep_halos(ring_size, local_len):
        return []
    shapes = []
    for step in schedule.active_steps(ring_size, local_len):
        halo = schedule.halo(step, mesh.ring_rank, ring_size, local_len)
        if halo is not None:
            shapes += [(x[0], halo.stop - halo.start) + tuple(x[2:]) for x in (k_shape, v_shape)]
    return shapes


def saved_argument(name: str, x: Optional[Tensor]):
    """A ``saved_layout`` entry for an argument saved as is (``None`` saved as ``("none", None, None)``)."""
    return ("none", None, None) if x is None else (name, tuple(x.shape), x.dtype)


def ring_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, last_kv: List[Tensor],
    mesh: SequenceParallelMesh, kernel: AttentionKernel, schedule, scale: float, head_chunks: int = 1,
    deterministic: bool = False, sinks: Optional[Tensor] = None, sinks_grad: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Gradients of ``ring_forward`` (same ``head_chunks`` and ``sinks``); ``last_kv`` as it returned.
    ``deterministic``: the kernels' deterministic backward (every sum usp does itself has a fixed order already).
    Returns ``(dq, dk, dv, dsinks)``: ``dsinks [h]`` (this rank's partial sum) when ``sinks_grad``, else None."""
    if head_chunks == 1:
        return _ring_backward_pass(dout, q, k, v, out, lse, last_kv, mesh, kernel, schedule, scale,
                                   deterministic=deterministic, halos_kept=True, sinks=sinks, sinks_grad=sinks_grad)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dsinks = torch.empty_like(sinks) if sinks is not None and sinks_grad else None
    shared = head_chunks > k.shape[2]  # several chunks per K/V head: their dK/dV are summed in float32
    kv_sum: List[Tensor] = []
    slices = _chunk_slices(q.shape[2], k.shape[2], head_chunks)
    for index, (heads, kv_heads) in enumerate(slices):
        _, dk_c, dv_c, dsinks_c = _ring_backward_pass(
            dout[:, :, heads], q[:, :, heads], k[:, :, kv_heads], v[:, :, kv_heads], out[:, :, heads],
            lse[:, heads], [], mesh, kernel, schedule, scale, dq_out=dq[:, :, heads], wide_dkv=shared,
            deterministic=deterministic, sinks=None if sinks is None else sinks[heads], sinks_grad=sinks_grad,
        )
        if dsinks is not None:
            dsinks[heads] = dsinks_c
        if not shared:
            dk[:, :, kv_heads], dv[:, :, kv_heads] = dk_c, dv_c
            continue
        kv_sum = [dk_c, dv_c] if not kv_sum else [kv_sum[0].add_(dk_c), kv_sum[1].add_(dv_c)]
        if index + 1 == len(slices) or slices[index + 1][1] != kv_heads:  # last chunk of this K/V head
            dk[:, :, kv_heads], dv[:, :, kv_heads] = kv_sum
            kv_sum = []
    return dq, dk, dv, dsinks


def _chunk_slices(heads: int, kv_heads: int, chunks: int):
    """Query-head and K/V-head slices of each chunk; a chunk's query heads always read its K/V heads (GQA).

    ``chunks <= kv_heads``: chunk ``c`` has ``kv_heads / chunks`` K/V heads and their query heads. More chunks than
    K/V heads (a multiple of them): each K/V head's query heads are split over ``chunks / kv_heads`` chunks, which
    all carry that one K/V head round the ring.
    """
    hq = heads // chunks
    if chunks <= kv_heads:
        assert heads % chunks == 0 and kv_heads % chunks == 0, (heads, kv_heads, chunks)
        hk = kv_heads // chunks
        return [(slice(c * hq, (c + 1) * hq), slice(c * hk, (c + 1) * hk)) for c in range(chunks)]
    assert heads % chunks == 0 and chunks % kv_heads == 0, (heads, kv_heads, chunks)
    group = heads // kv_heads  # query heads per K/V head
    return [(slice(c * hq, (c + 1) * hq), slice(c * hq // group, c * hq // group + 1)) for c in range(chunks)]


def _ring_forward_pass(q, k, v, mesh, kernel, schedule, scale, sinks=None, ready=None):
    """One pass round the ring over all of ``q``'s heads (Note [narrow sums] for the accumulator dtype), with
    ``sinks`` (Note [attention sinks]) for those heads; ``ready`` as ``ring_forward``'s."""
    sink = _Sinks(sinks, kernel, q)
    if schedule.sparse:
        out, lse, kept = _sparse_forward_pass(q, k, v, mesh, kernel, schedule, scale, sink, ready)
    else:
        out, lse, kept = _dense_forward_pass(q, k, v, mesh, kernel, schedule, scale, sink, ready)
    return sink.finish_forward(out, lse) + (kept,)


def _dense_forward_pass(q, k, v, mesh, kernel, schedule, scale, sink: "_Sinks", ready=None):
    ring_size, ring_rank, local_len = mesh.ring, mesh.ring_rank, q.shape[1]
    steps = schedule.steps(ring_size)
    kv = [k, v] if steps == 1 else [k.contiguous(), v.contiguous()]
    traveling = _traveling(kv, schedule.traveling_rows(local_len))
    rotation = _rotation(mesh, _KV_TAG)
    out: Optional[Tensor] = None
    lse: Optional[Tensor] = None
    for step in range(steps):
        # the first transfer starts under step 0's block, or (Note [deferred agreement]) once it is launched
        # and the ranks have agreed on the call
        if step + 1 < steps and (step or ready is None):
            rotation.start(traveling if step == 0 else kv)
        task = schedule.block(step, ring_rank, ring_size, local_len)
        if task is not None:
            block_out, block_lse = kernel.forward(
                _rows(q, task.q_rows), _rows(kv[0], task.kv_rows), _rows(kv[1], task.kv_rows), task.kernel_mask, scale,
                **(sink.forward_kwargs() if step == 0 else {}),
            )
            if out is None:
                # step 0 always covers every row: keep the kernel's result as is (no copy when R == 1); it is
                # also the call that carries the sinks (Note [kernel sinks])
                assert step == 0 and task.q_rows == slice(None)
                out, lse = block_out, block_lse
            else:
                if not _narrow_sums(ring_size) and out.dtype != _accumulator_dtype(q.dtype):
                    out = out.to(_accumulator_dtype(q.dtype))
                merge_attention_(_rows(out, task.q_rows), _lse_rows(lse, task.q_rows), block_out, block_lse)
        if step == 0 and ready is not None:
            ready()
            if steps > 1:
                rotation.start(traveling)
        if step + 1 < steps:
            received = rotation.wait()
            if step > 0:
                rotation.recycle(kv)  # our own receive buffer, sent and computed on: reuse it
            kv = received
    return out.to(q.dtype), lse, (kv if steps > 1 else [])


def _prefix_sum(block: Tensor, prefix: Tensor, dtype: torch.dtype) -> Tensor:
    """``block`` with ``prefix`` added to its first rows, in ``dtype`` or wider (one rounding at the end)."""
    total = block.to(torch.promote_types(block.dtype, dtype))
    total[:, :prefix.shape[1]].add_(prefix)
    return total


def _traveling(kv: List[Tensor], rows: int) -> List[Tensor]:
    """The K/V rows that go round the ring: all, or the prefix ``rows`` of a packed batch's sequence (its cut
    section, Note [document placement] in ``usp/varlen.py``; a contiguous view with batch 1)."""
    if rows == kv[0].shape[1]:
        return kv
    return [t[:, :rows].contiguous() for t in kv]


def _narrow_sums(ring_size: int) -> bool:
    """Note [narrow sums]. Every row of the output, dQ and dK/dV sums the contributions of at most ``ring_size``
    blocks. With two, the running sum is kept in the kernels' dtype: the merge and PyTorch's half-precision
    ``add_`` compute in float32 and round once, exactly what a float32 accumulator followed by a cast does, with
    no float32 buffers, no casts, and half the dK/dV bytes on the wire. With more, float32 accumulators. The rule
    is ``usp.spec.narrow_sums`` (the planner prices the same); the sparse ring of a window always sums in
    float32."""
    return narrow_sums(ring_size)


class _GradientSum:
    """The sum of block gradients landing on row slices of a ``shape`` tensor (Note [narrow sums]).

    In the narrow case a first partial block is held (not added to zeros) until a full block arrives, so a ring of
    two costs one ``add_`` per tensor and no extra buffer.
    """

    def __init__(self, shape, dtype: torch.dtype, device, narrow: bool, out: Optional[Tensor] = None):
        self.shape, self.dtype, self.device, self.narrow = shape, dtype, device, narrow
        #: where the sum is written (a slice of the caller's gradient, head chunks): nothing is held then
        self.out = out if narrow else None
        self.total: Optional[Tensor] = None
        self.pending: List[Tuple[slice, Tensor]] = []

    def add(self, rows: slice, block: Tensor) -> None:
        if self.total is None:
            if self.out is not None:
                self.total = self.out
                if rows == slice(None):
                    self.total.copy_(block)
                    return
                self.total.zero_()
            elif rows != slice(None) and self.narrow:
                self.pending.append((rows, block))
                return
            elif rows == slice(None):
                self.total = block if block.dtype == self.dtype else block.to(self.dtype)
                for held_rows, held in self.pending:
                    _rows(self.total, held_rows).add_(held)
                self.pending = []
                return
            else:
                self.total = self.materialize()
        _rows(self.total, rows).add_(block)

    def materialize(self) -> Tensor:
        """The sum as one tensor (zeros where nothing landed)."""
        if self.total is None:
            self.total = self.out.zero_() if self.out is not None else torch.zeros(
                self.shape, dtype=self.dtype, device=self.device)
            for held_rows, held in self.pending:
                _rows(self.total, held_rows).add_(held)
            self.pending = []
        return self.total


def _ring_backward_pass(dout, q, k, v, out, lse, last_kv, mesh, kernel, schedule, scale, dq_out=None,
                        wide_dkv=False, deterministic=False, halos_kept=False, sinks=None, sinks_grad=False):
    """Gradients of one ``_ring_forward_pass``, walking the forward's steps in reverse. ``dq_out``: write dQ there
    (a slice of the caller's gradient) instead of a new tensor; ``wide_dkv``: sum dK/dV in float32 and return
    them unrounded (head chunks sharing a K/V head add theirs up before the one rounding).

    Note [reverse backward]. Step ``j`` of the forward computed this rank's queries against ring rank
    ``r - j``'s K/V. The backward visits ``j = R-1, ..., 0``: it starts on ``last_kv`` (kept by the forward, so no
    transfer is waited for), passes K/V to the *previous* rank, and the dK/dV partial sums of each block
    follow one step behind in the same direction. At ``j = 0`` the block is our own (no K/V to receive), and the
    partial sum that arrives carries every other rank's contribution: ``R - 2`` K/V and ``R - 1`` dK/dV transfers,
    and the last one overlaps the diagonal block's compute instead of trailing it. With an empty ``last_kv`` (head
    chunks) the first block is fetched from the next rank first: one K/V transfer more, exposed.

    ``sinks``/``sinks_grad``: the forward's sinks and whether their gradient is wanted (Note [attention sinks]);
    returns ``(dq, dk, dv, dsinks or None)``.
    """
    sink = _Sinks(sinks, kernel, q, sinks_grad)
    if schedule.sparse:
        grads = _sparse_backward_pass(dout, q, k, v, out, lse, last_kv if halos_kept else None, mesh, kernel,
                                      schedule, scale, dq_out, wide_dkv, deterministic, sink)
    else:
        grads = _dense_backward_pass(dout, q, k, v, out, lse, last_kv, mesh, kernel, schedule, scale, dq_out,
                                     wide_dkv, deterministic, sink)
    return grads + (sink.finish_backward(dout, out, lse),)


def _dense_backward_pass(dout, q, k, v, out, lse, last_kv, mesh, kernel, schedule, scale, dq_out, wide_dkv,
                         deterministic, sink: "_Sinks"):
    ring_size, ring_rank, local_len = mesh.ring, mesh.ring_rank, q.shape[1]
    kernel_lse = _KernelLse(lse)
    steps, traveling_rows = schedule.steps(ring_size), schedule.traveling_rows(local_len)
    if steps == 1:
        task = schedule.block(0, ring_rank, ring_size, local_len)
        dq, dk, dv = sink.collect(kernel.backward(dout, q, k, v, out, kernel_lse.rows(task.q_rows), task.kernel_mask,
                                                  scale, deterministic=deterministic, **sink.backward_kwargs()))
        if dq_out is not None:
            dq = dq_out.copy_(dq)
        if wide_dkv:
            dk, dv = dk.to(_accumulator_dtype(k.dtype)), dv.to(_accumulator_dtype(v.dtype))
        return dq, dk, dv
    narrow = _narrow_sums(ring_size)
    acc = q.dtype if narrow else _accumulator_dtype(q.dtype)
    # what the dK/dV partial sums travel in (the planner prices the same bytes)
    kv_acc = k.dtype if ring_transfer_dtypes(ring_size, wide_dkv)[1] == "input" else _accumulator_dtype(k.dtype)
    kv_rotation = _rotation(mesh, _KV_TAG, forward=False)
    dkv_rotation = _rotation(mesh, _DKV_TAG, forward=False)
    if last_kv:
        kv = last_kv
    else:
        kv_rotation.start(_traveling([k.contiguous(), v.contiguous()], traveling_rows))
        kv = kv_rotation.wait()
    dq = _GradientSum(q.shape, acc, q.device, narrow, out=dq_out)
    dkv: List[Tensor] = []
    traveling_shapes = [t.shape for t in kv]
    for step in range(steps - 1, -1, -1):
        if step > 1:  # step 0 computes on our own K/V: nothing to receive for it
            kv_rotation.start(kv)
        blocks = (k, v) if step == 0 else kv  # at step 0 the block is our own K/V
        task = schedule.block(step, ring_rank, ring_size, local_len)
        if task is not None:
            assert step != 0 or task.q_rows == slice(None)  # the own block carries the sinks (every row once)
            block_dq, block_dk, block_dv = sink.collect(kernel.backward(
                _rows(dout, task.q_rows), _rows(q, task.q_rows), _rows(blocks[0], task.kv_rows),
                _rows(blocks[1], task.kv_rows), _rows(out, task.q_rows), kernel_lse.rows(task.q_rows),
                task.kernel_mask, scale, deterministic=deterministic, **(sink.backward_kwargs() if step == 0 else {}),
            ))
            dq.add(task.q_rows, block_dq)
        if step == 1:
            kv = []  # the last visiting block is done with (step 0 uses our own K/V): free it before step 0
        if step == steps - 1:
            # the first partial sums of the visiting block: the kernel's own gradients when they cover every row
            dkv = [_GradientSum(shape, kv_acc, k.device, narrow=False) for shape in traveling_shapes]
            if task is not None:
                dkv[0].add(task.kv_rows, block_dk)
                dkv[1].add(task.kv_rows, block_dv)
            dkv = [part.materialize().contiguous() for part in dkv]
        else:
            sent = dkv
            dkv = dkv_rotation.wait()  # partial dK/dV of the block we hold, from the ranks that saw it later
            if step > 0:  # another partial sum will arrive: receive it into the buffers just sent
                dkv_rotation.recycle(sent)
            del sent
            if step == 0 and traveling_rows < local_len:
                # our own block covers the whole sequence, the partial sums that travelled only its prefix
                assert task is not None and task.kv_rows == slice(None), task
                dkv = [_prefix_sum(block, part, kv_acc) for block, part in zip((block_dk, block_dv), dkv)]
            elif task is not None:
                _rows(dkv[0], task.kv_rows).add_(block_dk)
                _rows(dkv[1], task.kv_rows).add_(block_dv)
        if step > 0:
            dkv_rotation.start(dkv)
        if step > 1:
            received = kv_rotation.wait()
            if step < steps - 1:
                kv_rotation.recycle(kv)
            kv = received
    dq = dq.materialize()
    dq = dq_out.copy_(dq) if dq_out is not None and dq is not dq_out else dq.to(q.dtype)
    if wide_dkv:
        return dq, dkv[0], dkv[1]
    return dq, dkv[0].to(k.dtype), dkv[1].to(v.dtype)


# ---------------------------------------------------------------------------------------------- sparse ring
_SPARSE_TAG = 16  # + 2 * step (+ 1 for dK/dV): one tag per exchange, so gloo never matches across steps


def _exchange(mesh: SequenceParallelMesh, step: int, send: List[Tensor], recv: List[Tensor], tag: int,
              forward: bool = True) -> Optional[list]:
    """One batched P2P call of Note [sparse ring]: ``send`` goes to ring rank ``r + step`` and ``recv`` comes from
    ``r - step`` (the other way round when ``forward`` is False); either may be empty. ``None`` when both are."""
    if not send and not recv:
        return None
    ranks, r, size = mesh.ring_global_ranks, mesh.ring_rank, mesh.ring
    to, frm = ranks[(r + step) % size], ranks[(r - step) % size]
    if not forward:
        to, frm = frm, to
    ops = [dist.P2POp(dist.isend, t, to, mesh.ring_group, tag) for t in send]
    ops += [dist.P2POp(dist.irecv, t, frm, mesh.ring_group, tag) for t in recv]
    return dist.batch_isend_irecv(ops)


def _wait(requests) -> None:
    for request in requests or ():
        request.wait()


def _halo_buffers(kv: List[Tensor], halo: Optional[slice], dtype: Optional[torch.dtype] = None) -> List[Tensor]:
    """Receive buffers for the ``halo`` rows of ``kv`` (in ``dtype``, default theirs); none without a halo."""
    if halo is None:
        return []
    return [torch.empty(t.shape[:1] + (halo.stop - halo.start,) + t.shape[2:], dtype=dtype or t.dtype,
                        device=t.device) for t in kv]


def _post_halo_exchange(mesh: SequenceParallelMesh, schedule, kv: List[Tensor], step: int, local_len: int):
    """Post step ``step``'s K/V halo exchange: send the rows ring rank ``r + step`` needs, receive the rows this rank
    needs from ``r - step``. Returns ``(requests, received buffers, this rank's halo slice or None)``."""
    ring_rank, ring_size = mesh.ring_rank, mesh.ring
    to_halo = schedule.halo(step, (ring_rank + step) % ring_size, ring_size, local_len)
    send = [] if to_halo is None else [t[:, to_halo].contiguous() for t in kv]
    my_halo = schedule.halo(step, ring_rank, ring_size, local_len)
    recv = _halo_buffers(kv, my_halo)
    return _exchange(mesh, step, send, recv, _SPARSE_TAG + 2 * step), recv, my_halo


def _shifted(rows: slice, halo: slice) -> slice:
    return slice(rows.start - halo.start, rows.stop - halo.start)


def _sparse_forward_pass(q, k, v, mesh, kernel, schedule, scale, sink: "_Sinks", ready=None):
    """Note [sparse ring]. A window leaves most blocks empty (``usp.layout.WindowSchedule``): instead of rotating
    K/V round the whole ring, ring rank ``r`` exchanges directly with the rank ``j`` away for each *active* step
    ``j`` only, and only the halo rows the receiver's window reaches (one batched isend/irecv per step, the next
    posted before the current step's compute). Each step may be several sub-blocks (one per pair of zigzag chunks
    the window connects).

    Note [sparse sums]. Every row's first term is its own chunk's diagonal piece (the window always holds the
    query's own position, so the step-0 pieces with ``q_rows == kv_rows`` partition the rows): those are written
    (no zero fill; one piece covering every row is kept as the kernel returned it) and carry the sinks (Note
    [kernel sinks]); every other piece is merged (forward) or added (backward) into them. The sums stay in the
    input dtype when no row sums more than two terms (``SlidingWindow.row_terms``: one rounding, exactly a float32
    sum rounded once), else float32. Returns ``(out, lse, halos)``: the received halos, kept for the backward when
    ``schedule.keep_halos`` (else empty)."""
    ring_size, ring_rank, local_len = mesh.ring, mesh.ring_rank, q.shape[1]
    steps = schedule.active_steps(ring_size, local_len)
    narrow, _ = schedule.narrow_sums(ring_rank, ring_size, local_len)
    acc = q.dtype if narrow else _accumulator_dtype(q.dtype)
    kv = [k.contiguous(), v.contiguous()]

    def post(step):
        return _post_halo_exchange(mesh, schedule, kv, step, local_len)

    def call(task, blocks, halo, **extra):
        rows = task.kv_rows if halo is None else _shifted(task.kv_rows, halo)
        return kernel.forward(_rows(q, task.q_rows), _rows(blocks[0], rows), _rows(blocks[1], rows),
                              task.kernel_mask, scale, **extra)

    def merge(tasks, blocks, halo):
        for task in tasks:
            block_out, block_lse = call(task, blocks, halo)
            merge_attention_(_rows(out, task.q_rows), _lse_rows(lse, task.q_rows), block_out, block_lse)

    # the first exchange is posted before the local blocks, or (Note [deferred agreement]) after them, once the
    # ranks have agreed on the call
    pending = post(steps[0]) if steps and ready is None else None
    own, others = schedule.own_blocks(ring_rank, ring_size, local_len)
    if len(own) == 1:
        out, lse = call(own[0], (k, v), None, **sink.forward_kwargs())
        out = out.to(acc)
    else:
        b, h = q.shape[0], q.shape[2]
        out = torch.empty((b, local_len, h, v.shape[3]), dtype=acc, device=q.device)
        lse = torch.empty((b, h, local_len), dtype=_accumulator_dtype(q.dtype), device=q.device)
        for task in own:
            block_out, block_lse = call(task, (k, v), None, **sink.forward_kwargs())
            out[:, task.q_rows].copy_(block_out)
            lse[:, :, task.q_rows].copy_(block_lse)
    merge(others, (k, v), None)
    if ready is not None:
        ready()
        pending = post(steps[0]) if steps else None
    kept = []
    for index, step in enumerate(steps):
        requests, received, halo = pending
        _wait(requests)
        pending = post(steps[index + 1]) if index + 1 < len(steps) else None
        if halo is not None:
            merge(schedule.blocks(step, ring_rank, ring_size, local_len), received, halo)
            kept += received
    if not schedule.keep_halos(ring_size, local_len):
        kept = []
    return out.to(q.dtype), lse, kept


def _sparse_backward_pass(dout, q, k, v, out, lse, halos, mesh, kernel, schedule, scale, dq_out, wide_dkv,
                          deterministic, sink: "_Sinks"):
    """Gradients of ``_sparse_forward_pass`` (Note [sparse ring]). For each active step: the K/V halo this rank
    used (kept by the forward, or exchanged again: ``halos`` None), the block backward with the final out/LSE,
    and the halo's dK/dV partial sums (float32) sent back to their owner, whose own halo rows receive the partial
    sums of the rank that used them. ``halos``: the forward's kept halos, in step order. The own pieces write
    dQ/dK/dV first, the rest add to them (Note [sparse sums])."""
    ring_size, ring_rank, local_len = mesh.ring, mesh.ring_rank, q.shape[1]
    steps = schedule.active_steps(ring_size, local_len)
    if not schedule.keep_halos(ring_size, local_len):
        halos = None  # the forward kept nothing (the same decision on every rank)
    wide = _accumulator_dtype(q.dtype)
    narrow_q, narrow_kv = schedule.narrow_sums(ring_rank, ring_size, local_len)
    q_acc = q.dtype if narrow_q else wide
    kv_acc = k.dtype if narrow_kv and not wide_dkv else wide
    kernel_lse = _KernelLse(lse)
    kv = [k.contiguous(), v.contiguous()]
    kept = list(halos) if halos is not None else None

    def call(task, blocks, halo, **extra):
        rows = task.kv_rows if halo is None else _shifted(task.kv_rows, halo)
        grads = kernel.backward(
            _rows(dout, task.q_rows), _rows(q, task.q_rows), _rows(blocks[0], rows), _rows(blocks[1], rows),
            _rows(out, task.q_rows), kernel_lse.rows(task.q_rows), task.kernel_mask, scale,
            deterministic=deterministic, **extra,
        )
        return rows, sink.collect(grads)

    def add(tasks, blocks, halo, dkv):
        for task in tasks:
            rows, (block_dq, block_dk, block_dv) = call(task, blocks, halo)
            _rows(dq, task.q_rows).add_(block_dq)
            _rows(dkv[0], rows).add_(block_dk)
            _rows(dkv[1], rows).add_(block_dv)

    def fetch(step):
        """The K/V halo for ``step``: kept, or exchanged again (requests to wait for)."""
        if kept is not None:
            my_halo = schedule.halo(step, ring_rank, ring_size, local_len)
            return None, (kept[:2] if my_halo is not None else []), my_halo
        return _post_halo_exchange(mesh, schedule, kv, step, local_len)

    pending = fetch(steps[0]) if steps else None
    if kept is not None and pending is not None and pending[2] is not None:
        kept = kept[2:]
    own, others = schedule.own_blocks(ring_rank, ring_size, local_len)
    if len(own) == 1 and dq_out is None:
        _, (dq, dk, dv) = call(own[0], (k, v), None, **sink.backward_kwargs())
        dq, dk, dv = dq.to(q_acc), dk.to(kv_acc), dv.to(kv_acc)
    else:
        dq = dq_out if dq_out is not None and narrow_q else torch.empty(q.shape, dtype=q_acc, device=q.device)
        dk = torch.empty(k.shape, dtype=kv_acc, device=k.device)
        dv = torch.empty(v.shape, dtype=kv_acc, device=v.device)
        for task in own:
            rows, block_grads = call(task, (k, v), None, **sink.backward_kwargs())
            for total, block in zip((_rows(dq, task.q_rows), _rows(dk, rows), _rows(dv, rows)), block_grads):
                total.copy_(block)
    add(others, (k, v), None, (dk, dv))
    returning = []
    for index, step in enumerate(steps):
        requests, received, halo = pending
        _wait(requests)
        if index + 1 < len(steps):
            pending = fetch(steps[index + 1])
            if kept is not None and pending[2] is not None:
                kept = kept[2:]
        partial = []
        if halo is not None:
            partial = [torch.zeros(t.shape, dtype=wide, device=t.device) for t in received]
            add(schedule.blocks(step, ring_rank, ring_size, local_len), received, halo, partial)
        # the partial dK/dV of the halo goes back to its owner (r - step); ours comes back from r + step
        mine = schedule.halo(step, (ring_rank + step) % ring_size, ring_size, local_len)
        incoming = _halo_buffers(kv, mine, wide)
        returning.append((_exchange(mesh, step, partial, incoming, _SPARSE_TAG + 2 * step + 1, forward=False),
                          incoming, mine))
    for requests, incoming, mine in returning:
        _wait(requests)
        if mine is not None:
            dk[:, mine].add_(incoming[0])
            dv[:, mine].add_(incoming[1])
    if dq_out is not None and dq is not dq_out:
        dq = dq_out.copy_(dq)
    dq = dq.to(q.dtype)
    if wide_dkv:
        return dq, dk, dv
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------------------------- sinks
class _Sinks:
    """Note [attention sinks] for one ring pass over some heads: carried by the kernel's own-block calls when it
    supports them (Note [kernel sinks]: no pass of their own), else applied around the ring (``apply_sinks``,
    ``sink_grad``). ``sinks`` None: nothing to do. ``grad``: the backward's sinks gradient is wanted."""

    def __init__(self, sinks: Optional[Tensor], kernel: AttentionKernel, q: Tensor, grad: bool = False):
        self.sinks, self.grad = sinks, grad and sinks is not None
        self.native = sinks is not None and kernel.supports_sinks
        #: what the kernel receives: the LSE's dtype, contiguous (Note [kernel contract])
        self.for_kernel = sinks.to(_accumulator_dtype(q.dtype)).contiguous() if self.native else None
        self.dsinks: Optional[Tensor] = None

    def forward_kwargs(self) -> dict:
        """For the calls that cover each row once (the own blocks)."""
        return {"sinks": self.for_kernel} if self.native else {}

    def backward_kwargs(self) -> dict:
        return {"sinks": self.for_kernel} if self.native and self.grad else {}

    def collect(self, grads) -> Tuple[Tensor, Tensor, Tensor]:
        """A kernel backward's ``(dq, dk, dv)``, its ``dsinks`` (if any) added to this pass's."""
        if len(grads) == 4:
            self.dsinks = grads[3] if self.dsinks is None else self.dsinks + grads[3]
        return grads[0], grads[1], grads[2]

    def finish_forward(self, out: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor]:
        if self.sinks is None or self.native:
            return out, lse
        return apply_sinks(out, lse, self.sinks)

    def finish_backward(self, dout: Tensor, out: Tensor, lse: Tensor) -> Optional[Tensor]:
        """This pass's sinks gradient (``sinks.dtype``), or None when not wanted."""
        if not self.grad:
            return None
        if not self.native:
            return sink_grad(dout, out, lse, self.sinks)
        assert self.dsinks is not None  # the own blocks ran with the sinks
        return self.dsinks.to(self.sinks.dtype)


def apply_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> Tuple[Tensor, Tensor]:
    """Note [attention sinks]. One extra logit per query head (``sinks [h]``, gpt-oss ``s_aux``) in every row's
    softmax denominator, with no value: ``lse' = logaddexp(lse, sink)``, ``out' = out * exp(lse - lse')``. The
    block backward run with ``(out', lse')`` gives exact dq/dk/dv (the softmax row term ``<dout, out'>`` already
    accounts for the sink, whose value is zero); the sink's own gradient is ``sink_grad``. Kernels that take the
    sinks themselves (Note [kernel sinks] in ``usp/kernels/base.py``) do both inside their own-block calls instead.
    ``out [b, s, h, dv]`` (scaled in place and returned), ``lse [b, h, s]``."""
    sink = sinks.to(lse.dtype)[None, :, None]
    new_lse = torch.logaddexp(lse, sink)
    factor = torch.exp(lse - new_lse).transpose(1, 2).unsqueeze(-1)  # [b, s, h, 1]
    # in place (``out`` is the ring's own result): one pass over it, the product in float32, rounded once
    return out.mul_(factor), new_lse


def sink_grad(dout: Tensor, out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """``d sink_h = -sum_rows exp(sink_h - lse') * <dout, out'>`` over this rank's rows (``out``, ``lse``: the
    sink-including results), in ``sinks.dtype``: a partial sum, like any parameter gradient under sequence
    parallelism it must be summed over the sequence-parallel ranks."""
    ct = lse.dtype
    # one pass over dout and out: the products rounded to their dtype, summed in float32 (two float32 copies of
    # both tensors cost several times the layer's sink overhead; the products' rounding is below out's own)
    row_dot = (dout * out).sum(-1, dtype=ct).transpose(1, 2)  # [b, h, s]
    weight = torch.exp(sinks.to(ct)[None, :, None] - lse)
    return -(weight * row_dot).sum(dim=(0, 2)).to(sinks.dtype)


def refuse_double_backward() -> None:
    """Called first in every usp backward. The autograd engine runs a backward with grad mode on exactly when the
    caller asked for ``create_graph=True``; usp's backward is not itself differentiable (its kernels and collectives
    record no graph), so second-order gradients would come back silently wrong or missing. Refuse them."""
    if torch.is_grad_enabled():
        raise ValueError(
            "create_graph=True: usp attention has no double backward (its backward is not differentiable), so "
            "second-order gradients through it are refused; call backward / torch.autograd.grad with "
            "create_graph=False"
        )


class RingAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(q, k, v, mesh, kernel, schedule, scale, head_chunks, deterministic, sinks[,
    ready]) -> (out, lse)``; lse not differentiable (it includes the sinks); no double backward
    (``refuse_double_backward``). ``sinks``: ``[h]`` or None (Note [attention sinks]); its gradient is this rank's
    partial sum. ``ready``: ``ring_forward``'s."""

    @staticmethod
    def forward(ctx, q, k, v, mesh, kernel, schedule, scale, head_chunks=1, deterministic=False, sinks=None,
                ready=None):
        out, lse, last_kv = ring_forward(q, k, v, mesh, kernel, schedule, scale, head_chunks, sinks, ready)
        saved_kv = last_kv if mesh.ring > 1 else []
        ctx.save_for_backward(q, k, v, out, lse, sinks, *saved_kv)
        ctx.mesh, ctx.kernel, ctx.schedule, ctx.scale, ctx.head_chunks = mesh, kernel, schedule, scale, head_chunks
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def saved_layout(q, k, v, mesh, kernel, schedule, scale, head_chunks=1, deterministic=False, sinks=None):
        """What ``forward`` saves, in order, from shapes alone (``q``, ``k``, ``v``: anything with a shape and a
        dtype): ``(kind, shape, dtype)``, kind an argument's name (``"q"``, ``"k"``, ``"v"``, ``"sinks"``),
        ``"out"`` (the output), ``"none"`` (a ``None``) or ``"new"``. ``usp.compiled`` sizes its op's outputs by it
        and checks it against the saved tensors on every call."""
        b, s, h, _ = q.shape
        return [saved_argument("q", q), saved_argument("k", k), saved_argument("v", v),
                ("out", (b, s, h, v.shape[3]), q.dtype), ("new", (b, h, s), _accumulator_dtype(q.dtype)),
                saved_argument("sinks", sinks)] + [
                ("new", shape, k.dtype) for shape in kept_kv_shapes(k.shape, v.shape, mesh, schedule, head_chunks)]

    @staticmethod
    def backward(ctx, dout, _dlse):
        refuse_double_backward()
        q, k, v, out, lse, sinks, *last_kv = ctx.saved_tensors
        dq, dk, dv, dsinks = ring_backward(dout, q, k, v, out, lse, last_kv, ctx.mesh, ctx.kernel, ctx.schedule,
                                           ctx.scale, ctx.head_chunks, ctx.deterministic, sinks,
                                           sinks_grad=ctx.needs_input_grad[9])
        return dq, dk, dv, None, None, None, None, None, None, dsinks, None
