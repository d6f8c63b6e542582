"""The ``nn.Module`` forms of usp's attention: one class, ``LongContextAttention``, for dense input and packed
documents (``forward(q, k, v, cu_seqlens=None, ...)``), and ``LongContextAttentionVarlen``, its packed-only form
with the signature it always had. Here, above ``usp.attention`` and ``usp.varlen``, so neither imports the other's
module class (``usp.attention.LongContextAttention`` and ``usp.varlen.LongContextAttentionVarlen`` still resolve).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from .attention import check_deterministic, long_context_attention
from .kernels import AttentionKernel, resolve_backend
from .kernels.base import MaskNeeds
from .kernels.varlen import VarlenKernel, resolve_varlen_backend
from .mesh import SequenceParallelMesh
from .varlen import long_context_attention_varlen
from .layout_varlen import _check_causal, _check_mesh

__all__ = ["LongContextAttention", "LongContextAttentionVarlen"]

Tensor = torch.Tensor


class LongContextAttention(nn.Module):
    """Drop-in attention module: ``forward(q, k, v)`` on local shards in flash-attn layout.

    Args:
        mesh: the ``usp.SequenceParallelMesh`` to run on.
        causal: causal mask over global positions (see ``long_context_attention``).
        softmax_scale: default ``head_dim ** -0.5``.
        backend: kernel choice, "auto" by default; ``resolved_backend(q)`` tells which kernel runs.
        head_chunks: ring passes per Ulysses head group, to cut working memory (see ``long_context_attention``);
            dense inputs only.
        deterministic: bitwise-repeatable out and gradients (see ``long_context_attention``).
        window_size, softcap: the mask options of ``long_context_attention``; ``sinks`` (a parameter tensor) go
            to ``forward``.
    """

    def __init__(
        self,
        mesh: SequenceParallelMesh,
        causal: bool = True,
        softmax_scale: Optional[float] = None,
        backend: Union[str, AttentionKernel] = "auto",
        head_chunks: int = 1,
        deterministic: bool = False,
        window_size: Tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
    ):
        super().__init__()
        if not isinstance(mesh, SequenceParallelMesh):
            raise TypeError(f"mesh must be a usp.SequenceParallelMesh, got {type(mesh).__name__}")
        self.mesh = mesh
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.backend = backend
        self.head_chunks = head_chunks
        self.deterministic = deterministic
        self.window_size = tuple(window_size) if isinstance(window_size, list) else window_size
        self.softcap = softcap

    def resolved_backend(self, q: Tensor) -> AttentionKernel:
        """The kernel that runs for inputs like ``q`` (device, dtype, head_dim) with this module's mask options
        (a window counts as needed whatever the sequence length)."""
        needs = MaskNeeds(window=tuple(self.window_size) not in ((-1, -1), (-1, 0)), softcap=bool(self.softcap))
        return resolve_backend(self.backend, q.device, q.dtype, q.shape[-1], self.deterministic, needs)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens=None, max_seqlen: Optional[int] = None,
                sinks: Optional[Tensor] = None) -> Tensor:
        """Dense: ``q [b, s_local, h, d]``, ``k, v [b, s_local, h_kv, d]`` -> ``[b, s_local, h, d]``.

        Packed documents: ``q [t_local, h, d]``, ``k, v [t_local, h_kv, d]`` with the *global* ``cu_seqlens``
        (see ``usp.long_context_attention_varlen``) -> ``[t_local, h, d]``.
        """
        if cu_seqlens is not None:
            if self.head_chunks != 1:
                raise ValueError(f"head_chunks={self.head_chunks} is for dense inputs; packed batches "
                                 "(cu_seqlens) run with head_chunks=1")
            return long_context_attention_varlen(q, k, v, cu_seqlens, max_seqlen, self.mesh, causal=self.causal,
                                                 softmax_scale=self.softmax_scale, backend=self.backend,
                                                 deterministic=self.deterministic, window_size=self.window_size,
                                                 softcap=self.softcap, sinks=sinks)
        if max_seqlen is not None:
            raise ValueError("max_seqlen is only for packed batches: pass cu_seqlens too (or neither)")
        return long_context_attention(
            q, k, v, self.mesh, causal=self.causal, softmax_scale=self.softmax_scale, backend=self.backend,
            head_chunks=self.head_chunks, deterministic=self.deterministic, window_size=self.window_size,
            softcap=self.softcap, sinks=sinks,
        )

    def extra_repr(self) -> str:
        chunks = f", head_chunks={self.head_chunks}" if self.head_chunks != 1 else ""
        deterministic = ", deterministic=True" if self.deterministic else ""
        mask = (f", window_size={tuple(self.window_size)}" if tuple(self.window_size) != (-1, -1) else "") + (
            f", softcap={self.softcap}" if self.softcap else "")
        return f"mesh={self.mesh!r}, causal={self.causal}, backend={self.backend!r}{chunks}{deterministic}{mask}"


class LongContextAttentionVarlen(LongContextAttention):
    """Module form of ``long_context_attention_varlen``: ``forward(q, k, v, cu_seqlens, max_seqlen=None)``. A
    ``LongContextAttention`` whose ``cu_seqlens`` is required (and ``head_chunks`` 1): the packed path of the one
    module class, with the signature it always had.

    Args:
        mesh: the ``usp.SequenceParallelMesh`` to run on.
        causal: causal mask inside each document.
        softmax_scale: default ``head_dim ** -0.5``.
        backend: varlen kernel choice, "auto" by default; ``resolved_backend(q)`` tells which kernel runs.
        deterministic: bitwise-repeatable out and gradients (see ``usp.long_context_attention``).
        window_size, softcap: as ``long_context_attention_varlen``; ``sinks`` go to ``forward``.
    """

    def __init__(
        self,
        mesh: SequenceParallelMesh,
        causal: bool = True,
        softmax_scale: Optional[float] = None,
        backend: Union[str, VarlenKernel] = "auto",
        deterministic: bool = False,
        window_size: Tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
    ):
        _check_mesh(mesh)
        _check_causal(causal)
        check_deterministic(deterministic)
        super().__init__(mesh, causal=causal, softmax_scale=softmax_scale, backend=backend, head_chunks=1,
                         deterministic=deterministic, window_size=window_size, softcap=softcap)

    def resolved_backend(self, q: Tensor) -> VarlenKernel:
        """The varlen kernel that runs for inputs like ``q`` (device, dtype, head_dim)."""
        left, right = self.window_size  # a window may still bind on no document of some batch
        window = left != -1 or (right != -1 and not (self.causal and right == 0))
        return resolve_varlen_backend(self.backend, q.device, q.dtype, q.shape[-1], self.deterministic,
                                      MaskNeeds(window=window, softcap=bool(self.softcap)))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens, max_seqlen: Optional[int] = None,
                sinks: Optional[Tensor] = None) -> Tensor:
        """``q [t_local, h, d]``, ``k, v [t_local, h_kv, d]``, global ``cu_seqlens`` -> ``[t_local, h, d]``."""
        return long_context_attention_varlen(
            q, k, v, cu_seqlens, max_seqlen, self.mesh, causal=self.causal, softmax_scale=self.softmax_scale,
            backend=self.backend, deterministic=self.deterministic, window_size=self.window_size,
            softcap=self.softcap, sinks=sinks,
        )

    def extra_repr(self) -> str:
        deterministic = ", deterministic=True" if self.deterministic else ""
        return f"mesh={self.mesh!r}, causal={self.causal}, backend={self.backend!r}{deterministic}"
