"""Train a Llama-style transformers model on synthetic long sequences with usp sequence parallelism.

One file for CPU (gloo) and GPU (NCCL). Every rank builds the same global batch, keeps its shard
(``usp.integrations.data.shard_batch``), runs the model with usp attention (``usp.integrations.transformers.enable``)
and the exact sequence-parallel loss, sums the gradients over the sequence-parallel group and steps AdamW. Per step
it prints the loss, tokens/s and the peak memory; ``--json-out`` writes them.

    # 2 GPUs, mesh from the planner (usp.plan), bf16, backend "auto"
    torchrun --nproc-per-node 2 examples/train_llama.py --device cuda --seqlen 65536 --steps 10 \\
        --hidden 2048 --layers 8 --heads 16 --kv-heads 4 --vocab 32000 --checkpointing --json-out sp.json
    # the same model on one GPU, no sequence parallelism (HF sdpa attention), to compare tokens/s and memory
    python examples/train_llama.py --single-gpu-baseline --device cuda --seqlen 65536 --steps 10 \\
        --hidden 2048 --layers 8 --heads 16 --kv-heads 4 --vocab 32000 --checkpointing --json-out one.json
    # CPU, 4 processes, explicit 2 x 2 mesh
    torchrun --nproc-per-node 4 examples/train_llama.py --device cpu --seqlen 256 --steps 3 --ulysses 2 --ring 2

tokens/s counts the global tokens of all data-parallel replicas per second (``batch * seqlen * dp / step time``);
per-GPU tokens/s is that divided by the world size. Peak memory is ``torch.cuda.max_memory_allocated`` per step,
the maximum over ranks (on CPU: the peak resident set size of the process). The first ``--warmup`` steps (kernel
selection, JIT, allocator growth) are excluded from the summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_CHECKOUT, "usp")):  # run from a checkout: use its usp package
    sys.path.insert(0, _CHECKOUT)

import usp  # noqa: E402

from usp.integrations import data as usp_data  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def _doc(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Every command-line flag, validated on construction (flag ``--foo-bar`` is field ``foo_bar``)."""

    device: str = _doc("cpu (gloo) or cuda (NCCL, one GPU per process from LOCAL_RANK)", default="cpu")
    seqlen: int = _doc("global sequence length in tokens (a multiple of what the mesh's layout needs)", default=256)
    steps: int = _doc("optimizer steps", default=3)
    batch: int = _doc("sequences per step per data-parallel replica", default=1)
    hidden: int = _doc("hidden size", default=64)
    intermediate: Optional[int] = _doc("MLP size; default 8/3 * hidden rounded up to a multiple of 64", default=None)
    layers: int = _doc("decoder layers", default=2)
    heads: int = _doc("attention heads (divisible by --ulysses)", default=4)
    kv_heads: int = _doc("key/value heads (GQA; divides --heads)", default=2)
    vocab: int = _doc("vocabulary size (the logits are [seqlen/P, vocab] per rank: large vocabularies cost memory)",
                      default=256)
    dtype: Optional[str] = _doc("parameter/activation dtype; default bfloat16 on cuda, float32 on cpu", default=None)
    ulysses: Optional[int] = _doc("Ulysses degree (with --ring: explicit mesh instead of the planner)", default=None)
    ring: Optional[int] = _doc("ring degree (with --ulysses)", default=None)
    plan: bool = _doc("choose the mesh with usp.plan (the default when --ulysses/--ring are not given)",
                      default=False)
    topology: Optional[str] = _doc("planner topology: preset name or YAML path (default: the planner's)",
                                   default=None)
    placement: str = _doc("ulysses_inner or ring_inner (explicit mesh only)", default="ulysses_inner")
    backend: str = _doc("usp attention kernel: auto, fa4, fa2, cudnn, torch_flash, reference", default="auto")
    single_gpu_baseline: bool = _doc("one process, no sequence parallelism, transformers' own attention",
                                     default=False)
    baseline_attn: str = _doc("attn_implementation of the baseline (sdpa, eager, flash_attention_2)",
                              default="sdpa")
    checkpointing: bool = _doc("activation (gradient) checkpointing per decoder layer", default=False)
    lr: float = _doc("AdamW learning rate", default=3e-3)
    seed: int = _doc("seed for weights and data", default=0)
    warmup: int = _doc("steps left out of the summary", default=1)
    json_out: Optional[str] = _doc("write config, per-step numbers and the summary here (rank 0)", default=None)

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device {self.device!r}: valid values are 'cpu', 'cuda'")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
        self.dtype = self.dtype or ("bfloat16" if self.device == "cuda" else "float32")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: valid values are {sorted(DTYPES)}")
        for name in ("seqlen", "steps", "batch", "hidden", "layers", "heads", "kv_heads", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"--hidden {self.hidden} must be divisible by --heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"--kv-heads {self.kv_heads} must divide --heads {self.heads}")
        if (self.ulysses is None) != (self.ring is None):
            raise ValueError("give both --ulysses and --ring (an explicit mesh) or neither (the planner chooses)")
        if self.plan and self.ulysses is not None:
            raise ValueError("--plan and --ulysses/--ring are alternatives; give one")
        if self.intermediate is None:
            self.intermediate = 64 * math.ceil(8 * self.hidden / 3 / 64)
        if not 0 <= self.warmup < self.steps:
            self.warmup = max(0, min(self.warmup, self.steps - 1))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            if f.type in ("bool", bool):
                parser.add_argument(flag, action="store_true", help=f.metadata["help"])
            else:
                kind = {"int": int, "float": float, "Optional[int]": int}.get(str(f.type), str)
                parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])
        return parser

    @classmethod
    def from_args(cls, argv=None) -> "TrainConfig":
        parser = cls.parser()
        try:
            return cls(**vars(parser.parse_args(argv)))
        except ValueError as error:
            parser.error(str(error))  # exits with status 2 and the usage line


