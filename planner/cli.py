"""``usp-plan``: rank every Ulysses x ring split for a shape on a topology, or probe this machine.

    usp-plan --world-size 64 --seqlen 1M --heads 32 --kv-heads 8
    usp-plan --world-size 8 --seqlen 32k --heads 32 --kv-heads 8 --topology l20-pcie --format json
    usp-plan --world-size 16 --heads 32 --sweep                      # 8K .. 1M: where does the best split change?
    usp-plan --world-size 8 --seqlen 1M --heads 32 --kv-heads 8 --window 4095 --window-layers 5:1
    torchrun --nproc-per-node 8 -m planner.cli probe --output my-node.yaml

Bad input exits with status 2 and one line on stderr (the same text the API raises as ValueError). The table fits
the terminal (80 columns by default; ``--wide`` adds the cost breakdown); a closed pipe (``usp-plan ... | head``)
ends quietly with status 0.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
from typing import Any, List, NoReturn, Optional, Sequence

import yaml

from .search import Candidate, Plan, default_sweep_lengths, equivalent, plan, sweep
from .topology import DEFAULT_PRESET, list_presets, load_topology
from .units import (PlannerError, format_bytes, format_in_unit, format_tokens, parse_bytes, parse_seqlen,
                    seconds_unit)

__all__ = ["main", "build_parser"]

PROG = "usp-plan"
USAGE = ("%(prog)s --world-size N --seqlen S --heads H [--kv-heads H] [options]\n"
         "       %(prog)s --world-size N --heads H --sweep [LENGTHS] [options]\n"
         "       %(prog)s --list-presets\n"
         "       torchrun --nproc-per-node G -m planner.cli probe [--output FILE] [probe options]")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {PROG} --help)\n")


def _seqlen(text: str) -> int:
    try:
        return parse_seqlen(text)
    except PlannerError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("seqlen=", "", 1)) from None


def _seqlen_list(text: str) -> List[int]:
    return [_seqlen(part) for part in text.split(",") if part.strip()]


def _int_list(text: str) -> List[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _window(text: str):
    """``--window``: ``W`` (a causal left window) or ``LEFT,RIGHT`` (flash-attn's window_size); the API checks the
    values (``planner.search._window``)."""
    parts = [part.strip() for part in text.split(",")]
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected W (tokens) or LEFT,RIGHT (ints, -1 = unbounded), got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


def _bytes_list(text: str) -> List[int]:
    try:
        return [parse_bytes(part, "size") for part in text.split(",") if part.strip()]
    except PlannerError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _memory(text: str) -> int:
    try:
        return parse_bytes(text, "memory-limit", default_unit="GiB")
    except PlannerError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("memory-limit=", "", 1)) from None


def build_parser() -> argparse.ArgumentParser:
    """The plan parser (``usp-plan ...``); ``usp-plan probe ...`` has its own (:func:`build_probe_parser`)."""
    p = _Parser(prog=PROG, usage=USAGE, description="Rank every Ulysses x ring split of the sequence-parallel size for one "
                "attention layer on a topology (a preset, or a YAML file written by `usp-plan probe`).",
                epilog=f"Presets: {', '.join(list_presets())} (default {DEFAULT_PRESET}). "
                f"Subcommand: `{PROG} probe --help` measures this machine under torchrun.")
    p.add_argument("--world-size", type=int, help="number of ranks (GPUs)")
    p.add_argument("--seqlen", type=_seqlen, help="global sequence length: 131072, 128k, 1M")
    p.add_argument("--heads", type=int, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=128,
                   help="dimension of each attention head (default 128; usp's GPU kernels: 8..256, a multiple of 8)")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size per data-parallel replica (default 1)")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                   help="causal mask (default) or --no-causal")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (bf16, default), float16 (fp16), float32")
    p.add_argument("--window", type=_window, default=None, metavar="W|LEFT,RIGHT",
                   help="sliding window: W = a causal layer's left window in tokens (window_size=(W, 0): each query "
                   "sees itself and W tokens before it); LEFT,RIGHT = flash-attn's window_size, the form for "
                   "--no-causal (-1 = unbounded)")
    p.add_argument("--window-layers", default=None, metavar="W:G",
                   help="price a mix: W windowed (--window) and G global layers, e.g. 5:1 or the model's counts "
                   "40:8; times are the sum over the W+G layers")
    p.add_argument("--cu-seqlens", type=_int_list, default=None, metavar="0,L0,L0+L1,...",
                   help="price a packed batch of documents: its cu_seqlens (--seqlen then optional)")
    p.add_argument("--doc-lengths", type=_int_list, default=None, metavar="L0,L1,...",
                   help="price a packed batch of documents of these lengths")
    p.add_argument("--histogram", default=None, metavar="FILE",
                   help="price a packed batch from a histogram file: YAML/JSON {length: count} or 'length count' "
                   "lines")
    p.add_argument("--topology", default=None,
                   help=f"preset name (NAME or NAME:hosts=N) or topology YAML path (default {DEFAULT_PRESET})")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="override the topology's GPUs per host (must divide --world-size when it is smaller)")
    p.add_argument("--memory-limit", type=_memory, default=None,
                   help="cap on predicted attention memory per GPU: 40 (GiB), 40GiB, 512MiB (default: GPU memory)")
    p.add_argument("--sequence-parallel-size", type=int, default=None,
                   help="U*R (default: the world size; the rest is data parallel)")
    p.add_argument("--kernel", default="auto", help="kernel whose rates to use (default: the fastest listed)")
    p.add_argument("--forward-only", action="store_true", help="minimise forward time (inference/prefill)")
    p.add_argument("--format", choices=("table", "json", "yaml"), default="table",
                   help="table (default: fits the terminal, 80 columns), json or yaml (every candidate and the "
                   "explanation of the pick, 'why')")
    p.add_argument("--wide", action="store_true",
                   help="table: also the compute, merge, all-to-all, exposed ring, forward and backward columns")
    p.add_argument("--sweep", nargs="?", const="auto", default=None, type=str, metavar="LENGTHS",
                   help="plan several sequence lengths (comma list, or powers of two from 8K up to --seqlen/1M)")
    p.add_argument("--list-presets", action="store_true", help="print the shipped topology presets and exit")
    return p


def build_probe_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} probe", usage="torchrun --nproc-per-node G -m planner.cli probe [options]",
                description="Measure this machine (run on every rank under torchrun) and "
                "write a topology YAML for later dry runs. Works on CPU/gloo too (structure right, numbers "
                "meaningless).")
    p.add_argument("--output", "-o", default="usp-topology.yaml", help="YAML file to write (rank 0)")
    p.add_argument("--name", default=None, help="topology name (default: probe-<hostname>)")
    p.add_argument("--sizes", type=_bytes_list, default=None,
                   help="message sizes for P2P and all-to-all, e.g. 1MiB,16MiB,64MiB,256MiB")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations before each measurement")
    p.add_argument("--kernel", default="auto", help="usp kernel backend to time (auto = fastest available)")
    p.add_argument("--no-kernel", action="store_true", help="skip the kernel timing")
    p.add_argument("--heads", type=_int_list, default=None,
                   help="query heads for the kernel timing; several (e.g. 8,32) give one profile each")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension for the kernel timing (default 128)")
    p.add_argument("--dtype", default=None, help="kernel dtype (default bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--blocks", type=_seqlen_list, default=None, help="kernel block sizes, e.g. 4k,8k,16k,32k")
    p.add_argument("--gpus-per-host", type=int, default=None,
                   help="treat every N consecutive ranks as one host (default: by hostname)")
    p.add_argument("--backend", default=None, help="process-group backend if not initialised (nccl/gloo)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p


# ----------------------------------------------------------------------------------------------- rendering
#: cost columns: (header, the candidate's value in seconds); the narrow table shows the last one only
_WIDE_TERMS = (("compute", lambda ps: sum(p.compute for p in ps)), ("merge", lambda ps: sum(p.merge for p in ps)),
               ("all-to-all", lambda ps: sum(p.all_to_all for p in ps)),
               ("ring exp.", lambda ps: sum(p.ring_exposed for p in ps)),
               ("overhead", lambda ps: sum(p.overhead for p in ps)))


def _merge_equivalent(candidates: Sequence[Candidate]) -> List[tuple]:
    """``[(candidate, merged)]``: a candidate equivalent to an earlier one (``planner.search.equivalent``) is folded
    into it, and the row says "either" for the placement."""
    rows: List[list] = []
    for c in candidates:
        for row in rows:
            if equivalent(row[0], c):
                row[1] = True
                break
        else:
            rows.append([c, False])
    return [tuple(r) for r in rows]


def _table(p: Plan, wide: bool) -> tuple:
    """Header and rows of the plan's candidates; one unit per time column (in the header)."""
    fo = p.forward_only
    passes = (lambda c: (c.forward,)) if fo else (lambda c: (c.forward, c.backward))
    merged = _merge_equivalent(p.candidates)
    costed = [c for c, _ in merged if c.forward is not None]
    columns = []  # (name, seconds of a candidate)
    if wide:
        columns += [(name, (lambda f: lambda c: f(passes(c)))(f)) for name, f in _WIDE_TERMS]
        columns += [("fwd", lambda c: c.forward.total)] + ([] if fo else [("bwd", lambda c: c.backward.total)])
    columns.append(("fwd" if fo else "total", lambda c: _objective(c, fo)))
    units = [seconds_unit([get(c) for c in costed]) for _, get in columns]
    header = ["", "U", "R", "placement"] + [f"{name} {unit}" for (name, _), unit in zip(columns, units)]
    header += ["vs pick", "mem/GPU", "note"]
    best = p.objective
    rows = []
    for i, (c, twin) in enumerate(merged):
        mark = "*" if i == 0 else ("x" if not c.feasible else "")
        placement = "either" if twin else c.placement
        if c.forward is None:
            cost = ["-"] * len(columns) + ["-"]
        else:
            cost = [format_in_unit(get(c), unit) for (_, get), unit in zip(columns, units)]
            cost.append("" if i == 0 else f"{100 * (_objective(c, fo) / best - 1):+.1f}%")
        memory = "-" if c.memory is None else format_bytes(c.memory.peak)
        note = c.reason if not c.feasible else "; ".join(c.notes)
        if twin:
            note = "; ".join(filter(None, ["both placements predict the same", note]))
        rows.append([mark, str(c.ulysses), str(c.ring), placement] + cost + [memory, note or ""])
    return header, rows


def _objective(c: Candidate, forward_only: bool) -> float:
    return c.forward.total if forward_only else c.total


def _width() -> int:
    return shutil.get_terminal_size((80, 24)).columns


def _plain_table(header: Sequence[str], rows: Sequence[Sequence[str]], width: Optional[int] = None) -> str:
    """Left-aligned columns; the last column (notes) wraps onto indented lines to keep within ``width``."""
    width = width or _width()
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    lead = sum(w + 2 for w in widths[:-1])
    room = max(10, width - lead)
    widths[-1] = min(widths[-1], room)

    def line(cells: Sequence[str]) -> List[str]:
        head = "  ".join(v.ljust(w) for v, w in zip(cells[:-1], widths[:-1]))
        last = textwrap.wrap(cells[-1], room) or [""]
        return [(head + "  " + last[0]).rstrip()] + [(" " * lead + more).rstrip() for more in last[1:]]

    lines = line(header)
    lines.append("  ".join("-" * w for w in widths).rstrip())
    for r in rows:
        lines += line(r)
    return "\n".join(lines)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str, out, rich_ok: bool) -> None:
    if rich_ok:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for h in header:
            right = h in ("U", "R", "vs pick", "mem/GPU") or h.endswith((" ms", " s"))
            table.add_column(h, justify="right" if right else "left", no_wrap=h != header[-1] and h != "runner-up",
                             overflow="fold")
        for r in rows:
            style = "bold green" if r[0] == "*" else ("dim" if r[0] == "x" else None)
            table.add_row(*r, style=style)
        Console(file=out, width=_width()).print(table)
    else:
        for part in title.splitlines():
            print("\n".join(textwrap.wrap(part, _width(), subsequent_indent="  ")), file=out)
        print(_plain_table(header, rows), file=out)


