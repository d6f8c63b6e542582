"""The module layout of issue 13: packed documents organised like the dense path, every old import path still
working, no import circle between ``usp.attention`` and ``usp.varlen``, caches owned by the objects they belong
to, and the cuDNN varlen name refused with its reason."""
import subprocess
import sys

import pytest
import torch


def test_old_import_paths_reach_the_new_modules():
    import usp
    import usp.attention
    import usp.kernels.varlen as kernels_varlen
    import usp.kernels.varlen_block as varlen_block
    import usp.modules
    import usp.varlen
    import usp.layout_varlen
    import usp.schedule_varlen

    for module, names, home in (
        (usp.varlen, ("VarlenLayout", "varlen_layout", "shard_varlen", "gather_varlen", "position_ids_varlen",
                      "padding_mask_varlen", "_build_layout", "_cu_seqlens_tuple", "_documents", "_device_padding"),
         usp.layout_varlen),
        (usp.varlen, ("VarlenSchedule", "_schedule_for_layout"), usp.schedule_varlen),
        (kernels_varlen, ("VarlenBlock", "VarlenBlockKernel", "VarlenCall"), varlen_block),
        (usp.attention, ("LongContextAttention",), usp.modules),
        (usp.varlen, ("LongContextAttentionVarlen",), usp.modules),
    ):
        for name in names:
            assert getattr(module, name) is getattr(home, name), f"{module.__name__}.{name}"
    assert usp.LongContextAttention is usp.modules.LongContextAttention
    assert issubclass(usp.LongContextAttentionVarlen, usp.LongContextAttention)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        usp.varlen.nothing
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        kernels_varlen.nothing


def test_no_submodule_shadows_a_public_name():
    """Importing a submodule binds it on the package: a module named like a public function (``usp.varlen_layout``)
    would replace the function once imported."""
    import importlib
    import pkgutil
    import types

    import usp

    for info in pkgutil.iter_modules(usp.__path__):
        assert info.name not in usp.__all__, f"usp/{info.name}.py shadows usp.{info.name}"
    for name in ("attention", "layout", "layout_varlen", "schedule_varlen", "varlen", "modules", "ring", "compiled"):
        importlib.import_module(f"usp.{name}")
    for name in usp.__all__:
        assert not isinstance(getattr(usp, name), types.ModuleType), name


def test_no_import_circle_between_attention_and_varlen():
    """``usp.varlen`` imports ``usp.attention``; ``usp.attention`` does not import ``usp.varlen`` (the module
    classes live above both, in ``usp.modules``)."""
    code = ("import sys, usp.attention; assert 'usp.varlen' not in sys.modules and 'usp.modules' not in sys.modules; "
            "import usp.varlen; assert 'usp.modules' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_layout_owns_what_is_built_from_it():
    """Rows, padding masks per device and schedules live on the ``VarlenLayout`` (no process-wide cache of
    them): built once, the same objects for the same layout, gone with a new layout."""
    from usp.varlen import _build_layout, _schedule_for_layout

    layout = _build_layout((0, 5, 12, 13), 2, 2, True)
    assert layout.ring_rows(1) is layout.ring_rows(1)
    padding = layout.device_padding(0, 1, torch.device("cpu"))
    assert padding is not None and padding is layout.device_padding(0, 1, "cpu")
    assert torch.equal(padding, layout.local_rows(0, 1)[0] < 0)
    schedule = _schedule_for_layout(layout, 0.0, (-1, -1))
    assert schedule is _schedule_for_layout(layout, 0.0, [-1, -1]) and schedule.layout is layout
    assert _schedule_for_layout(layout, 0.5) is not schedule
    assert layout.documents() == layout.documents() and "3 documents" in layout.documents()
    _build_layout.cache_clear()
    fresh = _build_layout((0, 5, 12, 13), 2, 2, True)
    assert fresh == layout and fresh is not layout and _schedule_for_layout(fresh) is not schedule


def test_the_varlen_layout_reads_the_spec():
    import usp.spec as spec
    import usp.layout_varlen as vl

    assert vl.varlen_chunks_per_doc is spec.varlen_chunks_per_doc
    assert vl.varlen_placement is spec.varlen_placement and vl.varlen_ring_rows is spec.varlen_ring_rows
    layout = vl._build_layout((0, 7, 20, 20, 31), 4, 2, True)
    cut, whole = spec.varlen_placement((7, 13, 11), 2, True)
    assert layout.cut_docs == cut and layout.whole_docs == whole and layout.chunks_per_doc == 4
    assert layout.chunk_sizes == tuple(-(-(7, 13, 11)[j] // 4) for j in cut)
    held = tuple(sum((7, 13, 11)[j] for j in docs) for docs in whole)
    assert layout.ring_tokens == spec.varlen_ring_rows(sum(layout.chunk_sizes), held, 4, 2, True)
    assert layout.local_tokens * 4 == layout.ring_tokens


def test_cudnn_varlen_is_refused_with_its_reason():
    from usp.kernels.varlen import VARLEN_BACKENDS, available_varlen_backends, resolve_varlen_backend

    assert "cudnn" in VARLEN_BACKENDS and "cudnn" not in available_varlen_backends()
    with pytest.raises(ValueError, match=r"backend='cudnn' cannot run here: varlen backend 'cudnn' is not "
                                         r"available: usp has no ragged cuDNN kernel.*pytorch#186142"):
        resolve_varlen_backend("cudnn", torch.device("cpu"), torch.bfloat16, 64)