# ---------------------------------------------------------------------------------------------- set-up
def init_distributed(cfg: TrainConfig) -> torch.device:
    if "RANK" not in os.environ:  # plain `python train_llama.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    if cfg.device == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (benchmarks/RESULTS.md)
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def build_mesh(cfg: TrainConfig, world_size: int):
    """The mesh: explicit --ulysses/--ring, else usp.plan, else (planner missing) a fallback split."""
    if cfg.ulysses is not None:
        mesh = usp.SequenceParallelMesh(ulysses=cfg.ulysses, ring=cfg.ring, placement=cfg.placement)
        return mesh, {"source": "explicit"}
    try:
        kwargs = {"kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "batch": cfg.batch, "dtype": cfg.dtype}
        if cfg.topology:
            kwargs["topology"] = cfg.topology
        plan = usp.plan(world_size, cfg.seqlen, cfg.heads, **kwargs)
    except (ImportError, AttributeError, TypeError) as error:
        ulysses = max(u for u in range(1, world_size + 1) if world_size % u == 0 and cfg.heads % u == 0)
        ring = world_size // ulysses
        message = (f"usp.plan is not usable here ({type(error).__name__}: {error}); falling back to "
                   f"Ulysses {ulysses} x ring {ring} (largest Ulysses degree dividing heads and world size). "
                   "Pass --ulysses/--ring to choose.")
        log(message)
        mesh = usp.SequenceParallelMesh(ulysses=ulysses, ring=ring)
        return mesh, {"source": "fallback", "reason": message}
    log("plan: " + (plan.summary() if hasattr(plan, "summary") else repr(plan)))
    mesh = usp.SequenceParallelMesh.from_plan(plan)
    return mesh, {"source": "plan", "summary": plan.summary() if hasattr(plan, "summary") else repr(plan)}


def build_model(cfg: TrainConfig, device: torch.device, attn_implementation: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=max(cfg.seqlen, 4096), attention_dropout=0.0, use_cache=False,
        tie_word_embeddings=False, attn_implementation=attn_implementation,
    )
    torch.manual_seed(cfg.seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(cfg.torch_dtype)  # build directly in the training dtype (no fp32 copy)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    if cfg.checkpointing:  # gradient_checkpointing_enable was renamed activation_checkpointing_enable in 5.2x
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def synthetic_batch(cfg: TrainConfig, step: int, replica: int) -> torch.Tensor:
    """A learnable long sequence: one fixed random 64-token motif (per seed) repeated to ``seqlen``, with 10% of the
    tokens replaced at random (fresh noise every step and replica), so the loss falls as the model learns it.

    Identical on every rank of a replica (the RNG is seeded by seed, step and replica), as shard_batch requires.
    """
    motif = torch.randint(0, cfg.vocab, (cfg.batch, 64), generator=torch.Generator().manual_seed(cfg.seed))
    ids = motif.repeat(1, -(-cfg.seqlen // 64))[:, : cfg.seqlen].clone()
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + (step + 1) * 1009 + replica)
    noise = torch.rand(ids.shape, generator=gen) < 0.1
    ids[noise] = torch.randint(0, cfg.vocab, (int(noise.sum()),), generator=gen)
    return ids


# ---------------------------------------------------------------------------------------------- logging
def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(message: str) -> None:
    if is_rank0():
        print(message, flush=True)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory of this step (max over ranks), or the CPU process's peak RSS."""
    if device.type == "cuda":
        value = torch.tensor(torch.cuda.max_memory_allocated(device) / 2 ** 30, device=device)
    else:
        value = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)  # KiB -> GiB
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- training
def train(cfg: TrainConfig) -> dict:
    if cfg.single_gpu_baseline:
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise SystemExit("--single-gpu-baseline runs in one process: launch it with python, not torchrun -n>1")
        device = torch.device("cuda", 0) if cfg.device == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        world_size, mesh, mesh_info, replicas, replica = 1, None, {"source": "single-gpu-baseline"}, 1, 0
        model = build_model(cfg, device, cfg.baseline_attn)
        attention = f"transformers {cfg.baseline_attn}"
    else:
        device = init_distributed(cfg)
        world_size = dist.get_world_size()
        mesh, mesh_info = build_mesh(cfg, world_size)
        replicas, replica = mesh.data_parallel_size, mesh.data_parallel_rank
        model = build_model(cfg, device, "sdpa")
        for tensor in model.state_dict().values():  # identical weights on every rank, whatever the RNG did
            dist.broadcast(tensor, src=0)
        import usp.integrations.transformers as usp_hf

        usp_hf.enable(model, mesh, backend=cfg.backend)
        kernel = usp.resolve_backend(cfg.backend, device, cfg.torch_dtype, cfg.head_dim).name
        attention = f"usp {kernel}"
        mesh_info.update(ulysses=mesh.ulysses, ring=mesh.ring, placement=mesh.placement.value,
                         data_parallel=mesh.data_parallel_size)
    params = sum(p.numel() for p in model.parameters())
    log(f"model: Llama {cfg.layers} layers, hidden {cfg.hidden}, heads {cfg.heads}/{cfg.kv_heads}, vocab {cfg.vocab}, "
        f"{params / 1e6:.2f}M params, {cfg.dtype} on {device.type} | attention: {attention} | world {world_size} | "
        f"mesh: {mesh!r} | seqlen {cfg.seqlen}, batch {cfg.batch}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    tokens_per_step = cfg.batch * cfg.seqlen * replicas
    steps = []
    for step in range(cfg.steps):
        ids = synthetic_batch(cfg, step, replica).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        if mesh is None:
            logits = model(input_ids=ids, use_cache=False).logits
            targets = usp_data.shift_labels(ids)
            loss = F.cross_entropy(logits.reshape(-1, cfg.vocab).float(), targets.reshape(-1))
            loss.backward()
            loss_value = loss.detach()
        else:
            batch = usp_data.shard_batch({"input_ids": ids, "labels": ids}, mesh)
            targets = batch.pop("shift_labels")
            logits = model(**batch, use_cache=False).logits
            partial = usp_data.causal_lm_loss(logits, targets, mesh)
            partial.backward()
            usp_data.all_reduce_gradients(
                model, mesh, data_parallel_group=mesh.data_parallel_group if replicas > 1 else None)
            loss_value = usp_data.reduce_loss(partial, mesh)
        del logits
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss_value)  # synchronises
        synchronize(device)
        seconds = time.perf_counter() - start
        if dist.is_initialized():  # the slowest rank sets the step time
            worst = torch.tensor(seconds, device=device if device.type == "cuda" else "cpu")
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            seconds = float(worst)
        record = {"step": step + 1, "loss": loss_value, "seconds": seconds,
                  "tokens_per_s": tokens_per_step / seconds,
                  "tokens_per_s_per_gpu": tokens_per_step / seconds / world_size,
                  "peak_memory_gib": peak_memory_gib(device)}
        steps.append(record)
        log(f"step {step + 1}/{cfg.steps} | loss {loss_value:.4f} | {record['tokens_per_s']:,.0f} tokens/s "
            f"({record['tokens_per_s_per_gpu']:,.0f}/GPU) | {seconds * 1e3:.1f} ms | "
            f"peak {'mem' if device.type == 'cuda' else 'RSS'} {record['peak_memory_gib']:.2f} GiB")
    measured = steps[cfg.warmup:]
    summary = {
        "tokens_per_s": sum(s["tokens_per_s"] for s in measured) / len(measured),
        "tokens_per_s_per_gpu": sum(s["tokens_per_s_per_gpu"] for s in measured) / len(measured),
        "peak_memory_gib": max(s["peak_memory_gib"] for s in steps),
        "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"], "steps_measured": len(measured),
    }
    log(f"summary: {summary['tokens_per_s']:,.0f} tokens/s ({summary['tokens_per_s_per_gpu']:,.0f}/GPU) over "
        f"{len(measured)} steps, peak {summary['peak_memory_gib']:.2f} GiB, loss {summary['first_loss']:.4f} -> "
        f"{summary['last_loss']:.4f}")
    import transformers

    return {
        "config": dataclasses.asdict(cfg), "mesh": mesh_info, "attention": attention, "world_size": world_size,
        "params": params, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "steps": steps, "summary": summary,
    }


def main(argv=None) -> int:
    cfg = TrainConfig.from_args(argv)
    try:
        result = train(cfg)
    except torch.cuda.OutOfMemoryError as error:
        rank = dist.get_rank() if dist.is_initialized() else 0
        print(f"[rank {rank}] out of memory at seqlen {cfg.seqlen}: {str(error).splitlines()[0]}", flush=True)
        if cfg.json_out and rank == 0:
            with open(cfg.json_out, "w") as handle:
                json.dump({"config": dataclasses.asdict(cfg), "oom": True, "error": str(error)}, handle, indent=2)
        return 3
    if cfg.json_out and is_rank0():
        with open(cfg.json_out, "w") as handle:
            json.dump(result, handle, indent=2)
        log(f"wrote {cfg.json_out}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
