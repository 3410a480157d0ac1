"""End to end through ``lit-align``: every config runs a few steps; W&B offline logs read back."""

import glob
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from lit_align.cli import build_cli
from lit_align.wandb_offline import read_run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _finish_wandb():
    yield
    import wandb

    wandb.finish()  # a run left open would be reused by the next test's WandbLogger


SHORT = ["--trainer.max_steps=3"]  # for speed only: every other setting is the config's


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_runs_as_shipped(config, tmp_path, monkeypatch):
    """Each config as the first command in an empty directory, as shipped: only ``max_steps`` is
    overridden (validation, data and model settings are the config's). Runs land in ``tmp_path``.
    ``benchmarks/run_configs.py`` runs every config to its end and checks what its header promises."""
    monkeypatch.chdir(tmp_path)
    assert not any(tmp_path.iterdir())
    cli = build_cli(["fit", f"--config={config}", *SHORT])
    if cli.model.automatic_optimization:
        assert cli.trainer.global_step == 3
    else:  # PPO: every rollout takes num_ppo_epochs x num_mini_batches optimizer steps, and runs whole
        per_rollout = cli.model.num_ppo_epochs * cli.model.num_mini_batches
        assert cli.trainer.global_step == -(-3 // per_rollout) * per_rollout
    assert "train/loss" in cli.trainer.callback_metrics
    assert cli.datamodule.tokenizer_name_or_path == cli.model.model_name_or_path  # linked
    # No config needs another to have run: the models and data it reads are builtin or from the Hub.
    settings = yaml.safe_load(config.read_text())
    for section in ("model", "data"):
        reads = [v for v in settings[section]["init_args"].values() if isinstance(v, str) and v.startswith("runs/")]
        assert not reads, f"{config.name} {section} reads {reads}"


@pytest.mark.slow
def test_the_mission_command_from_an_empty_directory(tmp_path):
    """``lit-align fit --config configs/dpo.yaml`` through the console script, in an empty directory."""
    script = Path(sys.executable).with_name("lit-align")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lit_align.cli"]
    proc = subprocess.run([*command, "fit", f"--config={ROOT / 'configs/dpo.yaml'}", "--trainer.max_steps=2"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs/dpo/hf_model/config.json").exists()


@pytest.mark.slow
def test_the_sft_then_grpo_chain(tmp_path, monkeypatch):
    """The documented chain: configs/sft.yaml, then configs/grpo.yaml from its export."""
    monkeypatch.chdir(tmp_path)
    build_cli(["fit", f"--config={ROOT / 'configs/sft.yaml'}", *SHORT])
    import wandb

    wandb.finish()
    cli = build_cli(["fit", f"--config={ROOT / 'configs/grpo.yaml'}", *SHORT, "--model.model_name_or_path=runs/sft/hf_model"])
    assert cli.trainer.global_step == 3 and cli.datamodule.tokenizer_name_or_path == "runs/sft/hf_model"


@pytest.mark.slow
def test_sft_config_leaves_hf_model_config_and_wandb_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # An absolute save_dir: wandb resolves relative directories against the first run's cwd.
    save_dir = f"--trainer.logger.init_args.save_dir={tmp_path / 'runs/sft'}"
    # Log and validate within the 3 steps: this test reads the W&B run back (test_every_config_runs_as_shipped
    # runs the config untouched).
    often = ["--trainer.log_every_n_steps=1", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1"]
    build_cli(["fit", f"--config={ROOT / 'configs/sft.yaml'}", *SHORT, *often, save_dir])
    import wandb

    wandb.finish()  # flush the offline run file
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "runs/sft/hf_model")
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert (tmp_path / "runs/sft/config.yaml").exists()
    (run_file,) = glob.glob(str(tmp_path / "runs/sft/wandb/offline-run-*/run-*.wandb"))
    history, config = read_run(Path(run_file))
    keys = set().union(*history)
    assert {"train/loss", "train/entropy", "train/mean_token_accuracy", "train/num_tokens", "val/loss"} <= keys
    assert config["config"]["model"]["class_path"] == "lit_align.SFT"
    assert config["config"]["model"]["init_args"]["model_name_or_path"] == "builtin:tiny"


def test_short_class_names_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "lit_align.cli", "fit", "--model", "SFT", "--model.help", "SFT"],
        capture_output=True, text=True, check=True,
    ).stdout
    out = " ".join(out.split())  # argparse wraps help text
    for text in ("--model.loss_type", "Dynamic Fine-Tuning", "--model.peft", "LoRA settings"):
        assert text in out
    out = subprocess.run(
        [sys.executable, "-m", "lit_align.cli", "fit", "--data.help", "PromptCompletionDataModule"],
        capture_output=True, text=True, check=True,
    ).stdout
    out = " ".join(out.split())
    assert "--data.packing" in out and "best-fit decreasing" in out


def test_bad_config_value_is_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "lit_align.cli", "fit", f"--config={ROOT / 'configs/sft.yaml'}", "--model.init_args.loss_type=xent"],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0
    assert "loss_type" in proc.stderr and "xent" in proc.stderr


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs/recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_recipes_parse(recipe):
    """Real-scale recipes need a GPU and the Hub; CI checks that they parse against the current API."""
    proc = subprocess.run(
        [sys.executable, "-m", "lit_align.cli", "fit", f"--config={recipe}", "--print_config"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "class_path: lit_align." in proc.stdout
