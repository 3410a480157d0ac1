"""End to end through ``lit-align``: every config runs a few steps; W&B offline logs read back."""

import contextlib
import csv
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb
import yaml
from transformers import AutoModelForCausalLM

from lit_align.cli import build_cli
from lit_align.rollout.server import config_server_argv, free_port, launch
from lit_align.wandb_offline import read_run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _finish_wandb():
    yield
    import wandb

    wandb.finish()  # a run left open would be reused by the next test's WandbLogger


SHORT = ["--trainer.max_steps=3"]  # for speed only: every other setting is the config's


@contextlib.contextmanager
def config_server(config):
    """The ``lit-align serve`` a config's header names, started as it says but on free ports (so
    runs side by side never collide); yields the overrides that point the config at it."""
    argv = config_server_argv(config)
    if argv is None:
        yield []
        return
    argv = [*argv, "--port", "0"]  # argparse: the last --port wins
    process, url = launch(argv, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    try:
        yield [f"--model.init_args.vllm_server_base_url={url}", f"--model.init_args.vllm_group_port={free_port()}"]
    finally:
        process.kill()
        process.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_runs_as_shipped(config, tmp_path, monkeypatch):
    """Each config as the first command in an empty directory, as shipped: only ``max_steps`` is
    overridden (validation, data and model settings are the config's). Runs land in ``tmp_path``.
    ``benchmarks/run_configs.py`` runs every config to its end and checks what its header promises."""
    monkeypatch.chdir(tmp_path)
    assert not any(tmp_path.iterdir())
    with config_server(config) as where:  # a config whose header starts a generation server first
        cli = build_cli(["fit", f"--config={config}", *SHORT, *where])
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


def cli_exit(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in this process up to its exit (help, --print_config, a bad argument)."""
    with pytest.raises(SystemExit) as stop:
        build_cli(args)
    out = capsys.readouterr()
    return stop.value.code or 0, out.out, out.err


def test_short_class_names_and_help(capsys):
    code, out, _ = cli_exit(["fit", "--model", "SFT", "--model.help", "SFT"], capsys)
    out = " ".join(out.split())  # argparse wraps help text
    assert code == 0
    for text in ("--model.loss_type", "Dynamic Fine-Tuning", "--model.peft", "peft.LoraConfig", "--model.nonfinite", "--model.model_init_kwargs"):
        assert text in out
    code, out, _ = cli_exit(["fit", "--data.help", "PromptCompletionDataModule"], capsys)
    out = " ".join(out.split())
    assert code == 0 and "--data.packing" in out and "best-fit decreasing" in out


def test_bad_config_value_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_exit(["fit", f"--config={ROOT / 'configs/sft.yaml'}", "--model.init_args.loss_type=xent"], capsys)
    assert code != 0
    assert "loss_type" in err and "xent" in err


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs/recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_recipes_parse(recipe, capsys):
    """Real-scale recipes need a GPU and the Hub; CI checks that they parse against the current API."""
    code, out, err = cli_exit(["fit", f"--config={recipe}", "--print_config"], capsys)
    assert code == 0, err[-2000:]
    assert "class_path: lit_align." in out


def test_a_misspelt_option_gets_a_suggestion_and_a_short_error(capsys):
    for args, hint in (
        (["--model.bta=0.2"], "lit_align.DPO has no argument 'bta'; did you mean 'beta'?"),
        (["--data.batchsize=2"], "did you mean 'batch_size'"),
        (["--trainer.maxx_steps=2"], "did you mean --trainer.max_steps"),
    ):
        code, _, err = cli_exit(["fit", f"--config={ROOT / 'configs/dpo.yaml'}", *args], capsys)
        assert code == 2
        assert hint in err and "Every option: " in err
        assert len(err.splitlines()) < 20  # the message, not a hundred lines of usage


def test_resume_continues_the_run_and_its_loggers(tmp_path, monkeypatch):
    """``--ckpt_path last`` finds the run's newest checkpoint, though it sits under a W&B run id
    that a new run would not know, and the loggers continue: the same W&B run id and CSV version,
    the CSV's rows before the checkpoint kept and each step logged once."""
    monkeypatch.chdir(tmp_path)
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "log_every_n_steps": 1, "limit_val_batches": 0, "enable_progress_bar": False,
            "logger": [
                # absolute: wandb's writer process keeps the working directory of the first run in this process
                {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "offline": True}},
                {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "flush_logs_every_n_steps": 1}},
            ],
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"every_n_train_steps": 4, "save_last": True}}],
        },
        "model": {"class_path": "lit_align.SFT"},
        "data": {"class_path": "lit_align.PromptCompletionDataModule",
                 "init_args": {"dataset_name_or_path": "builtin:arithmetic?size=64&steps=1&max_operand=4", "batch_size": 4}},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    first = build_cli(["fit", "--config=run.yaml", "--trainer.max_steps=6"])
    run_id, version = first.trainer.loggers[0].version, first.trainer.loggers[1].version
    first_run = Path(first.trainer.loggers[0].experiment.dir).absolute().parent
    wandb.finish()
    last = glob.glob(f"runs/lit_align/{run_id}/checkpoints/last.ckpt") or glob.glob(f"runs/*/{run_id}/checkpoints/last.ckpt")
    assert last, sorted(glob.glob("runs/**/*.ckpt", recursive=True))
    assert torch.load(last[0], weights_only=False)["global_step"] == 4
    # The run went on past its last checkpoint (step 4) to step 6: rows 4 and 5 will be logged again.
    second = build_cli(["fit", "--config=run.yaml", "--trainer.max_steps=10", "--ckpt_path=last"])
    assert second.trainer.loggers[0].version == run_id
    assert second.trainer.loggers[1].version == version
    assert len(glob.glob("runs/lightning_logs/version_*")) == 1
    rows = list(csv.DictReader(open(f"runs/lightning_logs/version_{version}/metrics.csv")))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == list(range(10)), steps
    second_run = Path(second.trainer.loggers[0].experiment.dir).absolute().parent
    wandb.finish()
    assert first_run != second_run  # two offline files under the one run id (wandb sync joins them)
    assert (first_run / f"run-{run_id}.wandb").exists() and (second_run / f"run-{run_id}.wandb").exists()


def test_the_epoch_counter_with_max_steps_alone():
    """Lightning's rich bar reads "Epoch 0/-2" when only max_steps bounds the run; ours "Epoch 0"."""
    pytest.importorskip("rich")
    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar

    from lit_align import SFT, PromptCompletionDataModule

    bar = RichProgressBar()
    trainer = L.Trainer(max_steps=1, callbacks=[bar], logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(SFT(), PromptCompletionDataModule("builtin:arithmetic?size=8", batch_size=4))
    assert trainer.max_epochs == -1 and bar._get_train_description(0) == "Epoch 0"
