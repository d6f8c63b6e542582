"""PyTorch's native context parallel (the peer we compare against), behind one small adapter.

API used (public, ``torch.distributed.tensor.experimental``): ``context_parallel(mesh, buffers=..., buffer_seq_dims=...,
no_restore_buffers=...)`` shards ``[b, h, s, d]`` buffers along ``s`` and, inside the ``with`` block, patches
``F.scaled_dot_product_attention`` so that SDPA on the local shards runs ring attention (KV rotated by all-gather or
all-to-all, ``set_rotate_method``); ``context_parallel_unshard`` gathers results back in global order.
Module-level options live in ``_cp_options`` (private, read from the ``_attention`` compatibility module that exists in
torch 2.7 through 2.13):

* ``enable_load_balance``: head-tail (zigzag) layout for causal attention. ``context_parallel`` turns it on when it is
  on *before* the call and ``seq % (2·P) == 0``; non-causal attention *must* have it off ("Load balancing requires
  is_causal=True"), so we set it per configuration and restore it afterwards.
* the SDPA backend is forced with ``torch.nn.attention.sdpa_kernel`` (cuDNN by default, the kernel of RESULTS.md's reference measurements).

GQA: SDPA is called with ``enable_gqa=True``; if that path raises (not every torch/cuDNN pairing accepts it), K/V are
expanded to ``h`` heads before sharding, which is what torchtitan's models do (``repeat_kv``); the record says which.

CPU: PyTorch CP has no CPU kernel (SDPA on CPU dispatches ``_scaled_dot_product_flash_attention_for_cpu``, which has
no CP handler). With ``cpu_shim=True`` we register CPU implementations of ``aten::_scaled_dot_product_flash_attention``
(+ backward) that call the CPU flash kernel, and call that op on DTensors directly: the whole CP path (DTensor
dispatch, ring loop, load balancer, rotation over gloo, unshard) then runs on CPU. Timings from it mean nothing.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

Tensor = torch.Tensor

#: our names for SDPA backends -> (torch.nn.attention.SDPBackend member, the usp kernel that calls the same op)
SDPA_BACKENDS = {
    "cudnn": ("CUDNN_ATTENTION", "cudnn"),
    "flash": ("FLASH_ATTENTION", "torch_flash"),
    "efficient": ("EFFICIENT_ATTENTION", None),
    "math": ("MATH", None),
}


def sdpa_backend_for(usp_kernel: str) -> str:
    """The SDPA backend that runs the same kernel as usp's ``usp_kernel`` (cuDNN when there is none: FA4, FA2)."""
    return {"torch_flash": "flash", "cudnn": "cudnn"}.get(usp_kernel, "cudnn")


def _cp_modules():
    from torch.distributed.tensor.experimental import context_parallel

    try:
        from torch.distributed.tensor.experimental._context_parallel import _attention as impl
    except ImportError:  # torch < 2.9 keeps everything in _attention.py
        from torch.distributed.tensor.experimental import _attention as impl
    return context_parallel, impl


def is_available() -> Optional[str]:
    """``None`` if PyTorch CP can be imported here, else why not."""
    try:
        _cp_modules()
    except Exception as exc:  # ImportError or an API change
        return f"torch.distributed.tensor.experimental.context_parallel unavailable: {exc}"
    return None


@functools.lru_cache(maxsize=None)
def _register_cpu_shim() -> None:
    """CPU kernels for the CUDA-only flash SDPA ops, so CP's ring can run on CPU (tests only)."""
    lib = torch.library.Library("aten", "IMPL")

    def forward(q, k, v, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                              scale=scale)
        # DTensor requires outputs without a sharding spec (cum_seq_*, unused, debug mask) to be 0-dim tensors.
        zero = torch.zeros((), dtype=torch.int64)
        return (out, lse, zero, zero, q.shape[2], k.shape[2], torch.zeros(2, dtype=torch.int64), zero,
                torch.zeros((), dtype=q.dtype))

    def backward(grad_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, seed, offset, *,
                 scale=None):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, dropout_p, is_causal, scale=scale)

    lib.impl("_scaled_dot_product_flash_attention", forward, "CPU")
    lib.impl("_scaled_dot_product_flash_attention_backward", backward, "CPU")
    _register_cpu_shim.library = lib  # keep the registration alive


