"""The examples run (a few steps each)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sft_in_lightning(tmp_path):
    metrics = load("sft_in_lightning").main(max_steps=4, out_dir=str(tmp_path))
    assert "train/loss" in metrics and "val/loss" in metrics
    assert (tmp_path / "hf_model" / "config.json").exists()


def test_sft_then_dpo(tmp_path):
    metrics = load("sft_then_dpo").main(sft_steps=3, dpo_steps=3, out_dir=str(tmp_path))
    assert "train/rewards/accuracies" in metrics
    assert (tmp_path / "dpo" / "config.json").exists()


def test_orpo_single_stage(tmp_path):
    metrics = load("orpo_single_stage").main(steps=3, out_dir=str(tmp_path))
    assert "train/log_odds_ratio" in metrics and "val/nll_loss" in metrics


def test_rlhf_pipeline(tmp_path):
    metrics = load("rlhf_pipeline").main(sft_steps=3, rm_steps=3, ppo_steps=4, out_dir=str(tmp_path))
    assert "train/objective/scores" in metrics and "train/loss/value_avg" in metrics
    assert (tmp_path / "reward" / "config.json").exists() and (tmp_path / "ppo" / "config.json").exists()


def test_grpo_custom_reward(tmp_path):
    metrics = load("grpo_custom_reward").main(sft_steps=3, grpo_steps=2, out_dir=str(tmp_path))
    assert {"train/rewards/close_answer/mean", "train/rewards/brevity/mean", "train/reward"} <= set(metrics)
