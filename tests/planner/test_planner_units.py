import pytest
import torch

from usp.planner.units import (PlannerError, canonical_dtype, dtype_bytes, format_tokens, parse_bytes,
                           parse_memory_limit, parse_seqlen)


@pytest.mark.parametrize("text, tokens", [(131072, 131072), ("131072", 131072), ("128k", 131072),
                                          ("128K", 131072), ("1M", 1048576), ("1m", 1048576), ("1.5M", 1572864),
                                          (" 32k ", 32768)])
def test_parse_seqlen(text, tokens):
    assert parse_seqlen(text) == tokens


@pytest.mark.parametrize("text", ["", "12q", "0", "-5", "1.3k", True, None, "k"])
def test_parse_seqlen_rejects(text):
    with pytest.raises(PlannerError, match="seqlen"):
        parse_seqlen(text)


@pytest.mark.parametrize("text, unit, value", [("40GiB", "", 40 * 1024**3), ("40G", "", 40 * 1024**3),
                                               ("40GB", "", 40 * 10**9), ("64MiB", "", 64 * 1024**2),
                                               ("40", "GiB", 40 * 1024**3), (1048576, "", 1048576),
                                               ("512", "", 512)])
def test_parse_bytes(text, unit, value):
    assert parse_bytes(text, default_unit=unit) == value


def test_parse_bytes_rejects_and_none():
    with pytest.raises(PlannerError, match="memory_limit"):
        parse_memory_limit("lots")
    with pytest.raises(PlannerError, match="positive"):
        parse_bytes(0, "memory_limit")
    assert parse_memory_limit(None) is None


def test_dtypes():
    assert canonical_dtype("torch.bfloat16") == canonical_dtype("bf16") == "bfloat16"
    assert dtype_bytes("fp32") == 4 and dtype_bytes("float16") == 2
    with pytest.raises(PlannerError, match="dtype='int8'"):
        canonical_dtype("int8")


def test_torch_dtype_accepted():
    assert canonical_dtype(torch.bfloat16) == "bfloat16"
    assert canonical_dtype(torch.float32) == "float32"


def test_format_tokens():
    assert format_tokens(131072) == "128K" and format_tokens(1048576) == "1M" and format_tokens(100000) == "100000"
