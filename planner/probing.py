"""Measure the machine the job runs on and describe it as a planner topology (YAML).

Run on every rank, under torchrun (``usp-plan probe`` or ``planner.probe()``); torch.distributed is initialised
from the environment if it is not already (NCCL when CUDA is available, else gloo). Every rank runs the same
sequence of collectives; rank 0 writes the file; every rank gets the same :class:`~planner.topology.Topology`.

What it does, in order (the cost model's inputs, ``planner.cost``):
  1. Detects: hostname and device per rank (hosts = distinct hostnames, or ``gpus_per_host`` consecutive ranks),
     the GPU links (NVML via ``pynvml`` if importable, ``nvidia-smi topo -m`` if on PATH) and the InfiniBand/RoCE
     ports (``/sys/class/infiniband``).
  2. P2P ring step time vs message size, with the same batched isend/irecv the core's ring uses, all ranks at
     once: within each host (rank -> next rank of its host) and across hosts (rank -> same local rank of the next
     host, one flow per NIC rail). Fits ``max(floor, latency + n / bandwidth)``.
  3. All-to-all (``all_to_all_single``) time vs buffer size for every candidate Ulysses group size (divisors of
     the world size), contiguous groups, all groups at once. Fits the same form in buffer bytes.
  4. Device-memory copy bandwidth (the ring's fp32 merges and the all-to-all staging copies run at it).
  5. The attention kernel's forward and backward TFLOP/s (``usp.kernels.resolve_backend``) for the given
     head_dim/dtype at several block sizes, causal and not; where the kernel has a varlen form
     (``usp.kernels.varlen``: fa4, fa2, torch_flash, reference), one call over many equal short sequences
     (128-4096 tokens, 32K tokens a call), causal and not: the packed-document pricing's per-sequence rates
     (``planner.batch``).
On CPU/gloo every step runs (small sizes) so the structure is right and CI can test it; the numbers mean nothing.
"""
from __future__ import annotations

import datetime
import math
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .topology import DEFAULT_PRESET, Fit, Topology, fit_latency_bandwidth, load_topology
from .units import PlannerError, canonical_dtype

__all__ = ["probe", "measure_kernel", "measure_varlen_kernel", "parse_nvidia_smi_topo", "classify_host_fabric",
           "read_infiniband", "kernel_flops"]

MiB = 1024**2


# ----------------------------------------------------------------------------------------------- detection
def parse_nvidia_smi_topo(text: str) -> Dict[str, Any]:
    """Parse ``nvidia-smi topo -m``: ``{"gpus": ["GPU0", ...], "nics": [...], "links": {("GPU0", "GPU1"): "NV18"}}``.

    Only the GPU/NIC columns of the matrix are kept (not the CPU/NUMA affinity columns or the legend).
    """
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    header_index = next((i for i, ln in enumerate(lines) if re.match(r"^\s+GPU0\b", ln)), None)
    if header_index is None:
        return {"gpus": [], "nics": [], "links": {}}
    columns = [c for c in lines[header_index].split() if re.match(r"^(GPU\d+|NIC\d+|mlx\S+)$", c)]
    links: Dict[Tuple[str, str], str] = {}
    rows: List[str] = []
    for line in lines[header_index + 1:]:
        parts = line.split()
        if not parts or not re.match(r"^(GPU\d+|NIC\d+|mlx\S+)$", parts[0]):
            break
        rows.append(parts[0])
        for col, value in zip(columns, parts[1:1 + len(columns)]):
            links[(parts[0], col)] = value
    gpus = [c for c in columns if c.startswith("GPU")]
    nics = [c for c in columns if not c.startswith("GPU")]
    return {"gpus": gpus, "nics": nics, "links": links}


