import contextlib
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from lit_align.models.builtin import builtin_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return builtin_tokenizer()


@contextlib.contextmanager
def one_thread():
    """Run with one torch thread, and restore the count after. Some test modules set one thread at
    import, so the whole suite runs with one; the SFT start point and the learning runs pin it so
    they train the same alone and in the suite (RL trajectories are sensitive to reduction order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory):
    """The starting point of the online methods, made as their configs say: ``configs/sft.yaml``
    through the CLI (what ``lit-align fit --config configs/sft.yaml`` leaves in runs/sft/hf_model)."""
    from pathlib import Path

    from lit_align.cli import build_cli

    root = tmp_path_factory.mktemp("sft-run")
    config = Path(__file__).resolve().parents[1] / "configs" / "sft.yaml"
    cwd = os.getcwd()
    os.chdir(root)  # the config's relative run directories land here
    with one_thread():
        try:
            build_cli(["fit", f"--config={config}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                       "--trainer.logger.save_dir=runs/sft", "--trainer.enable_progress_bar=false",
                       "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false"])
        finally:
            os.chdir(cwd)
    return str(root / "runs" / "sft" / "hf_model")
