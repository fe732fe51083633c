"""A seeded protocol fuzz of a real ``ex4d serve`` (issue 17 item 7): 600 mutated or malformed lines
(wrong types, integers as floats, deep nesting, surrogates, outside/special/long paths, garbage bytes).
Every line gets exactly one final event, none is ``internal``, the service lives, nothing hangs. The
larger run (10,000+ lines) is ``benchmarks/fuzz_service.py``. Fails on any crash path a client can reach.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fuzzed_requests_never_crash_or_hang(tmp_path):
    spec = importlib.util.spec_from_file_location("fuzz_service", REPO / "benchmarks" / "fuzz_service.py")
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    stats = fuzz.run_fuzz(600, seed=3, workdir=tmp_path, time_limit=300)
    print(stats)
    assert stats["deaths"] == 0 and stats["hangs"] == 0 and stats["unanswered"] == 0, stats
    assert stats["internal_errors"] == 0, stats
    assert stats["final_events"] == stats["lines_sent"] == 600