def classify_host_fabric(topo: Dict[str, Any]) -> Dict[str, Any]:
    """From :func:`parse_nvidia_smi_topo` output: ``{"kind": "nvswitch"|"nvlink"|"pcie"|None, ...}``.

    Every GPU pair on NVLink (``NV#``): ``nvswitch`` when more than two GPUs (an NVSwitch node shows ``NV18`` for
    every pair), else ``nvlink``. Otherwise ``pcie``, with ``gpus_per_switch`` = the largest group of GPUs joined
    by ``PIX``/``PXB`` and ``sockets`` = the number of groups not separated by ``SYS``.
    """
    gpus = topo.get("gpus", [])
    links = topo.get("links", {})
    if len(gpus) < 2:
        return {"kind": None}
    pairs = [(a, b) for i, a in enumerate(gpus) for b in gpus[i + 1:]]
    values = [links.get((a, b), "") for a, b in pairs]
    if all(v.startswith("NV") for v in values):
        return {"kind": "nvswitch" if len(gpus) > 2 else "nvlink",
                "nvlinks_per_pair": max(int(v[2:]) if v[2:].isdigit() else 1 for v in values)}

    def groups(joined: Callable[[str], bool]) -> List[List[str]]:
        out: List[List[str]] = []
        for g in gpus:
            for grp in out:
                if all(joined(links.get((g, h), "")) for h in grp):
                    grp.append(g)
                    break
            else:
                out.append([g])
        return out

    switch_groups = groups(lambda v: v in ("PIX", "PXB") or v.startswith("NV"))
    socket_groups = groups(lambda v: v != "SYS")
    return {"kind": "pcie", "gpus_per_switch": max(len(g) for g in switch_groups),
            "switches": len(switch_groups), "sockets": len(socket_groups)}


def read_infiniband(root: str = "/sys/class/infiniband") -> List[Dict[str, Any]]:
    """Ports under ``root``: ``[{"device", "port", "state", "rate_gbps", "link_layer"}]`` (empty if none)."""
    base = Path(root)
    ports: List[Dict[str, Any]] = []
    if not base.is_dir():
        return ports
    for device in sorted(base.iterdir()):
        for port in sorted((device / "ports").glob("*")):
            def read(name: str) -> str:
                try:
                    return (port / name).read_text().strip()
                except OSError:
                    return ""
            rate = re.match(r"([\d.]+)\s*Gb/sec", read("rate"))
            ports.append({"device": device.name, "port": port.name, "state": read("state"),
                          "rate_gbps": float(rate.group(1)) if rate else None,
                          "link_layer": read("link_layer") or "InfiniBand"})
    return ports


