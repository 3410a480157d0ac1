"""Shared benchmark helpers: synthetic workloads, step timing, memory, child processes, tables.

Every framework runs in its own child process (``run_child``), so its peak resident memory
(``ru_maxrss``) is its own and nothing is shared with the other runs. A step is timed the same
way everywhere: the wall time between the ends of two consecutive optimizer steps, so data
loading, forward, backward, clipping, the optimizer and the framework's own per-step work are
all inside it; the first ``warmup`` steps are dropped.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import string
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------- environment


def offline_env() -> None:
    """No network, no experiment trackers (call before importing transformers)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["WANDB_MODE"] = "disabled"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once parallel work started
        pass


# --------------------------------------------------------------------------- workload


def _words(rng: random.Random, n_chars: int) -> str:
    """Random lowercase words separated by spaces, exactly ``n_chars`` characters (ASCII: 1 byte = 1 token)."""
    out: list[str] = []
    size = 0
    while size < n_chars:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:n_chars]


def synthetic_prompt_completion(
    n_rows: int,
    prompt_chars: tuple[int, int],
    completion_chars: tuple[int, int],
    seed: int = 0,
) -> list[dict[str, str]]:
    """Prompt-completion rows of random text, lengths uniform in the given ranges (in bytes = tokens
    of the byte tokenizer). Prompts much longer than completions: the usual shape of SFT data
    (instructions, documents, conversations) where only the answer is trained on."""
    rng = random.Random(f"bench-sft/{seed}")
    rows = []
    for _ in range(n_rows):
        prompt = "Context: " + _words(rng, rng.randint(*prompt_chars)) + "\nAnswer:"
        completion = " " + _words(rng, rng.randint(*completion_chars))
        rows.append({"prompt": prompt, "completion": completion})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- timing and memory


def rss_gb() -> float:
    """Current resident set size of this process, in GB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1024**3


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (``ru_maxrss``, KiB on Linux), in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


@dataclass
class StepClock:
    """Wall time and real-token count of each optimizer step, measured end to end (see module doc)."""

    times: list[float] = field(default_factory=list)  # seconds per step
    tokens: list[int] = field(default_factory=list)  # real (non-padding) tokens per step
    _last: float | None = None
    rss_start_gb: float = 0.0
    # Optional: a measurement run before the first step and after every step, outside the step's time
    # (bench_real's matmul-speed probe: ``probes[i]`` and ``probes[i + 1]`` bracket step ``i``).
    probe: Callable[[], float] | None = None
    probes: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.rss_start_gb = rss_gb()
        if self.probe is not None:
            self.probes.append(self.probe())
        self._last = time.perf_counter()

    def step_end(self, num_tokens: int) -> None:
        now = time.perf_counter()
        if self._last is None:
            raise RuntimeError("StepClock.start() was not called")
        self.times.append(now - self._last)
        self.tokens.append(int(num_tokens))
        if self.probe is not None:
            self.probes.append(self.probe())
            now = time.perf_counter()
        self._last = now


@dataclass
class Result:
    """What a child reports (one JSON line on stdout)."""

    name: str
    framework: str
    description: str
    steps: int
    warmup: int
    step_times: list[float]
    step_tokens: list[int]
    rss_start_gb: float
    peak_rss_gb: float
    extra: dict = field(default_factory=dict)

    @property
    def timed(self) -> tuple[list[float], list[int]]:
        return self.step_times[self.warmup :], self.step_tokens[self.warmup :]

    @property
    def steps_per_s(self) -> float:
        times, _ = self.timed
        return len(times) / sum(times)

    @property
    def tokens_per_s(self) -> float:
        times, tokens = self.timed
        return sum(tokens) / sum(times)

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.timed[0])

    @property
    def tokens_per_step(self) -> float:
        return statistics.mean(self.timed[1])

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Result:
        return cls(**json.loads(text))


RESULT_PREFIX = "@@RESULT@@ "


def emit(result: Result) -> None:
    print(RESULT_PREFIX + result.to_json(), flush=True)


def _cpu_busy_seconds() -> float:
    """CPU time spent busy by the whole machine since boot (all CPUs, from ``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_child(argv: list[str], timeout: float | None = None, verbose: bool = False) -> Result:
    """Run ``python argv...`` in a fresh process and parse the :class:`Result` it emits.

    Also records how many CPUs *other* processes kept busy meanwhile (machine busy time minus the
    child's own CPU time, per second of wall time) in ``extra["other_cpus_busy"]``: on a shared
    machine, a run with a high value was slowed down by someone else and should be repeated.
    """
    busy0, child0, wall0 = _cpu_busy_seconds(), _children_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"child {' '.join(argv)} failed (exit {proc.returncode}):\n"
            f"--- stdout (tail) ---\n{proc.stdout[-3000:]}\n--- stderr (tail) ---\n{proc.stderr[-6000:]}"
        )
    wall = time.perf_counter() - wall0
    others = (_cpu_busy_seconds() - busy0) - (_children_cpu_seconds() - child0)
    result = Result.from_json(lines[-1][len(RESULT_PREFIX) :])
    result.extra["other_cpus_busy"] = round(max(others, 0.0) / wall, 2)
    if verbose:
        sys.stderr.write(proc.stderr[-4000:])
        sys.stderr.write(
            "\n".join(line for line in proc.stdout.splitlines() if not line.startswith(RESULT_PREFIX))
        )
    return result