def _shape_line(p: Plan) -> str:
    s = p.shape
    mode = "forward only" if p.forward_only else "forward+backward"
    window = ""
    if tuple(s.window) != (-1, -1):
        window = f", window_size {tuple(s.window)}"
        if p.window_layers is not None:
            window += f", {p.window_layers[0]} windowed + {p.window_layers[1]} global layers (times summed)"
    return (f"world {p.world_size} (sequence-parallel {p.sequence_parallel_size}, data-parallel {p.data_parallel}),"
            f" seqlen {format_tokens(s.seqlen)}, heads {s.heads}/{s.kv_heads}, head_dim {s.head_dim}, batch "
            f"{s.batch}, {s.dtype}, {'causal' if s.causal else 'non-causal'}{window}, {mode}, kernel {p.kernel}")


def _render_plan(p: Plan, topology_line: str, out, rich_ok: bool, wide: bool = False) -> None:
    header, rows = _table(p, wide)
    title = f"{topology_line}\n{_shape_line(p)}"
    _print_table(header, rows, title, out, rich_ok)
    for text in [f"pick (*): {p.summary()}", f"why: {p.why()}"] + [f"note: {n}" for n in p.notes]:
        print("\n".join(textwrap.wrap(text, _width(), subsequent_indent="  ")), file=out)
    print("\n" + p.snippet(), file=out)


