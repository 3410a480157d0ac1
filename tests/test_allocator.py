"""lit_align/allocator.py: after ``keep_freed_memory`` a freed large buffer is reused without page faults.

Each check runs in its own Python process, since the setting is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")

FAULTS = """
import json, resource, sys, torch
from lit_align.allocator import keep_freed_memory

def faults_per_buffer():  # minor page faults of allocating, writing and freeing 64 MB, after a first round
    counts = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 * 1024 * 1024).sum()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(counts[1:])

default = faults_per_buffer()
applied = keep_freed_memory()
print(json.dumps({"default": default, "applied": applied, "kept": faults_per_buffer()}))
"""


def _run(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if r["default"] < 10_000:  # 64 MB of 4 KiB pages is 16,384 faults; 2 MB pages make a few dozen
        pytest.skip(f"{r['default']} faults per 64 MB buffer by default: transparent huge pages set to 'always'")
    return r


def test_a_freed_buffer_is_reused_without_page_faults():
    r = _run({"LIT_ALIGN_KEEP_FREED_MEMORY": "1"})  # by default faulted in again on every round
    assert r["applied"] is True and r["kept"] < 1_000


def test_turned_off_by_the_environment():
    r = _run({"LIT_ALIGN_KEEP_FREED_MEMORY": "0"})
    assert r["applied"] is False and r["kept"] > 10_000


def test_the_cli_applies_it_before_building_and_the_server_does_not(monkeypatch):
    import lit_align.cli as cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("kept"))
    monkeypatch.setattr(cli, "build_cli", lambda args: calls.append("cli"))
    monkeypatch.setattr("lit_align.rollout.server.serve_main", lambda argv: calls.append("serve"))
    cli.main(["fit", "--config", "configs/sft.yaml"])
    cli.main(["serve", "--help"])
    assert calls == ["kept", "cli", "serve"]
