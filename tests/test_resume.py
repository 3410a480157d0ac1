"""Pull the plug at any step, resume, get the same curve.

Each case trains in a subprocess (``tests/resume_run.py``) that checkpoints every few steps;
the test kills it with SIGKILL once it has passed a step drawn at random (not a checkpoint
step, mid-epoch; for GRPO, whose rollouts serve two steps each, checkpoints fall between
the two), resumes from ``last.ckpt`` and compares every step's loss with an
uninterrupted run of the same length: the data order (shuffling, packing, sharding, KTO's KL
pairs, repeated prompt batches), the random generators and a rollout being reused all come
back from the checkpoint, so nothing is seen twice, skipped, or sampled differently.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("resume_run.py")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def losses(log: Path) -> dict[tuple[int, int, int, int], dict[str, float]]:
    """Every logged ``train/`` metric by (step, epoch, batch, rank)."""
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return {(r["step"], r["epoch"], r["batch"], r["rank"]): r["metrics"] for r in rows}


def every(case: str) -> int:
    return 3 if case == "grpo" else 2


CASES = [("sft", 1, 16), ("sft_packed", 1, 12), ("dpo_precomputed", 1, 14), ("kto", 1, 14), ("grpo", 1, 10), ("sft", 2, 14)]
# Ctrl-C (SIGINT to the whole process group, as a terminal sends it) after step 5 of 200, with no
# periodic checkpoint: what resumes is what the interrupt saved.
CTRL_C = [("sft", 1, 200), ("sft", 2, 200)]


def start(folder: Path, case: str, devices: int, steps: int, checkpoint_every: int) -> subprocess.Popen:
    out = folder / "run"
    out.mkdir(parents=True)
    args = [sys.executable, str(SCRIPT), case, str(devices), str(out), str(steps), str(checkpoint_every)]
    return subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def last_step(log: Path) -> int:
    lines = log.read_text().splitlines()[-4:] if log.exists() else []
    return max([json.loads(line)["step"] for line in lines if line.endswith("}")], default=-1)


def checkpoint_step(folder: Path) -> int:
    return torch.load(folder / "run" / "ckpt" / "last.ckpt", weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """Every case and both Ctrl-C runs start at once (one thread each). A case is killed with
    SIGKILL once it has logged a step past one drawn at random (not a checkpoint step, mid-epoch;
    for GRPO, whose rollouts serve two steps each, checkpoints fall between the two). Then the
    uninterrupted runs and the resumptions: the one-process runs in one process, the two-process
    case beside it. In each ``<folder>``, ``before.jsonl`` holds what a run logged before it was
    stopped, ``run/losses.jsonl`` what it logged after resuming, ``straight/`` the uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    runs = {root / f"{c}-{d}": (c, d, n, every(c), "kill") for c, d, n in CASES}
    runs |= {root / f"ctrl-c-{c}-{d}": (c, d, n, 1000, "ctrl-c") for c, d, n in CTRL_C}
    stop_after = {f: 5 if how == "ctrl-c" else random.Random(f"{c}-{d}").choice([s for s in range(3, n - 3) if s % k])
                  for f, (c, d, n, k, how) in runs.items()}
    procs = {f: start(f, *spec[:4]) for f, spec in runs.items()}
    deadline, stopping = time.monotonic() + 600, set()
    while len(stopping) < len(procs) and time.monotonic() < deadline:
        for folder, proc in procs.items():
            if folder not in stopping and (proc.poll() is not None or last_step(folder / "run" / "losses.jsonl") > stop_after[folder]):
                os.killpg(proc.pid, signal.SIGINT if runs[folder][4] == "ctrl-c" else signal.SIGKILL)  # once each
                stopping.add(folder)
        time.sleep(0.005)
    for folder, proc in procs.items():
        try:
            stderr = proc.communicate(timeout=120)[1].decode()[-3000:]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stderr = proc.communicate()[1].decode()[-3000:]
        expected = 1 if runs[folder][4] == "ctrl-c" else -signal.SIGKILL  # Ctrl-C: Lightning's shutdown, exit 1
        assert proc.returncode == expected, f"{folder.name}: exit {proc.returncode}, not stopped as planned\n{stderr}"
        (folder / "run" / "losses.jsonl").rename(folder / "before.jsonl")

    jobs = [{"case": c, "devices": d, "out": str(f / "run"), "steps": n, "every": k, "straight": str(f / "straight")}
            for f, (c, d, n, k, how) in runs.items() if how == "kill"]
    folder = root / "ctrl-c-sft-1"  # resumed to three steps past its checkpoint (the two-process one: below)
    steps = checkpoint_step(folder) + 3
    jobs.append({"case": "sft", "devices": 1, "out": str(folder / "run"), "steps": steps, "every": 1000, "straight": str(folder / "straight")})
    (root / "jobs.json").write_text(json.dumps([j for j in jobs if j["devices"] == 1]))
    resumes = [subprocess.Popen([sys.executable, str(SCRIPT), "jobs", str(root / "jobs.json")], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
    resumes += [subprocess.Popen([sys.executable, str(SCRIPT), j["case"], str(j["devices"]), j["out"], str(j["steps"]),
                                  str(j["every"]), "resume", j["straight"]], env=ENV, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for j in jobs if j["devices"] > 1]
    for proc in resumes:
        stderr = proc.communicate(timeout=600)[1]
        assert proc.returncode == 0, stderr[-3000:]
    return root


def assert_same_curve(folder: Path) -> None:
    """What the run logged before it stopped and after it resumed equals the uninterrupted run."""
    before, straight, resumed = (losses(p) for p in (folder / "before.jsonl", folder / "straight" / "losses.jsonl",
                                                      folder / "run" / "losses.jsonl"))
    first = min(step for step, *_ in resumed)
    assert first <= max(step for step, *_ in before) + 1, "the resumed run skipped steps"
    assert set(resumed) | {k for k in before if k[0] < first} == set(straight), "steps or batches missing or repeated"
    for when, run in (("before the stop", before), ("after resuming", resumed)):
        for key, metrics in run.items():
            assert metrics.keys() == straight[key].keys()
            for name, value in metrics.items():
                assert value == pytest.approx(straight[key][name], abs=1e-6), f"{when}, step/epoch/batch/rank {key}: {name}"


@pytest.mark.slow
@pytest.mark.parametrize("case,devices,steps", CASES)
def test_killed_and_resumed_run_follows_the_uninterrupted_curve(case, devices, steps, interrupted):
    folder = interrupted / f"{case}-{devices}"
    assert checkpoint_step(folder) % every(case) == 0, "resumed from a step that no periodic checkpoint holds"
    assert_same_curve(folder)


@pytest.mark.slow
def test_ctrl_c_saves_at_a_step_boundary_and_resumes_to_the_same_curve(interrupted):
    """The first Ctrl-C lets the step finish, saves ``last.ckpt`` there and exits 1, as Lightning
    does on Ctrl-C; resuming from it continues the uninterrupted curve."""
    folder = interrupted / "ctrl-c-sft-1"
    step = checkpoint_step(folder)
    assert 5 < step < CTRL_C[0][2]
    assert max(s for s, *_ in losses(folder / "before.jsonl")) == step  # saved after the last step it logged
    assert max(s for s, *_ in losses(folder / "run" / "losses.jsonl")) == step + 3
    assert_same_curve(folder)


@pytest.mark.slow
def test_ctrl_c_with_two_processes_saves_every_rank(interrupted):
    """Under DDP both processes get the Ctrl-C at different points of a step; they agree to stop at
    the end of the same step and save one checkpoint with both ranks' random generators."""
    folder = interrupted / "ctrl-c-sft-2"
    checkpoint = torch.load(folder / "run" / "ckpt" / "last.ckpt", weights_only=True)
    before = losses(folder / "before.jsonl")
    assert 5 < checkpoint["global_step"] == max(s for s, *_ in before)
    assert {rank for *_, rank in before} == {0, 1}
    assert len(checkpoint["lit_align"]["rng"]) == 2


def test_a_save_cut_short_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """A kill in the middle of writing ``last.ckpt`` (simulated: half the bytes, then an error)
    leaves the previous ``last.ckpt`` loadable; Lightning's own writer would truncate it."""
    import io

    import lightning as L
    from lightning.fabric.plugins.io import torch_io
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from lit_align import SFT, PromptCompletionDataModule
    from lit_align.methods.safeguards import AtomicCheckpointIO

    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(SFT(), PromptCompletionDataModule("builtin:arithmetic?size=8", batch_size=4))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # installed by the module

    def cut_short(checkpoint, path):
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with open(path, "wb") as f:
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise KeyboardInterrupt("killed while saving")

    for writer in (AtomicCheckpointIO(), TorchCheckpointIO()):
        path = tmp_path / type(writer).__name__ / "last.ckpt"
        writer.save_checkpoint({"step": 1}, path)
        with monkeypatch.context() as patch:
            patch.setattr(torch_io, "_atomic_save", cut_short)
            with pytest.raises(KeyboardInterrupt):
                writer.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, path)
        if isinstance(writer, AtomicCheckpointIO):
            assert torch.load(path)["step"] == 1
        else:  # the default writer: what this guards against
            with pytest.raises(RuntimeError):
                torch.load(path)


def test_an_unwritable_output_directory_fails_before_the_first_step(tmp_path):
    import lightning as L

    from lit_align import SFT, PromptCompletionDataModule, SaveHFModel

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for callbacks, root, what in (
        ([SaveHFModel(dirpath=str(blocker / "hf"))], tmp_path, "SaveHFModel's dirpath"),
        ([L.pytorch.callbacks.ModelCheckpoint(dirpath=blocker / "ckpt")], tmp_path, "ModelCheckpoint's dirpath"),
        ([], blocker / "root", "default_root_dir"),
    ):
        module = SFT()
        trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, callbacks=callbacks, default_root_dir=root)
        with pytest.raises(OSError, match=f"{what} .* is not writable .*; the run would train and then lose"):
            trainer.fit(module, PromptCompletionDataModule("builtin:arithmetic?size=8", batch_size=4))
        assert trainer.global_step == 0 and getattr(module, "model", None) is None  # before the model loaded


def test_too_little_disk_for_a_checkpoint_fails_before_the_first_step(tmp_path, monkeypatch):
    import shutil

    import lightning as L

    from lit_align import SFT, PromptCompletionDataModule

    module = SFT()
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(OSError, match=r"ModelCheckpoint's dirpath .* has 0.00 GiB free, and one save needs about 0.0\d GiB"):
        trainer.fit(module, PromptCompletionDataModule("builtin:arithmetic?size=8", batch_size=4))
    assert trainer.global_step == 0


def test_a_second_ctrl_c_quits_without_saving_or_exporting():
    from lit_align.methods.safeguards import SaveOnInterrupt
    from lit_align.models.export import QuitNow, is_interrupt

    callback = SaveOnInterrupt()
    callback._on_sigint(signal.SIGINT, None)
    assert callback.requested  # the first: stop at the end of this step
    with pytest.raises(QuitNow):
        callback._on_sigint(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert is_interrupt(KeyboardInterrupt()) and not is_interrupt(QuitNow())  # SaveHFModel exports on the first only