def _render_sweep(results, topology_line: str, out, rich_ok: bool, forward_only: bool, wide: bool = False) -> None:
    plans = [r for _, r in results if isinstance(r, Plan)]
    unit = seconds_unit([x for p in plans for x in (p.forward.total, p.backward.total, p.objective)])
    header = ["seqlen", "best", "placement"]
    if wide and not forward_only:
        header += [f"fwd {unit}", f"bwd {unit}"]
    header += [f"{'fwd' if forward_only else 'total'} {unit}", "mem/GPU", "change", "runner-up"]
    rows, previous = [], None
    for tokens, result in results:
        if isinstance(result, PlannerError):
            cells = ["-"] * (len(header) - 5)
            rows.append([format_tokens(tokens), "none"] + cells + ["-", "", str(result)])
            previous = None
            continue
        p = result
        second = p.runner_up
        runner = ""
        if second is not None:
            margin = 100 * (_objective(second, forward_only) / p.objective - 1)
            runner = f"{second.label} {second.placement} {margin:+.1f}%"
        key = (p.ulysses, p.ring, p.placement)
        change = "<- changes" if previous is not None and key != previous else ""
        previous = key
        placement = p.placement
        if any(equivalent(c, p.candidates[0]) for c in p.candidates[1:]):
            placement = "either"
        cells = [format_tokens(tokens), p.label, placement]
        if wide and not forward_only:
            cells += [format_in_unit(p.forward.total, unit), format_in_unit(p.backward.total, unit)]
        cells += [format_in_unit(p.objective, unit), format_bytes(p.memory_bytes), change, runner]
        rows.append(cells)
    _print_table(header, rows, topology_line, out, rich_ok)


