"""Run configs to their end, as shipped, and check what each header promises.

    python benchmarks/run_configs.py                    # every config in configs/, once, on this CPU
    python benchmarks/run_configs.py grpo rloo          # some of them
    python benchmarks/run_configs.py --matrix --jobs 2  # x CPU kernels x 1-2 threads x 3 seeds

Each run is ``lit-align fit --config configs/<name>.yaml`` as the first command in a fresh empty
directory (``--keep DIR`` keeps them), with nothing overridden but, in the matrix, the seed
(``--seed_everything`` and the data's shuffling ``--data.init_args.seed``; seed 0 is the config's
own). A config whose header names a generation server (``# serve: lit-align serve ...``) gets it
started first, as the header says but on free ports so runs side by side do not collide
(``vllm_server_base_url`` and ``vllm_group_port`` point the run at it). The environment sets the rest: ``ATEN_CPU_CAPABILITY`` picks the CPU kernels
(``default``, ``avx2``, ``avx512`` where the CPU has it: trajectories differ between them) and
``OMP_NUM_THREADS`` the torch threads.

A config promises what it learns in header lines, read back from its offline W&B run:

    # expect: train/reward rises by >= 0.1       mean of the last quarter of the logged values minus
                                                 the mean of the first quarter
    # expect: val/loss falls by >= 50%           the same drop, relative to the first quarter
    # expect: train/rewards/accuracies ends >= 0.9    the mean of the last quarter

Prints one line per run and a markdown table with the range of each number over the runs (the
README's config numbers come from it); ``--out`` also keeps every run as a JSON line. Exit status
1 when a run fails or breaks a promise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_align.rollout.server import config_server_argv, free_port, launch  # noqa: E402
from lit_align.wandb_offline import metric_series, read_run  # noqa: E402

EXPECT = re.compile(r"^#\s*expect:\s*(\S+)\s+(rises by|falls by|ends)\s*(>=|<=)\s*([-+0-9.eE]+)(%?)\s*$")


@dataclass(frozen=True)
class Promise:
    metric: str
    kind: str  # "rises by" | "falls by" | "ends"
    op: str  # ">=" | "<="
    value: float
    relative: bool

    def __str__(self) -> str:
        return f"{self.metric} {self.kind} {self.op} {self.value:g}{'%' if self.relative else ''}"

    def measure(self, values: list[float]) -> dict[str, float]:
        k = max(1, len(values) // 4)
        first, last = sum(values[:k]) / k, sum(values[-k:]) / k
        if self.kind == "ends":
            score = last
        else:
            change = last - first if self.kind == "rises by" else first - last
            score = 100 * change / abs(first) if self.relative else change
        return {"first": first, "last": last, "score": score}

    def holds(self, score: float) -> bool:
        return score >= self.value if self.op == ">=" else score <= self.value


def promises(config: Path) -> list[Promise]:
    out = []
    for line in config.read_text().splitlines():
        m = EXPECT.match(line.strip())
        if m:
            metric, kind, op, value, pct = m.groups()
            out.append(Promise(metric, kind, op, float(value), pct == "%"))
        elif line.strip().lower().startswith("# expect"):
            raise ValueError(f"{config}: cannot read the promise {line.strip()!r}")
    return out


def capabilities() -> list[str]:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return ["default", "avx2", *(["avx512"] if "avx512f" in flags else [])]


def lit_align_command() -> list[str]:
    script = Path(sys.executable).with_name("lit-align")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lit_align.cli"]


def run_one(config: Path, capability: str | None, threads: int | None, seed: int, keep: Path | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true")
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    args = [f"--seed_everything={seed}", f"--data.init_args.seed={seed}"] if seed else []
    label = f"{config.stem}-{capability or 'native'}-t{threads or 'all'}-s{seed}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=keep))
    start = time.perf_counter()
    server = None
    serve = config_server_argv(config)
    if serve is not None:
        server, url = launch([*serve, "--port", "0"], env=env, cwd=str(workdir), timeout=300)
        args += [f"--model.init_args.vllm_server_base_url={url}", f"--model.init_args.vllm_group_port={free_port()}"]
    try:
        proc = subprocess.run(
            [*lit_align_command(), "fit", f"--config={config}", "--trainer.enable_progress_bar=false", *args],
            cwd=workdir, env=env, capture_output=True, text=True,
        )
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=30)
    row = {"config": config.stem, "capability": capability or "native", "threads": threads or 0, "seed": seed,
           "seconds": round(time.perf_counter() - start, 1), "returncode": proc.returncode, "dir": str(workdir)}
    if proc.returncode != 0:
        row["error"] = proc.stderr[-2000:]
        return row
    files = glob.glob(str(workdir / "runs/*/wandb/offline-run-*/run-*.wandb"))
    history = read_run(Path(files[0]))[0] if files else []
    row["promises"] = {}
    for promise in promises(config):
        values = [v for _, v in metric_series(history, promise.metric)]
        if not values:
            row["promises"][str(promise)] = {"error": f"{promise.metric} was never logged"}
            continue
        result = promise.measure(values)
        result["holds"] = promise.holds(result["score"])
        row["promises"][str(promise)] = result
    if keep is None:
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    return row


def ok(row: dict) -> bool:
    return row["returncode"] == 0 and all(p.get("holds", False) for p in row.get("promises", {}).values())


def describe(row: dict) -> str:
    head = f"{row['config']:<11} {row['capability']:<7} t{row['threads']} s{row['seed']} {row['seconds']:6.1f}s"
    if row["returncode"] != 0:
        return f"{head} FAILED (exit {row['returncode']}): {row['error'].strip().splitlines()[-1]}"
    parts = [f"{name}: {p['first']:.3f} -> {p['last']:.3f} {'ok' if p['holds'] else 'BROKEN'}" if "first" in p
             else f"{name}: {p['error']}" for name, p in row["promises"].items()]
    return f"{head} {'; '.join(parts) or '(no promise)'}"


def span(values: list[float], digits: int = 3) -> str:
    """``lo to hi`` of ``values`` (one number when they round alike)."""
    lo, hi = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return lo if lo == hi else f"{lo} to {hi}"


def table(rows: list[dict]) -> str:
    """Per config and promise: the range of the first- and last-quarter means over the runs, and how
    many runs kept it. Seconds are those of the runs that had the machine's cores to themselves
    (more than one thread, run one at a time), when there are any."""
    lines = ["| config | runs | seconds | promise | first quarter | last quarter | held |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name]
        done = [r for r in mine if r["returncode"] == 0]
        alone = [r for r in mine if r["threads"] != 1] or mine
        seconds = span([r["seconds"] for r in alone], 0)
        names = list(dict.fromkeys(k for r in done for k in r["promises"])) or ["(none)"]
        for promise in names:
            got = [r["promises"][promise] for r in done if "first" in r["promises"].get(promise, {})]
            first = span([p["first"] for p in got]) if got else "-"
            last = span([p["last"] for p in got]) if got else "-"
            held = sum(p["holds"] for p in got) if promise != "(none)" else len(done)
            lines.append(f"| {name} | {len(mine)} | {seconds} | {promise} | {first} | {last} | {held}/{len(mine)} |")
    return "\n".join(lines)


def run_grid(cells: list, run, is_wide, jobs: int, describe, out: Path | None) -> list[dict]:
    """``run(cell)`` for every cell, printing ``describe(result)`` and appending the result to ``out`` as
    a JSON line as each ends: one-thread cells ``jobs`` at a time (they share the cores), wider ones
    (``is_wide(cell)``) in turn, ``jobs // 2`` at a time."""
    results = []
    for wide in (False, True):
        batch = [cell for cell in cells if bool(is_wide(cell)) == wide]
        with concurrent.futures.ThreadPoolExecutor(max(1, jobs // (2 if wide else 1))) as pool:
            for result in pool.map(run, batch):
                print(describe(result), flush=True)
                results.append(result)
                if out:
                    with out.open("a") as f:
                        f.write(json.dumps(result) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", help="config names (default: every configs/*.yaml)")
    parser.add_argument("--matrix", action="store_true", help="every CPU kernel x 1 and 2 threads x 3 seeds")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0; with --matrix 0 1 2)")
    parser.add_argument("--threads", type=int, nargs="+", help="torch threads (default: torch's; with --matrix 1 2)")
    parser.add_argument("--capabilities", nargs="+", help="ATEN_CPU_CAPABILITY values (with --matrix: all this CPU has)")
    parser.add_argument("--jobs", type=int, default=1, help="CPU cores to fill with concurrent runs")
    parser.add_argument("--out", type=Path, help="append every run as a JSON line to this file")
    parser.add_argument("--keep", type=Path, help="keep the run directories under this folder")
    args = parser.parse_args()

    names = args.configs or sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    configs = [ROOT / "configs" / f"{n.removesuffix('.yaml')}.yaml" for n in names]
    for c in configs:
        if not c.exists():
            parser.error(f"no config {c}")
        promises(c)  # a promise that does not parse is an error before anything runs
    seeds = args.seeds or ([0, 1, 2] if args.matrix else [0])
    threads = args.threads or ([1, 2] if args.matrix else [None])
    caps = args.capabilities or (capabilities() if args.matrix else [None])
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    cells = [(c, cap, t, s) for c in configs for t in threads for cap in caps for s in seeds]
    rows = run_grid(cells, lambda c: run_one(*c, args.keep), lambda c: c[2] is None or c[2] > 1, args.jobs, describe, args.out)
    print()
    print(table(rows))
    sys.exit(0 if all(ok(r) for r in rows) else 1)


if __name__ == "__main__":
    main()
