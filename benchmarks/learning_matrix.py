"""Run every learning test on every CPU kernel, with 1 and 2 threads, for 3 seeds.

    python benchmarks/learning_matrix.py --jobs 2                 # the whole matrix
    python benchmarks/learning_matrix.py -k grpo --seeds 0 1 2    # some tests, some cells

A learning test (``pytest -m learning``) claims that a method moves its target metric on the
synthetic task. That is a claim about the method, not about one floating-point trajectory, so it
must hold wherever the suite runs: this script runs the tests once per cell of
``ATEN_CPU_CAPABILITY`` (``default``, ``avx2``, and ``avx512`` where the CPU has it) x torch
threads (1, 2) x seeds (0, 1, 2), through the variables ``tests/conftest.py`` reads
(``LIT_ALIGN_TEST_SEED``, ``LIT_ALIGN_TEST_THREADS``), and collects the numbers each test
records. It prints one line per cell and a markdown table: for each test, the range of every
recorded number over the matrix and how many cells passed. Exit status 1 if any cell failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_configs import capabilities, run_grid, span  # noqa: E402


def run_cell(capability: str, threads: int, seed: int, select: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        log, junit = Path(tmp) / "learning.jsonl", Path(tmp) / "junit.xml"
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, LIT_ALIGN_TEST_SEED=str(seed),
                   LIT_ALIGN_TEST_THREADS=str(threads), LIT_ALIGN_LEARNING_LOG=str(log), OMP_NUM_THREADS=str(threads))
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "learning",
                   f"--junitxml={junit}", *(["-k", select] if select else [])]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        outcome = {}
        if junit.exists():
            for case in ET.parse(junit).getroot().iter("testcase"):
                name = case.get("name")
                failed = case.find("failure") is not None or case.find("error") is not None
                outcome[name] = "skipped" if case.find("skipped") is not None else ("failed" if failed else "passed")
    return {"capability": capability, "threads": threads, "seed": seed, "seconds": round(seconds, 1),
            "returncode": proc.returncode, "outcome": outcome, "records": records,
            "tail": proc.stdout[-3000:] if proc.returncode not in (0, 5) else ""}


def describe(cell: dict) -> str:
    failed = [n for n, o in cell["outcome"].items() if o == "failed"]
    line = (f"{cell['capability']:<7} t{cell['threads']} s{cell['seed']} {cell['seconds']:6.0f}s "
            f"{sum(o == 'passed' for o in cell['outcome'].values())} passed")
    return line + (f", FAILED: {', '.join(failed)}" if failed else "") + (f"\n{cell['tail']}" if cell["tail"] else "")


def table(cells: list[dict]) -> str:
    lines = ["| test | recorded (range over the matrix) | passed |", "|---|---|---|"]
    tests = list(dict.fromkeys(name for c in cells for name in c["outcome"]))
    for test in tests:
        rows = [r for c in cells for r in c["records"] if r["test"].endswith(test)]
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("test", "seed", "threads", "capability")]
        ranges = ", ".join(f"{k} {span([r[k] for r in rows if k in r])}" for k in keys) or "-"
        passed = sum(c["outcome"].get(test) == "passed" for c in cells)
        lines.append(f"| {test} | {ranges} | {passed}/{len(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="select", help="pytest -k expression to run some of the learning tests")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--capabilities", nargs="+", help="default: every kernel this CPU has")
    parser.add_argument("--jobs", type=int, default=1, help="CPU cores to fill with concurrent cells")
    parser.add_argument("--out", type=Path, help="append every cell as a JSON line to this file")
    args = parser.parse_args()

    grid = [(cap, t, s) for t in args.threads for cap in (args.capabilities or capabilities()) for s in args.seeds]
    cells = run_grid(grid, lambda c: run_cell(*c, args.select), lambda c: c[1] > 1, args.jobs, describe, args.out)
    print()
    print(table(cells))
    sys.exit(0 if all(c["returncode"] in (0, 5) for c in cells) else 1)


if __name__ == "__main__":
    main()