def _children_cpu_seconds() -> float:
    """CPU time of this process's finished children (user + system)."""
    t = os.times()
    return t.children_user + t.children_system


def pick_result(results: list[Result], how: str = "quiet-median", slack: float = 0.05) -> Result:
    """One run of several of a configuration.

    - ``quiet-median``: the median (by tokens/s) of the quiet runs, those during which other
      processes kept at most ``slack`` more CPUs busy than during the quietest one;
    - ``quietest``: the run other processes disturbed least (the first of equals);
    - ``median``: the median of all runs.
    """
    busy = [r.extra.get("other_cpus_busy", 0.0) for r in results]
    if how == "quietest":
        return results[busy.index(min(busy))]
    if how == "quiet-median":
        results = [r for r, b in zip(results, busy) if b <= min(busy) + slack]
    elif how != "median":
        raise ValueError(f"unknown pick {how!r}: expected 'quiet-median', 'quietest' or 'median'")
    ranked = sorted(results, key=lambda r: r.tokens_per_s)
    return ranked[(len(ranked) - 1) // 2]


# --------------------------------------------------------------------------- tables


def _fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def results_table(results: list[Result]) -> str:
    headers = [
        "config",
        "steps/s",
        "median step (s)",
        "tokens/step",
        "tokens/s",
        "peak RSS (GB)",
        "RSS at start (GB)",
        "other CPUs busy",
    ]
    rows = [
        [
            r.name,
            _fmt(r.steps_per_s, 3),
            _fmt(r.median_step_s, 3),
            _fmt(r.tokens_per_step, 0),
            _fmt(r.tokens_per_s, 0),
            _fmt(r.peak_rss_gb, 2),
            _fmt(r.rss_start_gb, 2),
            _fmt(r.extra.get("other_cpus_busy", float("nan")), 2),
        ]
        for r in results
    ]
    return markdown_table(headers, rows)


def ratio_table(results: list[Result], numerators: list[str], denominators: list[str]) -> str:
    """lit-align / TRL for each metric: higher is better for speed, lower is better for memory."""
    by_name = {r.name: r for r in results}
    headers = ["lit-align / TRL", "steps/s", "tokens/s", "peak RSS"]
    rows = []
    for num in numerators:
        for den in denominators:
            if num not in by_name or den not in by_name:
                continue
            a, b = by_name[num], by_name[den]
            rows.append(
                [
                    f"{num} / {den}",
                    _fmt(a.steps_per_s / b.steps_per_s) + "x",
                    _fmt(a.tokens_per_s / b.tokens_per_s) + "x",
                    _fmt(a.peak_rss_gb / b.peak_rss_gb) + "x",
                ]
            )
    return markdown_table(headers, rows) if rows else ""
