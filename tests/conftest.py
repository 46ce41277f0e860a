"""Fixtures shared by several test files (pytest finds them here; no imports needed)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["portable", "avx512bf16"])
def bnb_cpu_path(request, monkeypatch):
    """Run the test once as on a CPU without AVX512-BF16 and once as on one with it.

    bitsandbytes reads the CPU's AVX512-BF16 flag (``has_avx512bf16``) when a Linear4bit is
    constructed and, when set, switches eval-mode CPU forwards to a packed weight layout. The
    flag is patched where ``bitsandbytes.nn.modules`` looks it up, so both sides run on any
    machine. Yields the side's name.
    """
    modules = pytest.importorskip("bitsandbytes.nn.modules")
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: request.param == "avx512bf16")
    yield request.param