# ----------------------------------------------------------------------------------------------- commands
def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _run_plan(args: argparse.Namespace, out) -> int:
    if args.list_presets:
        for name in list_presets():
            print(load_topology(name).describe(), file=out)
        return 0
    missing = [flag for flag, value in (("--world-size", args.world_size), ("--heads", args.heads)) if value is None]
    packed = dict(cu_seqlens=args.cu_seqlens, doc_lengths=args.doc_lengths, histogram=args.histogram)
    if args.seqlen is None and args.sweep is None and all(v is None for v in packed.values()):
        missing.append("--seqlen")
    if missing:
        return _fail(f"the following arguments are required: {', '.join(missing)} (see {PROG} --help)")
    common = dict(kv_heads=args.kv_heads, head_dim=args.head_dim, batch=args.batch, dtype=args.dtype,
                  causal=args.causal, topology=args.topology, memory_limit=args.memory_limit,
                  sequence_parallel_size=args.sequence_parallel_size, kernel=args.kernel,
                  gpus_per_node=args.gpus_per_node, forward_only=args.forward_only, window=args.window,
                  window_layers=args.window_layers)
    rich_ok = args.format == "table" and out.isatty()
    if args.sweep is not None:
        if args.sweep == "auto":
            sp = args.sequence_parallel_size or args.world_size or 1
            lengths = default_sweep_lengths(args.seqlen, max(1, 2 * sp))
        else:
            try:
                lengths = [parse_seqlen(part, "sweep") for part in args.sweep.split(",") if part.strip()]
            except PlannerError as exc:
                return _fail(str(exc))
        results = sweep(lengths, args.world_size, args.heads, **common)
        topo_line = _topology_line(args)
        if args.format == "table":
            _render_sweep(results, topo_line, out, rich_ok, args.forward_only, args.wide)
        else:
            data = [{"seqlen": n, **({"error": str(r)} if isinstance(r, PlannerError) else {"plan": r.to_dict()})}
                    for n, r in results]
            _dump({"sweep": data}, args.format, out)
        return 0
    p = plan(args.world_size, args.seqlen, args.heads, **common, **packed)
    if args.format == "table":
        _render_plan(p, _topology_line(args), out, rich_ok, args.wide)
    else:
        _dump(p.to_dict(), args.format, out)
    return 0


