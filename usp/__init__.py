"""usp: exact attention over very long sequences split across GPUs (Ulysses x ring), with a planner.

Public API (see README.md): ``SequenceParallelMesh``, ``LongContextAttention``, ``long_context_attention``,
``shard``, ``gather``, ``position_ids``, ``plan``, ``Plan``, ``resolve_backend``, ``available_backends``.
Importing usp has no side effects: no process groups, no CUDA initialisation, no environment changes. The public
names are imported on first use (PEP 562), so ``import usp.spec`` and ``import usp.planner`` do not import torch.
"""
import importlib as _importlib

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it from here

# The planner's sources are the repository's top-level planner/ directory; an install places them at usp/planner
# (setup.py). Imported from a checkout itself (its root first on sys.path, e.g. `python -m pytest` run there), this
# package is the checkout's usp/, which has no planner/: then the checkout root is searched too, so that
# `usp.planner` is the checkout's planner/. Nothing is imported here.
import os as _os  # noqa: E402

_root = _os.path.dirname(_os.path.abspath(__path__[0]))
if not _os.path.isdir(_os.path.join(__path__[0], "planner")) and all(
        _os.path.isfile(_os.path.join(_root, *name)) for name in (("pyproject.toml",), ("planner", "__init__.py"))):
    __path__.append(_root)
del _os, _root

__all__ = [
    "AttentionKernel",
    "LongContextAttention",
    "Placement",
    "SequenceParallelMesh",
    "available_backends",
    "gather",
    "long_context_attention",
    "position_ids",
    "resolve_backend",
    "shard",
    "LongContextAttentionVarlen",
    "VarlenLayout",
    "gather_varlen",
    "long_context_attention_varlen",
    "padding_mask_varlen",
    "position_ids_varlen",
    "shard_varlen",
    "varlen_layout",
    "plan",
    "Plan",
    "choose",
]


#: public name -> the submodule that defines it (imported on first access; the planner's two as well)
_PUBLIC = {
    "LongContextAttention": "modules", "long_context_attention": "attention",
    "AttentionKernel": "kernels", "available_backends": "kernels", "resolve_backend": "kernels",
    "gather": "layout", "position_ids": "layout", "shard": "layout",
    "Placement": "spec", "SequenceParallelMesh": "mesh",
    **{name: "varlen" for name in ("LongContextAttentionVarlen", "VarlenLayout", "gather_varlen",
                                   "long_context_attention_varlen", "padding_mask_varlen", "position_ids_varlen",
                                   "shard_varlen", "varlen_layout")},
    "plan": "planner", "Plan": "planner", "choose": "planner",
}


def __getattr__(name):
    # PEP 562: the public names come from their submodules on first use, so `import usp` stays light and the
    # torch-free parts (usp.spec, usp.planner) can be imported without torch. Cached in the module's namespace.
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'usp' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
