"""GRPO's TRL 1.16 objective options through Lightning: the ``luspo`` and ``vespo`` loss types, the
entropy bonus (fixed, adaptive across gradient accumulation and checkpoints, its gradient), the
importance-sampling correction and off-policy mask of a sampler that is not the trained model, and
the constructor's checks. The loss math itself is checked against TRL in test_losses_online.py."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.testing import assert_close

from lit_align import GRPO, PromptOnlyDataModule, RolloutCallback
from lit_align.models.builtin import builtin_tokenizer
from lit_align.ops.completions import completion_batch, completion_hidden, completion_logprobs
from lit_align.rollout.engines import HFEngine
from tests.scripted_engine import ScriptedEngine

DATA = "builtin:arithmetic?size=64&steps=1&max_operand=4"
REWARD = {"reward_funcs": ["arithmetic_reward"], "num_generations": 4, "max_completion_length": 16}


def adamw(lr: float):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


class Record(L.Callback):
    """Each step's ``train/`` metrics, rollout and (at optimizer steps) the policy's gradients."""

    def __init__(self):
        self.metrics, self.rollouts, self.grads = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rollouts.append(batch.rollout)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def fit(module, steps=2, engine=None, batch_size=8, ckpt_path=None, callbacks=(), **kwargs) -> tuple[L.Trainer, Record]:
    record = Record()
    rollout = [RolloutCallback(engine=engine if engine is not None else ScriptedEngine(builtin_tokenizer()))]
    kwargs.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, callbacks=[*rollout, record, *callbacks], **kwargs)
    trainer.fit(module, PromptOnlyDataModule(DATA, batch_size=batch_size), ckpt_path=ckpt_path)
    return trainer, record


class OwnCopyEngine(ScriptedEngine):
    """A sampler with its own copy of the policy (as vLLM or a generation server): it samples the
    policy only and reports log-probs that differ from the trained model's by seeded noise."""

    samples_any_model = False

    def __init__(self, tokenizer=None, noise: float = 0.2, shift: float = 0.0) -> None:
        super().__init__(tokenizer)
        self.noise, self.shift = noise, shift

    def generate(self, model, prompt_ids, prompt_mask, sampling):
        gens = super().generate(model, prompt_ids, prompt_mask, sampling)
        seqs = completion_batch(gens.prompt_ids, gens.prompt_mask, gens.completion_ids, gens.completion_mask,
                                self.tokenizer.pad_token_id)
        with torch.no_grad():
            logps, _ = completion_logprobs(model, seqs, gens.completion_mask, temperature=sampling.temperature)
        noise = torch.randn(logps.shape, generator=torch.Generator().manual_seed(self.calls)) * self.noise
        gens.sampling_logps = (logps + noise + self.shift) * gens.completion_mask
        return gens


def changed(before: dict, module) -> bool:
    return any(not torch.equal(v, module.model.state_dict()[k]) for k, v in before.items())


# --------------------------------------------------------------------------- loss types


@pytest.mark.parametrize("loss_type,level,metric", [
    ("luspo", "sequence", "train/clip_ratio/region_mean"), ("vespo", "token", "train/vespo/phi_seq_mean")])
def test_luspo_and_vespo_train(loss_type, level, metric):
    module = GRPO(**REWARD, loss_type=loss_type, importance_sampling_level=level, beta=0.04, optimizer=adamw(1e-2))
    module.configure_model()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    _, record = fit(module, steps=2)
    m = record.metrics[-1]
    assert {metric, "train/loss", "train/kl", "train/entropy", "train/reward"} <= set(m)
    assert "train/policy_loss" not in m and "train/entropy_coef" not in m  # no entropy bonus
    assert changed(before, module) and math.isfinite(m["train/loss"])
    if loss_type == "vespo":
        assert m[metric] == pytest.approx(1.0, abs=1e-4)  # one update per rollout: w = 1, phi(1) = 1


def test_luspo_warns_off_its_papers_level():
    with pytest.warns(UserWarning, match="`'luspo'` loss, `importance_sampling_level` should be set to `'sequence'`"):
        GRPO(**REWARD, loss_type="luspo")
    with pytest.warns(UserWarning, match="VESPO computes sequence-level importance weights internally"):
        GRPO(**REWARD, loss_type="vespo", importance_sampling_level="sequence")


# --------------------------------------------------------------------------- entropy bonus