class TorchContextParallel:
    """Run SDPA under PyTorch's context parallel on all ranks of the default group.

    Args:
        device: the rank's device.
        sdpa_backend: "cudnn", "flash", "efficient" or "math" (ignored with the CPU shim).
        cpu_shim: on CPU, route through the shim described in the module docstring.
    """

    def __init__(self, device: torch.device, sdpa_backend: str = "cudnn", cpu_shim: bool = False):
        from torch.distributed.device_mesh import init_device_mesh

        if sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backend={sdpa_backend!r}; valid values: {', '.join(SDPA_BACKENDS)}")
        self.device = device
        self.cpu_shim = cpu_shim and device.type == "cpu"
        self.sdpa_backend = "cpu_flash_shim" if self.cpu_shim else sdpa_backend
        self.world_size = dist.get_world_size()
        self.mesh = init_device_mesh(device.type, (self.world_size,), mesh_dim_names=("cp",))
        self._context_parallel, self._impl = _cp_modules()
        if self.cpu_shim:
            _register_cpu_shim()

    @property
    def kernel_name(self) -> Optional[str]:
        """The usp kernel that runs the same op on one GPU (for E), or None."""
        return None if self.cpu_shim else SDPA_BACKENDS[self.sdpa_backend][1]

    @contextlib.contextmanager
    def session(self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, causal: bool, rotate: str
                ) -> Iterator[Tuple[List[Tensor], dict]]:
        """Shard full ``[b, h, s, d]`` tensors (same on every rank) and enable CP; yields local shards and info.

        The full tensors' storage is released once the compact local copies exist (so peak memory is not charged
        for them); they must not be used afterwards.
        """
        if rotate not in ("allgather", "alltoall"):
            raise ValueError(f"rotate={rotate!r}; valid values: 'allgather', 'alltoall'")
        options = self._impl._cp_options
        saved = (options.enable_load_balance, options.rotate_method)
        self._impl.set_rotate_method(rotate)
        options.enable_load_balance = bool(causal)
        buffers = [q, k, v, dout]
        try:
            with self._context_parallel(self.mesh, buffers=buffers, buffer_seq_dims=[2] * 4,
                                        no_restore_buffers=set(buffers)):
                local = [b.clone() for b in buffers]
                for b in buffers:
                    b.untyped_storage().resize_(0)
                info = {"load_balance": bool(options.enable_load_balance), "rotate": rotate,
                        "sdpa_backend": self.sdpa_backend}
                yield local, info
        finally:
            options.enable_load_balance, options.rotate_method = saved

    def attention(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
        """SDPA on local ``[b, h, s_loc, d]`` shards inside ``session``; GQA when ``k`` has fewer heads."""
        gqa = q.shape[1] != k.shape[1]
        if self.cpu_shim:
            from torch.distributed.tensor import DTensor, Shard

            def wrap(t):
                return DTensor.from_local(t, self.mesh, [Shard(2)], run_check=False)

            out = torch.ops.aten._scaled_dot_product_flash_attention(wrap(q), wrap(k), wrap(v), 0.0, causal, False,
                                                                     scale=scale)[0]
            return out.to_local()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[self.sdpa_backend][0])
        with sdpa_kernel(backend):
            kwargs = {"enable_gqa": True} if gqa else {}
            # attribute lookup at call time: context_parallel monkey-patches F.scaled_dot_product_attention
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **kwargs)

    def unshard(self, tensors: List[Tensor]) -> List[Tensor]:
        """Full ``[b, h, s, d]`` tensors in global order from local shards (a collective; inside ``session``)."""
        return list(self._impl.context_parallel_unshard(self.mesh, [t.contiguous() for t in tensors],
                                                        [2] * len(tensors)))