def _topology_line(args: argparse.Namespace) -> str:
    topo = load_topology(args.topology)
    if args.gpus_per_node is not None:
        topo = topo.with_gpus_per_host(args.gpus_per_node)
    return f"topology {topo.describe()}"


def _dump(data: Any, fmt: str, out) -> None:
    if fmt == "json":
        print(json.dumps(data, indent=2), file=out)
    else:
        print(yaml.safe_dump(data, sort_keys=False, width=120), file=out, end="")


def _run_probe(args: argparse.Namespace, out) -> int:
    from .probing import probe  # lazy: torch

    topo = probe(output=args.output, name=args.name, message_sizes=args.sizes, iters=args.iters,
                 warmup=args.warmup, kernel=None if args.no_kernel else args.kernel, heads=args.heads,
                 head_dim=args.head_dim, dtype=args.dtype, kernel_blocks=args.blocks,
                 gpus_per_host=args.gpus_per_host, backend=args.backend, progress=not args.quiet)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"wrote {args.output}: {topo.describe()}", file=out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``usp-plan``; returns the exit status (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = sys.stdout
    try:
        if argv and argv[0] == "probe":
            return _run_probe(build_probe_parser().parse_args(argv[1:]), out)
        return _run_plan(build_parser().parse_args(argv), out)
    except PlannerError as exc:
        return _fail(str(exc))
    except SystemExit as exc:  # argparse: --help (0) or a bad command line (2, message already printed)
        return int(exc.code or 0)
    except BrokenPipeError:  # `usp-plan ... | head`: the reader left; what it wanted it has
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again (Python docs, "Note on
    SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests): nothing to flush at exit
        pass


if __name__ == "__main__":  # pragma: no cover - `python -m planner.cli`
    sys.exit(main())
