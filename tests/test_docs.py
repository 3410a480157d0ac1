"""The documentation site builds with warnings as errors, and its migration page covers every
field TRL 1.16's configs add to TrainingArguments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_docs_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocstrings")
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    gen = subprocess.run([sys.executable, "docs/gen_pages.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr[-3000:]
    site = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert site.returncode == 0, site.stderr[-3000:]
    assert (tmp_path / "site/methods/grpo/index.html").exists()
    migration = (ROOT / "build/docs/migration.md").read_text()
    rows = [line for line in migration.splitlines() if line.startswith("| `")]
    assert len(rows) == 285  # SFT 21, DPO 25, KTO 17, Reward 11, CPO 14, ORPO 10, GKD 29, OnlineDPO 30, RLOO 51, GRPO 77
    assert "| `model_init_kwargs` | `None` | `GRPO(model_init_kwargs=...)` |" in migration
