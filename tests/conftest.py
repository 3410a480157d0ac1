import contextlib
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one core per worker (and per process it starts)
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from lit_align.models.builtin import builtin_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return builtin_tokenizer()


@pytest.fixture(scope="session")
def gkd_teacher(tmp_path_factory):
    """A teacher directory for GKD's multi-process runs: builtin:tiny with seeded noise, unlike the student."""
    from lit_align.models.builtin import builtin_model

    path = tmp_path_factory.mktemp("teacher")
    teacher = builtin_model("builtin:tiny")
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    teacher.save_pretrained(path)
    builtin_tokenizer().save_pretrained(path)
    return path


# The environment a learning test runs in. A learning test is a claim about a method, so it must
# hold on any x86 CPU: benchmarks/learning_matrix.py runs every test marked ``learning`` under
# ATEN_CPU_CAPABILITY=default|avx2|avx512, 1 and 2 threads and 3 seeds through these variables
# (the suite itself runs seed 0 on one thread).
LEARNING_SEED = int(os.environ.get("LIT_ALIGN_TEST_SEED", "0"))
LEARNING_THREADS = int(os.environ.get("LIT_ALIGN_TEST_THREADS", "1"))
LEARNING_LOG = os.environ.get("LIT_ALIGN_LEARNING_LOG")


@contextlib.contextmanager
def threads(n: int):
    """Run with ``n`` torch threads, and restore the count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Learning:
    """What a learning test gets: its seed (also the data's shuffling seed), and ``record`` to
    report the numbers its claim is about (written to ``$LIT_ALIGN_LEARNING_LOG`` for the matrix)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seed = LEARNING_SEED
        self.threads = LEARNING_THREADS

    def record(self, **values: float) -> None:
        if LEARNING_LOG:
            row = {"test": self.name, "seed": self.seed, "threads": self.threads,
                   "capability": os.environ.get("ATEN_CPU_CAPABILITY", "native"),
                   **{k: float(v) for k, v in values.items()}}
            with open(LEARNING_LOG, "a") as f:
                f.write(json.dumps(row) + "\n")
        print(self.name, values)


@pytest.fixture
def learning(request):
    """A learning run: seeded with ``LIT_ALIGN_TEST_SEED`` and on ``LIT_ALIGN_TEST_THREADS`` threads."""
    import lightning as L

    L.seed_everything(LEARNING_SEED)
    with threads(LEARNING_THREADS):
        yield Learning(request.node.nodeid.split("::", 1)[-1])
