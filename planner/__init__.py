"""usp's topology-aware planner: pick the Ulysses x ring split for a machine and an attention shape.

    >>> import planner
    >>> p = planner.plan(world_size=64, seqlen="1M", heads=32, kv_heads=8)   # default topology: DGX-H100 nodes
    >>> p.ulysses, p.ring, p.placement
    (8, 8, 'ulysses_inner')

Pieces: ``planner.topology`` (the machine: a YAML-described networkx graph with kernel rates), ``planner.cost``
(the per-layer time and memory model; every formula in its docstring), ``planner.search`` (``plan``, ``predict``,
``sweep``, ``Plan``), ``planner.probing`` (``planner.probe()`` measures a machine under torchrun and writes a
topology YAML) and ``planner.cli`` (the ``usp-plan`` command). Importing planner has no side effects and does
not import torch, and neither does planning: the rules of the core it prices (layouts and sequence multiples,
placements, head groups, K/V replication, head chunks, collective counts) come from ``usp.spec``, which imports
nothing from torch; the probe imports torch.
"""
from .batch import Chooser, choose
from .cost import CostModel, MemoryCost, PassCost, Shape
from .search import Candidate, Plan, plan, predict, sweep
from .topology import DEFAULT_PRESET, Topology, TopologyError, list_presets, load_topology
from .units import PlannerError

__all__ = [
    "Candidate",
    "Chooser",
    "CostModel",
    "DEFAULT_PRESET",
    "MemoryCost",
    "PassCost",
    "Plan",
    "PlannerError",
    "Shape",
    "choose",
    "Topology",
    "TopologyError",
    "list_presets",
    "load_topology",
    "plan",
    "predict",
    "probe",
    "sweep",
]


def probe(*args, **kwargs):
    """Measure this machine and return (and optionally write) a :class:`Topology`; see ``planner.probing.probe``.

    Run on every rank under torchrun (or with torch.distributed already initialised).
    """
    from .probing import probe as _probe  # lazy: imports torch

    return _probe(*args, **kwargs)
