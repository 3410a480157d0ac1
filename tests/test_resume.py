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

SCRIPT = Path(__file__).with_name("resume_run.py")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def losses(out: Path) -> dict[tuple[int, int, int, int], dict[str, float]]:
    """Every logged ``train/`` metric by (step, epoch, batch, rank)."""
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    return {(r["step"], r["epoch"], r["batch"], r["rank"]): r["metrics"] for r in rows}


def every(case: str) -> int:
    return 3 if case == "grpo" else 2


def train_straight_and_resume(case: str, devices: int, straight: Path, out: Path, steps: int) -> None:
    args = [sys.executable, str(SCRIPT), case, str(devices), str(out), str(steps), str(every(case)), "resume", str(straight)]
    proc = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def train_and_kill(case: str, devices: int, out: Path, steps: int, kill_after: int) -> int:
    """Start a run, SIGKILL it (its whole process group) once a step past ``kill_after`` is logged."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "losses.jsonl"
    args = [sys.executable, str(SCRIPT), case, str(devices), str(out), str(steps), str(every(case))]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and any(json.loads(line)["step"] > kill_after for line in log.read_text().splitlines()[-4:] if line.endswith("}")):
                break
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed (exit {proc.returncode})"
    return max(step for step, *_ in losses(out))


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,devices,steps",
    [("sft", 1, 16), ("sft_packed", 1, 12), ("dpo_precomputed", 1, 14), ("kto", 1, 14), ("grpo", 1, 10), ("sft", 2, 14)],
)
def test_killed_and_resumed_run_follows_the_uninterrupted_curve(case, devices, steps, tmp_path):
    kill_after = random.Random(f"{case}-{devices}").choice([s for s in range(3, steps - 3) if s % every(case)])
    killed_at = train_and_kill(case, devices, tmp_path / "run", steps, kill_after)
    before = losses(tmp_path / "run")
    (tmp_path / "run" / "losses.jsonl").unlink()
    train_straight_and_resume(case, devices, tmp_path / "straight", tmp_path / "run", steps)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "run")

    first = min(step for step, *_ in resumed)
    assert first <= killed_at, "the resumed run skipped steps"
    assert (first - 1) % every(case) == 0, "resumed from a step that no checkpoint holds"
    assert set(resumed) | {k for k in before if k[0] < first} == set(straight), "steps or batches missing or repeated"
    for when, run in (("before the kill", before), ("after resuming", resumed)):
        for key, metrics in run.items():
            assert metrics.keys() == straight[key].keys()
            for name, value in metrics.items():
                assert value == pytest.approx(straight[key][name], abs=1e-6), f"{when}, step/epoch/batch/rank {key}: {name}"


def test_a_save_cut_short_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """A kill in the middle of writing ``last.ckpt`` (simulated: half the bytes, then an error)
    leaves the previous ``last.ckpt`` loadable; Lightning's own writer would truncate it."""
    import io

    import lightning as L
    import torch
    from lightning.fabric.plugins.io import torch_io
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from lit_align import SFT, PromptCompletionDataModule
    from lit_align.methods.base import AtomicCheckpointIO

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


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
    """SIGINT mid-run: Lightning's graceful shutdown, and the module saves ``last.ckpt`` first."""
    import torch

    out = tmp_path / "run"
    out.mkdir()
    args = [sys.executable, str(SCRIPT), "sft", "1", str(out), "200", "1000"]  # no periodic checkpoint
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = out / "losses.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not (log.exists() and len(log.read_text().splitlines()) > 5):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    step = torch.load(out / "ckpt" / "last.ckpt", weights_only=True)["global_step"]
    assert 5 <= step < 200, stderr[-2000:]
    args = [sys.executable, str(SCRIPT), "sft", "1", str(out), str(step + 3), "1000", "resume", "-"]
    resumed = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max(s for s, *_ in losses(out)) == step + 3


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