def test_entropy_bonus_is_subtracted_and_logged():
    module = GRPO(**REWARD, entropy_coef=0.1, optimizer=adamw(1e-3))
    _, record = fit(module, steps=2)
    for m in record.metrics:  # one device, every completion token: loss = policy loss - coef * entropy
        assert m["train/loss"] == pytest.approx(m["train/policy_loss"] - 0.1 * m["train/entropy"], abs=1e-5)
        assert m["train/entropy_coef"] == pytest.approx(0.1)


def test_entropy_bonus_gradient_is_the_entropys():
    """The same rollout with and without the bonus: the gradients differ by ``-coef * dH/dtheta``, H
    the mean entropy of the completion tokens, here from the full softmax."""
    coef = 0.5
    plain, bonus = GRPO(**REWARD, optimizer=adamw(0.0)), GRPO(**REWARD, entropy_coef=coef, optimizer=adamw(0.0))
    _, a = fit(plain, steps=1)
    _, b = fit(bonus, steps=1)
    r = a.rollouts[0]
    model = plain.model
    model.zero_grad()
    states, _, index = completion_hidden(model, r.sequences)
    logp = (model.get_output_embeddings()(states).float() / plain.temperature).log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)  # (n,): every completion token, in sequence order
    assert int(r.loss_mask.sum()) == entropy.numel()  # no masked token here
    (-coef * entropy.mean()).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in expected.items():
        assert_close(b.grads[0][name] - a.grads[0][name], grad, atol=2e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in expected.values())


@pytest.mark.parametrize("target,direction", [(100.0, 1), (0.0, -1)])
def test_adaptive_entropy_moves_with_the_target(target, direction):
    """Target above the entropy: the coefficient rises by delta per optimizer step and applies from the
    second step; below: it falls to entropy_coef_min and never applies."""
    module = GRPO(**REWARD, use_adaptive_entropy=True, entropy_coef=0.01, entropy_coef_delta=0.005,
                  entropy_coef_min=0.0, entropy_target=target, optimizer=adamw(1e-3))
    _, record = fit(module, steps=3)
    coefs = [m["train/entropy_coef"] for m in record.metrics]
    expected = [max(0.01 + direction * 0.005 * k, 0.0) for k in (1, 2, 3)]
    assert coefs == pytest.approx(expected)
    first, *rest = record.metrics
    assert first["train/loss"] == pytest.approx(first["train/policy_loss"], abs=1e-7)  # no measurement yet
    for m, applied in zip(rest, expected):
        bonus = applied if direction > 0 else 0.0
        assert m["train/loss"] == pytest.approx(m["train/policy_loss"] - bonus * m["train/entropy"], abs=1e-5)


def test_adaptive_entropy_measures_the_whole_accumulation_window():
    """Two micro-batches per optimizer step: the controller reads the token-weighted entropy of both."""
    module = GRPO(**REWARD, use_adaptive_entropy=True, entropy_coef=0.0, entropy_target=100.0, optimizer=adamw(0.0))
    _, record = fit(module, steps=1, accumulate_grad_batches=2)
    assert len(record.rollouts) == 2
    sums = torch.zeros(2)
    for r in record.rollouts:
        _, entropy = completion_logprobs(module.model, r.sequences, r.generations.completion_mask, with_entropy=True)
        sums += torch.stack([(entropy * r.loss_mask).sum(), r.loss_mask.sum()])
    assert module.entropy_control.last_world_entropy == pytest.approx(float(sums[0] / sums[1]), rel=1e-5)
    assert module.entropy_control.coef == pytest.approx(0.005)  # one update, not two