def _nvidia_smi_topo() -> Optional[str]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        return subprocess.run([exe, "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _nvml() -> Optional[Dict[str, Any]]:
    try:
        import pynvml  # type: ignore
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            active = 0
            for link in range(18):
                try:
                    active += int(pynvml.nvmlDeviceGetNvLinkState(handle, link) == 1)
                except pynvml.NVMLError:
                    break
            name = pynvml.nvmlDeviceGetName(handle)
            devices.append({"name": name.decode() if isinstance(name, bytes) else name, "nvlinks": active})
        pynvml.nvmlShutdown()
        return {"devices": devices}
    except Exception as exc:  # NVML present but unusable (no driver): record why, keep probing
        return {"error": str(exc)}


# ----------------------------------------------------------------------------------------------- kernel
def kernel_flops(block: int, heads: int, head_dim: int, causal: bool, batch: int = 1) -> float:
    """Forward FLOPs of a square block: ``4·b·h·s²·d``, halved when causal (the FLOP convention of benchmarks/RESULTS.md)."""
    flops = 4.0 * batch * heads * block * block * head_dim
    return flops / 2 if causal else flops


def measure_kernel(kernel: Any, blocks: Sequence[int], heads: int, head_dim: int, dtype: Any, device: Any,
                   iters: int = 3, warmup: int = 1, synchronize: Optional[Callable[[], None]] = None,
                   clock: Callable[[], float] = time.perf_counter) -> List[Dict[str, float]]:
    """Time ``kernel.forward``/``kernel.backward`` (the ``usp.kernels`` interface) on ``[1, block, heads, head_dim]``
    inputs; return kernel points ``{block, forward, backward, causal_forward, causal_backward}`` in TFLOP/s
    (backward FLOPs = 2.5 x forward). ``synchronize`` waits for the device; ``clock`` is injectable for tests.
    """
    import torch

    sync = synchronize or (lambda: None)
    points = []
    for block in blocks:
        gen = torch.Generator(device="cpu").manual_seed(block)
        shape = (1, block, heads, head_dim)
        q, k, v, dout = (torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
                         for _ in range(4))
        scale = head_dim ** -0.5
        point: Dict[str, float] = {"block": int(block)}
        for causal in (False, True):
            out, lse = kernel.forward(q, k, v, causal, scale)

            def fwd() -> None:
                kernel.forward(q, k, v, causal, scale)

            def bwd() -> None:
                kernel.backward(dout, q, k, v, out, lse, causal, scale)

            flops = kernel_flops(block, heads, head_dim, causal)
            t_fwd = _time_local(fwd, iters, warmup, sync, clock)
            t_bwd = _time_local(bwd, iters, warmup, sync, clock)
            prefix = "causal_" if causal else ""
            point[prefix + "forward"] = flops / t_fwd / 1e12
            point[prefix + "backward"] = 2.5 * flops / t_bwd / 1e12
        points.append(point)
    return points


def measure_varlen_kernel(kernel: Any, lengths: Sequence[int], tokens: int, heads: int, head_dim: int, dtype: Any,
                          device: Any, iters: int = 3, warmup: int = 1,
                          synchronize: Optional[Callable[[], None]] = None,
                          clock: Callable[[], float] = time.perf_counter) -> List[Dict[str, float]]:
    """Time one varlen call (``usp.kernels.varlen``'s interface) over ``tokens // length`` packed sequences of
    ``length`` tokens each, for every ``length``: the kernel's rate on short documents, which ``planner.batch``
    prices packed documents with. Returns varlen points ``{length, sequences, forward, backward, causal_forward,
    causal_backward}`` in TFLOP/s (4·h·d·sequences·length², halved causal; backward FLOPs = 2.5 x forward)."""
    import torch

    from usp.kernels.varlen import VarlenSeqs  # lazy: usp imports planner

    sync = synchronize or (lambda: None)
    points = []
    for length in lengths:
        sequences = max(1, tokens // length)
        total = sequences * length
        seqs = VarlenSeqs([length] * sequences, [length] * sequences)
        gen = torch.Generator(device="cpu").manual_seed(length)
        q, k, v, dout = (torch.randn((total, heads, head_dim), generator=gen, dtype=torch.float32)
                         .to(device=device, dtype=dtype) for _ in range(4))
        scale = head_dim ** -0.5
        point: Dict[str, float] = {"length": int(length), "sequences": int(sequences)}
        for causal in (False, True):
            out, lse = kernel.forward(q, k, v, seqs, causal, scale)

            def fwd() -> None:
                kernel.forward(q, k, v, seqs, causal, scale)

            def bwd() -> None:
                kernel.backward(dout, q, k, v, out, lse, seqs, causal, scale)

            flops = sequences * kernel_flops(length, heads, head_dim, causal)
            prefix = "causal_" if causal else ""
            point[prefix + "forward"] = flops / _time_local(fwd, iters, warmup, sync, clock) / 1e12
            point[prefix + "backward"] = 2.5 * flops / _time_local(bwd, iters, warmup, sync, clock) / 1e12
        points.append(point)
    return points


def _time_local(fn: Callable[[], None], iters: int, warmup: int, sync: Callable[[], None],
                clock: Callable[[], float]) -> float:
    for _ in range(warmup):
        fn()
    sync()
    start = clock()
    for _ in range(iters):
        fn()
    sync()
    return max((clock() - start) / iters, 1e-12)


# ----------------------------------------------------------------------------------------------- probe
class _Progress:
    """rich progress on rank 0 (stderr), nothing elsewhere."""

    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                console=Console(stderr=True), transient=False)
            self.bar.start()
            self.task = self.bar.add_task("probing", total=total)

    def step(self, description: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=description)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def probe(output: Optional[str] = None, *, name: Optional[str] = None, message_sizes: Optional[Sequence[int]] = None,
          group_sizes: Optional[Sequence[int]] = None, iters: Optional[int] = None, warmup: Optional[int] = None,
          kernel: Optional[Any] = "auto", heads: Union[None, int, Sequence[int]] = None, head_dim: int = 128,
          dtype: Any = None,
          kernel_blocks: Optional[Sequence[int]] = None, gpus_per_host: Optional[int] = None,
          backend: Optional[str] = None, progress: bool = True) -> Topology:
    """Measure this machine (see the module docstring); call on every rank. Returns the same Topology everywhere.

    Args:
        output: YAML path rank 0 writes (``None``: write nothing).
        name: topology name (default ``probe-<hostname of rank 0>``).
        message_sizes: bytes per message for P2P and all-to-all (default 1, 4, 16, 64, 256 MiB on GPU; 64 KiB,
            256 KiB, 1 MiB on CPU).
        group_sizes: all-to-all group sizes (default every divisor of the world size > 1).
        iters, warmup: timed and untimed repetitions (default 10/3 on GPU, 3/1 on CPU).
        kernel: a ``usp.kernels`` backend name ("auto") or kernel object; ``None`` skips the kernel timing (the
            kernel rates of the default preset are copied and a warning is recorded).
        heads, head_dim, dtype, kernel_blocks: the kernel-timing problem (defaults: 32 heads, bf16, blocks 4K..32K
            on GPU; 2 heads, float32, blocks 128 and 256 on CPU). ``heads`` may list several counts (e.g.
            ``(8, 32)``): one profile each, and the cost model interpolates between them by heads per call.
        gpus_per_host: treat every N consecutive ranks as one host (default: group by hostname).
        backend: process-group backend when probe has to initialise torch.distributed itself.
        progress: show rich progress on rank 0.
    """
    import torch
    import torch.distributed as dist

    initialised_here = False
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise PlannerError("probe needs torch.distributed: run it under torchrun (usp-plan probe) or call "
                               "torch.distributed.init_process_group first")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        initialised_here = True
    try:
        return _probe(torch, dist, output, name, message_sizes, group_sizes, iters, warmup, kernel, heads, head_dim,
                      dtype, kernel_blocks, gpus_per_host, progress)
    finally:
        if initialised_here:
            dist.barrier()
            dist.destroy_process_group()


def _probe(torch, dist, output, name, message_sizes, group_sizes, iters, warmup, kernel, heads, head_dim, dtype,
           kernel_blocks, gpus_per_host, progress) -> Topology:
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = dist.get_backend()
    on_gpu = backend == "nccl" or (torch.cuda.is_available() and backend != "gloo")
    if on_gpu:
        device = torch.device("cuda", torch.cuda.current_device())
        sync = torch.cuda.synchronize
    else:
        device = torch.device("cpu")
        sync = lambda: None  # noqa: E731
    sizes = list(message_sizes or ([1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB] if on_gpu
                                   else [64 * 1024, 256 * 1024, MiB]))
    iters = iters or (10 if on_gpu else 3)
    warmup = warmup if warmup is not None else (3 if on_gpu else 1)

    # --- 1. who is where
    me = {"host": socket.gethostname(), "device": _device_info(torch, device)}
    everyone: List[Any] = [None] * world
    dist.all_gather_object(everyone, me)
    if gpus_per_host:
        if world % gpus_per_host:
            raise PlannerError(f"gpus_per_host={gpus_per_host} does not divide the world size {world}")
        host_of = [r // gpus_per_host for r in range(world)]
    else:
        names: List[str] = []
        host_of = []
        for info in everyone:
            if info["host"] not in names:
                names.append(info["host"])
            host_of.append(names.index(info["host"]))
    hosts = max(host_of) + 1
    per_host = [host_of.count(h) for h in range(hosts)]
    warnings: List[str] = []
    if len(set(per_host)) != 1 or host_of != sorted(host_of):
        warnings.append(f"hosts are not contiguous equal blocks of ranks (ranks per host {per_host}); the topology "
                        "assumes torchrun's layout")
    gph = min(per_host)
    detected = {"nvidia_smi_topo": None, "nvml": None, "infiniband": []}
    if rank == 0:
        text = _nvidia_smi_topo()
        parsed = parse_nvidia_smi_topo(text) if text else None
        detected = {"nvidia_smi_topo": None if parsed is None else classify_host_fabric(parsed),
                    "nvml": _nvml(), "infiniband": read_infiniband()}

    group_sizes = list(group_sizes or [g for g in range(2, world + 1) if world % g == 0])
    stages = (1 if gph > 1 else 0) + (1 if hosts > 1 else 0) + len(group_sizes) + 1 + (kernel is not None)
    bar = _Progress(progress and rank == 0, stages)
    try:
        # --- 2. P2P ring steps
        p2p: List[Dict[str, Any]] = []
        if gph > 1:
            bar.step("P2P ring step within hosts")
            nxt = [_host_next(r, host_of) for r in range(world)]
            p2p.append({"scope": "intra_host", "samples": _p2p_samples(torch, dist, device, sizes, nxt, iters,
                                                                          warmup, sync)})
            bar.advance()
        if hosts > 1:
            bar.step("P2P ring step across hosts")
            nxt = [(r + gph) % world for r in range(world)]
            p2p.append({"scope": "inter_host", "samples": _p2p_samples(torch, dist, device, sizes, nxt, iters,
                                                                          warmup, sync)})
            bar.advance()

        # --- 3. all-to-all per group size
        a2a: List[Dict[str, Any]] = []
        for g in group_sizes:
            bar.step(f"all-to-all, groups of {g}")
            if world % g:
                raise PlannerError(f"group size {g} does not divide the world size {world}")
            groups = [list(range(s, s + g)) for s in range(0, world, g)]
            mine = None
            for ranks in groups:  # every rank creates every group, in the same order
                pg = dist.new_group(ranks) if g < world else dist.group.WORLD
                if rank in ranks:
                    mine = pg
            samples = []
            for size in sizes:
                numel = max(g, (size // 4) // g * g)
                send = torch.ones(numel, dtype=torch.float32, device=device)
                recv = torch.empty_like(send)
                seconds = _time_collective(dist, lambda: dist.all_to_all_single(recv, send, group=mine), iters,
                                           warmup, sync, device)
                samples.append([numel * 4, seconds])
            a2a.append({"group_size": g, "hosts_per_group": len({host_of[r] for r in groups[0]}),
                        "samples": samples})
            bar.advance()

        # --- 4. device-memory bandwidth (copy: read + write)
        bar.step("device memory bandwidth")
        numel = (256 * MiB if on_gpu else 16 * MiB) // 4
        src = torch.ones(numel, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        seconds = _time_collective(dist, lambda: dst.copy_(src), iters, warmup, sync, device)
        memory_bandwidth = 2 * numel * 4 / seconds
        bar.advance()

        # --- 5. kernel
        kernel_profile = None
        if kernel is not None:
            bar.step("attention kernel")
            head_counts = [heads] if heads is None or isinstance(heads, int) else list(heads)
            kernel_profile = [_kernel_profile(torch, dist, kernel, device, on_gpu, h, head_dim, dtype,
                                              kernel_blocks, iters, warmup, sync) for h in head_counts]
            bar.advance()
    finally:
        bar.close()

    data = None
    if rank == 0:
        data = _topology_dict(name or f"probe-{everyone[0]['host']}", everyone, hosts, gph, host_of, p2p, a2a,
                              memory_bandwidth, kernel_profile, detected, warnings, backend, world, torch,
                              gpus_per_host)
    box = [data]
    dist.broadcast_object_list(box, src=0)
    topology = Topology.from_dict(box[0], source="probe result")
    if rank == 0 and output:
        topology.save(output)
    dist.barrier()
    return topology


def _host_next(rank: int, host_of: List[int]) -> int:
    """The next rank on the same host (a ring per host)."""
    mates = [r for r, h in enumerate(host_of) if h == host_of[rank]]
    return mates[(mates.index(rank) + 1) % len(mates)]


def _device_info(torch, device) -> Dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"model": props.name, "memory_gib": props.total_memory / 1024**3}
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        total = 16.0
    return {"model": "cpu", "memory_gib": total}


def _time_collective(dist, fn: Callable[[], Any], iters: int, warmup: int, sync: Callable[[], None],
                     device) -> float:
    """Mean seconds per call, the slowest rank's (all ranks run ``fn`` together)."""
    import torch

    for _ in range(warmup):
        fn()
    sync()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    elapsed = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return max(float(elapsed.item()), 1e-9)


def _p2p_samples(torch, dist, device, sizes, nxt: List[int], iters, warmup, sync) -> List[List[float]]:
    """Every rank sends ``size`` bytes to ``nxt[rank]`` and receives from its predecessor, batched like the core."""
    rank = dist.get_rank()
    prev = nxt.index(rank)
    samples = []
    for size in sizes:
        numel = max(1, size // 4)
        send = torch.ones(numel, dtype=torch.float32, device=device)
        recv = torch.empty_like(send)

        def step() -> None:
            ops = [dist.P2POp(dist.isend, send, nxt[rank]), dist.P2POp(dist.irecv, recv, prev)]
            for request in dist.batch_isend_irecv(ops):
                request.wait()

        samples.append([numel * 4, _time_collective(dist, step, iters, warmup, sync, device)])
    return samples


def _kernel_profile(torch, dist, kernel, device, on_gpu, heads, head_dim, dtype, blocks, iters, warmup, sync):
    from usp.kernels import resolve_backend  # lazy: usp imports planner

    dtype_name = canonical_dtype(dtype or ("bfloat16" if on_gpu else "float32"))
    torch_dtype = getattr(torch, dtype_name)
    impl = resolve_backend(kernel, device, torch_dtype, head_dim)
    heads = heads or (32 if on_gpu else 2)
    blocks = list(blocks or ([4096, 8192, 16384, 32768] if on_gpu else [128, 256]))
    points = measure_kernel(impl, blocks, heads, head_dim, torch_dtype, device, iters=iters, warmup=warmup,
                            synchronize=sync)
    varlen_impl = _varlen_counterpart(impl.name, device, torch_dtype, head_dim)
    varlen = [] if varlen_impl is None else measure_varlen_kernel(
        varlen_impl, VARLEN_LENGTHS_GPU if on_gpu else VARLEN_LENGTHS_CPU,
        VARLEN_TOKENS_GPU if on_gpu else VARLEN_TOKENS_CPU, heads, head_dim, torch_dtype, device, iters=iters,
        warmup=warmup, synchronize=sync)
    profile = {"name": impl.name, "dtype": dtype_name, "head_dim": head_dim, "heads": heads,
               "source": f"usp-plan probe, {heads} heads, slowest of {dist.get_world_size()} ranks",
               "points": _slowest(dist, points, "block")}
    if varlen:
        profile["varlen"] = _slowest(dist, varlen, "length", "sequences")
    return profile


#: varlen points (``measure_varlen_kernel``): document lengths, and the tokens of each call
VARLEN_LENGTHS_GPU = (128, 256, 512, 1024, 2048, 4096)
VARLEN_TOKENS_GPU = 32768
VARLEN_LENGTHS_CPU = (16, 64)
VARLEN_TOKENS_CPU = 128


def _varlen_counterpart(name: str, device, dtype, head_dim: int):
    """The varlen kernel of the dense backend ``name`` (same implementation, packed sequences), or None where it
    has none or it cannot run here (cuDNN has no varlen kernel: its profile gets no varlen points)."""
    from usp.kernels.varlen import VARLEN_BACKENDS, resolve_varlen_backend  # lazy: usp imports planner

    if name not in VARLEN_BACKENDS:
        return None
    try:
        return resolve_varlen_backend(name, device, dtype, head_dim)
    except (ValueError, TypeError, RuntimeError):
        return None


def _slowest(dist, points: List[Dict[str, float]], *keys: str) -> List[Dict[str, float]]:
    """Every rank measured its own device: keep the slowest rank's rates (the ring waits for it), 4 digits."""
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, points)
    return [{key: (points[i][key] if key in keys else float(f"{min(p[i][key] for p in gathered):.4g}"))
             for key in points[i]} for i in range(len(points))]


def _topology_dict(name, everyone, hosts, gph, host_of, p2p, a2a, memory_bandwidth, kernel_profile, detected,
                   warnings, backend, world, torch, gpus_per_host) -> Dict[str, Any]:
    fits = {m["scope"]: fit_latency_bandwidth(m["samples"]) for m in p2p}
    intra, inter = fits.get("intra_host"), fits.get("inter_host")
    if intra is None and inter is None:  # a single rank: no link to measure
        intra = Fit(latency=0.0, bandwidth=memory_bandwidth, floor=0.0)
        warnings.append("a single rank: no link measured; the host fabric bandwidth is the memory-copy bandwidth")
    device = everyone[0]["device"]
    smi = detected.get("nvidia_smi_topo") or {}
    kind = smi.get("kind") or "switch"  # unknown links: a generic full-bandwidth switch at the measured rate
    reference = intra or inter
    fabric: Dict[str, Any] = {"kind": kind,
                              "bandwidth_GBps": _gbps(intra.bandwidth) if intra else _gbps(inter.bandwidth),
                              "latency_us": 0.0}
    if kind == "pcie":
        fabric["gpus_per_switch"] = max(1, min(smi.get("gpus_per_switch", gph), gph))
        switches = max(1, gph // fabric["gpus_per_switch"])
        fabric["switches_per_socket"] = max(1, switches // max(1, smi.get("sockets", 1)))
        # one measured bandwidth for every hop: the probe cannot separate them
        if gph % (fabric["gpus_per_switch"] * fabric["switches_per_socket"]):
            fabric.update(kind="switch")
            fabric.pop("gpus_per_switch")
            fabric.pop("switches_per_socket")
            warnings.append("PCIe tree from nvidia-smi does not divide the GPUs per host evenly; modelled as a "
                            "single switch")
    if gph == 1:
        fabric["note"] = "one GPU per host: the host fabric carries no traffic"
    topo: Dict[str, Any] = {
        "format": "usp-topology/1", "name": name,
        "description": f"probed {datetime.date.today().isoformat()}: {hosts} host(s) x {gph} x {device['model']}",
        "sources": [f"usp-plan probe ({backend}, torch {torch.__version__}), {world} ranks"],
        "hosts": hosts, "gpus_per_host": gph,
        "gpu": {"model": device["model"], "memory_gib": round(device["memory_gib"], 2),
                "memory_bandwidth_GBps": _gbps(memory_bandwidth)},
        "host_fabric": fabric,
    }
    if hosts > 1:
        ib = [p for p in detected.get("infiniband", []) if "ACTIVE" in p.get("state", "")]
        net_kind = "ethernet"
        if ib:
            net_kind = "roce" if all(p["link_layer"] == "Ethernet" for p in ib) else "infiniband"
        extra_latency = max(0.0, inter.latency - (intra.latency if intra else 0.0))
        topo["network"] = {"kind": net_kind, "nics_per_host": gph, "nic_bandwidth_GBps": _gbps(inter.bandwidth),
                           "latency_us": round(extra_latency * 1e6, 3),
                           "note": "measured with one flow per GPU across hosts; "
                                   f"{len(ib)} active IB/RoCE port(s) seen on rank 0's host"}
    a2a_fits = [fit_latency_bandwidth(m["samples"]) for m in a2a]
    smallest = a2a_fits[0] if a2a_fits else reference
    topo["collectives"] = {
        "p2p": {"latency_us": round(reference.latency * 1e6, 3), "floor_us": round(reference.floor * 1e6, 3)},
        "all_to_all": {"latency_us": round(smallest.latency * 1e6, 3), "floor_us": round(smallest.floor * 1e6, 3)},
    }
    if kernel_profile is None:
        fallback = load_topology(DEFAULT_PRESET)
        topo["kernels"] = [k.to_dict() for k in fallback.kernels]
        warnings.append(f"kernel not timed: kernel rates copied from preset {DEFAULT_PRESET!r}")
    else:
        topo["kernels"] = list(kernel_profile)
    topo["measured"] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "backend": backend, "world_size": world,
        "gpus_per_host": gph, "hosts": sorted({e["host"] for e in everyone}),
        "host_of_rank": host_of if gpus_per_host else None, "detected": detected, "warnings": warnings,
        "p2p": p2p, "all_to_all": a2a,
    }
    if topo["measured"]["host_of_rank"] is None:
        topo["measured"].pop("host_of_rank")
    return topo


def _gbps(bytes_per_second: float) -> float:
    value = bytes_per_second / 1e9
    return float(f"{value:.4g}") if math.isfinite(value) else 1e6