def test_adaptive_entropy_survives_a_checkpoint(tmp_path):
    """Fit 2 steps with a checkpoint, resume to 3: the same controller state and last step as 3 steps
    straight (the HF engine samples; the checkpoint restores its random streams)."""

    def run(steps, **kwargs):
        L.seed_everything(0)
        module = GRPO(**{**REWARD, "max_completion_length": 8}, use_adaptive_entropy=True, entropy_coef=0.01,
                      entropy_coef_delta=0.004, entropy_target=100.0, optimizer=adamw(1e-3))
        return module, fit(module, steps=steps, engine=HFEngine(builtin_tokenizer()), **kwargs)[1]

    straight, whole = run(3)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    first, _ = run(2, callbacks=[ckpt], enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["grpo_entropy_control"]
    assert saved == first.entropy_control.state_dict() and saved["entropy_coef"] == pytest.approx(0.018)
    resumed, tail = run(3, ckpt_path=str(tmp_path / "last.ckpt"))
    assert len(tail.metrics) == 1 and resumed.entropy_control.coef == pytest.approx(0.022)
    assert resumed.entropy_control.state_dict() == pytest.approx(straight.entropy_control.state_dict())
    for key in ("train/loss", "train/policy_loss", "train/entropy", "train/entropy_coef"):
        assert tail.metrics[0][key] == pytest.approx(whole.metrics[-1][key], rel=1e-5, abs=1e-7), key


# --------------------------------------------------------------------------- sampler correction


def _trl_sampling_metrics(old, sampling, mask, mode, clip_min, clip_max):
    """TRL 1.16 grpo_trainer.py lines 2660-2707 and 2860-2895 (one process), re-stated."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    sequence = mode.startswith("sequence")
    ratio = torch.exp(diff.sum(-1, keepdim=True) if sequence else diff)
    if mode.endswith("truncate"):
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        low, high = clip_min if clip_min is not None else -math.inf, clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
    delta = (old - sampling).abs()[mask.bool()]
    flat = ratio.flatten() if sequence else ratio[mask.bool()]
    return ratio, {
        "train/sampling/sampling_logp_difference/mean": delta.mean().item(),
        "train/sampling/sampling_logp_difference/max": delta.max().item(),
        "train/sampling/importance_sampling_ratio/min": flat.min().item(),
        "train/sampling/importance_sampling_ratio/mean": flat.mean().item(),
        "train/sampling/importance_sampling_ratio/max": flat.max().item(),
    }


@pytest.mark.parametrize("mode,clip", [("sequence_mask", (None, 3.0)), ("token_truncate", (0.9, 1.1)),
                                       ("token_mask", (0.9, 1.1)), ("sequence_truncate", (0.5, 2.0))])
def test_sampler_correction_with_an_engine_that_keeps_its_own_copy(mode, clip):
    module = GRPO(**REWARD, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=clip[0],
                  vllm_importance_sampling_clip_max=clip[1], optimizer=adamw(1e-3))
    _, record = fit(module, steps=2, engine=OwnCopyEngine(builtin_tokenizer()))
    for r, m in zip(record.rollouts, record.metrics):
        assert r.old_logps is not None  # kept to compare the sampler with (num_iterations = 1)
        ratio, expected = _trl_sampling_metrics(r.old_logps, r.generations.sampling_logps, r.loss_mask, mode, *clip)
        assert_close(r.extras["importance_sampling_ratio"], ratio)
        for key, value in expected.items():
            assert m[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        assert m["train/sampling/sampling_logp_difference/max"] > 0.1  # the noise is there


def test_no_correction_when_the_engine_samples_the_trained_model_or_it_is_off():
    class Reporting(ScriptedEngine):  # reports log-probs, but of the model it is asked to sample
        def generate(self, model, prompt_ids, prompt_mask, sampling):
            gens = super().generate(model, prompt_ids, prompt_mask, sampling)
            gens.sampling_logps = torch.full(gens.completion_ids.shape, -3.0)
            return gens

    for module, engine in [(GRPO(**REWARD), Reporting(builtin_tokenizer())),
                           (GRPO(**REWARD, vllm_importance_sampling_correction=False), OwnCopyEngine(builtin_tokenizer()))]:
        _, record = fit(module, steps=1, engine=engine)
        assert record.rollouts[0].old_logps is None and "importance_sampling_ratio" not in record.rollouts[0].extras
        assert not any(k.startswith("train/sampling/") for k in record.metrics[0])


def test_a_fully_masked_correction_leaves_the_policy_alone():
    """token_mask with bounds no ratio meets: every token's weight is 0, so no gradient and no update."""
    module = GRPO(**REWARD, vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_min=50.0,
                  vllm_importance_sampling_clip_max=60.0, optimizer=adamw(1e-2))
    module.configure_model()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    _, record = fit(module, steps=1, engine=OwnCopyEngine(builtin_tokenizer()))
    assert record.metrics[0]["train/sampling/importance_sampling_ratio/max"] == 0.0
    assert record.metrics[0]["train/loss"] == 0.0 and not changed(before, module)


def test_off_policy_mask_reads_the_samplers_logps():
    """The sampler's log-probs are 0.5 above the policy's on every token (a mean KL of 0.5): a threshold
    of 0.3 drops the negative-advantage completions. An engine sampling the trained model has no such
    log-probs: the old ones (here the policy's own) give a KL of 0, and nothing is dropped."""
    kwargs = {**REWARD, "vllm_importance_sampling_correction": False, "loss_type": "bnpo", "optimizer": adamw(0.0)}
    runs = [(None, OwnCopyEngine(builtin_tokenizer(), noise=0.0, shift=0.5), False),
            (0.3, OwnCopyEngine(builtin_tokenizer(), noise=0.0, shift=0.5), True),
            (0.3, ScriptedEngine(builtin_tokenizer()), False)]
    for threshold, engine, drops in runs:
        _, record = fit(GRPO(**kwargs, off_policy_mask_threshold=threshold), steps=1, engine=engine)
        r = record.rollouts[0]
        assert (r.advantages < 0).any() and (r.advantages > 0).any()
        # ratio 1 (one update per rollout): bnpo's loss is -A averaged over the tokens, the dropped ones as 0
        weights = (r.advantages >= 0).float().unsqueeze(1) * r.loss_mask if drops else r.loss_mask
        expected = -(r.advantages[:, None] * weights).sum() / r.loss_mask.sum()
        assert record.metrics[0]["train/loss"] == pytest.approx(float(expected), abs=1e-6), (threshold, engine)
        everything = -(r.advantages[:, None] * r.loss_mask).sum() / r.loss_mask.sum()
        assert drops == (abs(float(expected - everything)) > 1e-3)


def test_vespo_refuses_a_sequence_level_correction_of_its_sampler():
    module = GRPO(**REWARD, loss_type="vespo")  # sequence_mask, TRL's default: fine while nothing needs correcting
    fit(module, steps=1)
    with pytest.raises(ValueError, match="VESPO loss requires `vllm_importance_sampling_mode` to be either"):
        fit(GRPO(**REWARD, loss_type="vespo"), steps=1, engine=OwnCopyEngine(builtin_tokenizer()))
    _, record = fit(GRPO(**REWARD, loss_type="vespo", vllm_importance_sampling_mode="token_truncate"), steps=1,
                    engine=OwnCopyEngine(builtin_tokenizer()))
    assert "train/sampling/importance_sampling_ratio/mean" in record.metrics[0]


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("kwargs,message", [
    ({"vllm_importance_sampling_mode": "token"}, r"vllm_importance_sampling_mode must be one of \('token_truncate'"),
    ({"vllm_importance_sampling_clip_min": 2.0, "vllm_importance_sampling_clip_max": 1.0},
     r"vllm_importance_sampling_clip_min \(2.0\) must be less than vllm_importance_sampling_clip_max \(1.0\)"),
    ({"vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_clip_max": None},
     r"At least one of `vllm_importance_sampling_clip_min` or `vllm_importance_sampling_clip_max` must be set"),
    ({"loss_type": "vespo", "vespo_k_pos": -1.0}, r"vespo_k_pos must be a finite number >= 0"),
    ({"loss_type": "vespo", "vespo_lambda_neg": float("inf")}, r"vespo_lambda_neg must be a finite number >= 0"),
    ({"use_adaptive_entropy": True, "entropy_coef_min": 0.5, "entropy_coef_max": 0.1},
     r"entropy_coef_min \(0.5\) must be <= entropy_coef_max \(0.1\)"),
    ({"use_adaptive_entropy": True, "entropy_coef_delta": -0.1}, "entropy_coef_delta must be >= 0"),
    ({"loss_type": "vespo", "use_vllm": True}, r"VESPO loss requires .* Got: sequence_mask"),
    ({"loss_type": "luspo_v2"}, r"loss_type must be one of .*'luspo', 'vespo'"),
])
def test_bad_objective_settings_are_reported(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPO(**REWARD, **kwargs)


def test_objective_defaults_and_the_deprecated_cap():
    module = GRPO(**REWARD)
    assert (module.sampler_correction.enabled, module.sampler_correction.mode) == (True, "sequence_mask")
    assert (module.sampler_correction.clip_min, module.sampler_correction.clip_max) == (None, 3.0)
    assert module.off_policy_mask_threshold is None and not module.entropy_control.enabled
    c = module.entropy_control
    assert (c.coef, c.coef_min, c.coef_max, c.delta, c.target) == (0.0, 0.0, 1.0, 0.005, 0.2)
    cfg = module.loss_config
    assert (cfg.vespo_k_pos, cfg.vespo_lambda_pos, cfg.vespo_k_neg, cfg.vespo_lambda_neg) == (2.0, 3.0, 3.0, 2.0)
    with pytest.warns(FutureWarning, match="`vllm_importance_sampling_cap` argument is deprecated"):
        module = GRPO(**REWARD, vllm_importance_sampling_cap=2.5)
    assert module.sampler_correction.clip_max == 2.5
    GRPO(**REWARD, use_adaptive_entropy=False, entropy_coef_min=0.5, entropy_coef_max=0.1)  # unused bounds: no error
