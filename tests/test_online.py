"""Online methods: the rollout pieces (engines, completion log-probs, the repeating sampler),
GRPO / RLOO / PPO through Lightning, reuse, checkpoints, bad input, and learning."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.testing import assert_close

from lit_align import GRPO, PPO, RLOO, OnlineDPO, PromptOnlyDataModule, RolloutCallback
from lit_align.data.sampler import ShardedSampler
from lit_align.models.builtin import builtin_model, builtin_tokenizer
from lit_align.ops.completions import completion_batch, completion_hidden, completion_logprobs
from lit_align.rollout.engines import HFEngine, SamplingParams, VLLMEngine, completion_mask
from tests.scripted_engine import ScriptedEngine

DATA = "builtin:arithmetic?size=64&steps=1&max_operand=4"


def adamw(lr: float):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


class Record(L.Callback):
    def __init__(self):
        self.metrics = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def fit(module, data, steps=2, callbacks=(), **kwargs) -> tuple[L.Trainer, Record]:
    record = Record()
    kwargs.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, callbacks=[record, *callbacks], **kwargs,
    )
    trainer.fit(module, data)
    return trainer, record


def scripted(module) -> tuple[RolloutCallback, ScriptedEngine]:
    engine = ScriptedEngine(builtin_tokenizer())
    return RolloutCallback(engine=engine), engine


# --------------------------------------------------------------------------- rollout pieces


def random_rollout(seed: int, n: int = 5, pad: int = 256):
    g = torch.Generator().manual_seed(seed)
    p_len = torch.randint(2, 7, (n,), generator=g)
    c_len = torch.randint(1, 6, (n,), generator=g)
    P, C = int(p_len.max()), int(c_len.max()) + 2
    prompt_ids = torch.full((n, P), pad)
    prompt_mask = torch.zeros(n, P, dtype=torch.long)
    completion_ids = torch.full((n, C), pad)
    cmask = torch.zeros(n, C, dtype=torch.long)
    for i in range(n):
        prompt_ids[i, P - p_len[i] :] = torch.randint(0, 256, (int(p_len[i]),), generator=g)
        prompt_mask[i, P - p_len[i] :] = 1
        completion_ids[i, : c_len[i]] = torch.randint(0, 256, (int(c_len[i]),), generator=g)
        cmask[i, : c_len[i]] = 1
    return prompt_ids, prompt_mask, completion_ids, cmask


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprobs_match_the_masked_full_forward(layout, temperature):
    model = builtin_model("builtin:tiny").eval()
    prompt_ids, prompt_mask, completion_ids, cmask = random_rollout(0)
    batch = completion_batch(prompt_ids, prompt_mask, completion_ids, cmask, 256, layout, capacity=32)
    ours, entropy = completion_logprobs(model, batch, cmask, temperature=temperature, chunk_size=7, with_entropy=True)
    # The reference: TRL's route, left-padded prompt + completion with an attention mask and positions.
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, cmask], 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, prompt_ids.size(1) - 1 : -1]
    logp = (logits / temperature).log_softmax(-1)
    ref = logp.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) * cmask
    ref_entropy = -(logp.exp() * logp).sum(-1) * cmask
    assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert_close(entropy, ref_entropy, atol=1e-5, rtol=1e-5)


def test_completion_logprobs_gradient_matches_the_full_forward():
    model = builtin_model("builtin:tiny")
    prompt_ids, prompt_mask, completion_ids, cmask = random_rollout(1)
    batch = completion_batch(prompt_ids, prompt_mask, completion_ids, cmask, 256)
    completion_logprobs(model, batch, cmask)[0].sum().backward()
    ours = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, cmask], 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    logp = logits[:, prompt_ids.size(1) - 1 : -1].log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    (logp * cmask).sum().backward()
    assert_close(ours, model.model.embed_tokens.weight.grad, atol=1e-5, rtol=1e-4)


def test_completion_mask_stops_after_the_first_eos():
    ids = torch.tensor([[5, 9, 7, 9], [5, 6, 7, 8], [9, 1, 1, 1]])
    mask, truncated = completion_mask(ids, [9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_hf_engine_groups_masks_and_lengths():
    tok = builtin_tokenizer()
    model = builtin_model("builtin:tiny")
    prompts = [tok("Compute 1+2.\n")["input_ids"], tok("Compute 3-1+4.\n")["input_ids"]]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (ids != tok.pad_token_id).long()
    greedy = HFEngine(tok).generate(model, ids, mask, SamplingParams(max_completion_length=6, temperature=0.0, num_generations=3))
    assert greedy.completion_ids.shape == (6, 6)
    assert torch.equal(greedy.prompt_ids[:3], ids[:1].expand(3, -1))  # the G of a prompt are consecutive
    assert torch.equal(greedy.completion_ids[0], greedy.completion_ids[2])  # greedy: one answer per prompt
    assert (greedy.completion_ids[greedy.completion_mask == 0] == tok.pad_token_id).all()
    expected, truncated = completion_mask(greedy.completion_ids, [tok.eos_token_id])
    assert torch.equal(greedy.completion_mask, expected) and torch.equal(greedy.is_truncated, truncated)
    torch.manual_seed(0)
    sampled = HFEngine(tok).generate(model, ids, mask, SamplingParams(max_completion_length=5, num_generations=4, top_k=50))
    assert sampled.completion_ids.size(0) == 8 and sampled.completion_ids.size(1) <= 5


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_the_lean_decoder_is_generate_token_for_token_when_greedy(repetition_penalty):
    """Left-padded prompts of different lengths, several samples each, EOS free to end rows early."""
    tok, model = builtin_tokenizer(), builtin_model("builtin:tiny").eval()
    prompts = [tok("Compute 1+2.\n")["input_ids"], tok("Compute 13-1+4.\n")["input_ids"], tok("7\n")["input_ids"]]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (ids != tok.pad_token_id).long()
    sampling = SamplingParams(max_completion_length=20, temperature=0.0, num_generations=2, repetition_penalty=repetition_penalty)
    lean = HFEngine(tok).generate(model, ids, mask, sampling)
    reference = HFEngine(tok, use_generate=True).generate(model, ids, mask, sampling)
    assert torch.equal(lean.completion_mask, reference.completion_mask)
    assert torch.equal(lean.completion_ids, reference.completion_ids)
    assert_close(lean.sampling_logps, reference.sampling_logps, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_generate", [False, True])
@pytest.mark.parametrize("top_k", [0, 5])
def test_hf_engine_sampling_logps_are_the_processed_distributions(use_generate, top_k):
    """The engine reports each drawn token's log-prob under the distribution it drew from (after
    temperature and top-k, as vLLM's processed log-probs): with no truncation they equal the
    training forward's log-probs at the sampling temperature; top-k renormalises, so they rise."""
    tok = builtin_tokenizer()
    model = builtin_model("builtin:tiny").eval()
    prompts = [tok("Compute 1+2.\n")["input_ids"], tok("Compute 3-1+4.\n")["input_ids"]]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (ids != tok.pad_token_id).long()
    torch.manual_seed(0)
    sampling = SamplingParams(max_completion_length=6, temperature=0.7, top_k=top_k, num_generations=3)
    gens = HFEngine(tok, use_generate=use_generate).generate(model, ids, mask, sampling)
    batch = completion_batch(gens.prompt_ids, gens.prompt_mask, gens.completion_ids, gens.completion_mask, tok.pad_token_id)
    with torch.no_grad():
        trained, _ = completion_logprobs(model, batch, gens.completion_mask, temperature=0.7)
    valid = gens.completion_mask.bool()
    assert gens.sampling_logps.shape == gens.completion_ids.shape and (gens.sampling_logps[~valid] == 0).all()
    if top_k == 0:
        assert_close(gens.sampling_logps[valid], trained[valid], atol=1e-4, rtol=1e-4)
    else:
        assert (gens.sampling_logps[valid] >= trained[valid] - 1e-5).all()


def test_vllm_engine_reads_outputs_and_pushes_weights_without_vllm():
    tok = builtin_tokenizer()
    sample = lambda ids, lp: SimpleNamespace(token_ids=ids, logprobs=[{t: SimpleNamespace(logprob=lp)} for t in ids])  # noqa: E731
    outputs = [SimpleNamespace(outputs=[sample([65, tok.eos_token_id], -0.5), sample([66, 67, 68], -1.0)])]
    loaded = []
    runner = SimpleNamespace(model=SimpleNamespace(load_weights=lambda pairs: loaded.extend(n for n, _ in pairs)))
    llm = SimpleNamespace(
        llm_engine=SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner))),
        reset_prefix_cache=lambda: loaded.append("<reset>"),
    )
    engine = VLLMEngine("unused", tok, llm=llm)
    prompt = torch.tensor([[tok.pad_token_id, 67]])
    gens = engine.to_generations(outputs, prompt, (prompt != tok.pad_token_id).long(), SamplingParams(num_generations=2), [tok.eos_token_id])
    assert gens.completion_ids.tolist() == [[65, tok.eos_token_id, tok.pad_token_id], [66, 67, 68]]
    assert gens.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]] and gens.is_truncated.tolist() == [False, True]
    assert_close(gens.sampling_logps, torch.tensor([[-0.5, -0.5, 0.0], [-1.0, -1.0, -1.0]]))
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(builtin_model("builtin:tiny"), LoraConfig(r=2, target_modules=["q_proj"]))
    engine.sync_weights(lora)
    assert loaded[-1] == "<reset>" and "model.layers.0.self_attn.q_proj.weight" in loaded
    assert not any("lora_" in n or "base_layer" in n or n.startswith("base_model") for n in loaded)
    assert not any(isinstance(m, torch.nn.Module) and getattr(m, "merged", False) for m in lora.modules())


def test_vllm_engine_sleep_mode_guided_decoding_and_tensor_parallel_prompts(monkeypatch):
    """Without vLLM: sleep mode wakes the KV cache to generate and the weights to load them; a
    tensor-parallel group generates every member's prompts and each rank keeps its own rows."""
    import torch.distributed as dist

    tok = builtin_tokenizer()
    calls = []

    def generate(requests, sampling_params, use_tqdm):
        calls.append(("generate", [r["prompt_token_ids"] for r in requests]))
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[p[-1], tok.eos_token_id], logprobs=None)])
                for p in (r["prompt_token_ids"] for r in requests)]

    runner = SimpleNamespace(model=SimpleNamespace(load_weights=lambda pairs: calls.append("load")))
    llm = SimpleNamespace(
        llm_engine=SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner))),
        reset_prefix_cache=lambda: None, generate=generate,
        wake_up=lambda tags: calls.append(("wake", tuple(tags))), sleep=lambda level: calls.append(("sleep", level)),
    )
    engine = VLLMEngine("unused", tok, llm=llm, tensor_parallel_size=2, enable_sleep_mode=True)
    engine._sampling_params = lambda sampling: None  # no vllm.SamplingParams here
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "new_subgroups", lambda group_size: ("tp", None))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)

    def all_gather_object(out, obj, group=None):
        out[0], out[1] = [[70], [71]], obj  # rank 0 of the group holds two prompts

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    prompt = torch.tensor([[72]])
    gens = engine.generate(builtin_model("builtin:tiny"), prompt, torch.ones_like(prompt), SamplingParams(num_generations=1))
    assert calls[:3] == [("wake", ("kv_cache",)), ("generate", [[70], [71], [72]]), ("sleep", 2)]
    assert gens.completion_ids[:, 0].tolist() == [72]  # this rank's row only
    engine.sync_weights(builtin_model("builtin:tiny"))
    assert calls[3] == ("wake", ("weights",)) and calls[4] == "load"


def test_sampler_repeats_each_whole_batch():
    sampler = ShardedSampler([0] * 10, batch_size=3, shuffle=False, group_by_length=False, repeat_batches=2)
    assert list(sampler) == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 6, 7, 8]  # the incomplete last batch dropped
    assert len(sampler) == 18


def test_prompt_batch_size_counts_completions_and_must_divide():
    module = GRPO(reward_funcs=["arithmetic_reward"], num_generations=4, max_completion_length=16)
    data = PromptOnlyDataModule(DATA, batch_size=8)
    trainer = L.Trainer(accelerator="cpu", logger=False)
    trainer.strategy.connect(module)
    data.trainer = trainer
    trainer.lightning_module  # noqa: B018
    module.trainer = trainer
    data.setup()
    assert len(next(iter(data.train_dataloader())).prompts) == 2
    data.batch_size = 6
    with pytest.raises(ValueError, match="batch_size=6 counts completions and must be divisible by num_generations=4"):
        data.train_dataloader()


# --------------------------------------------------------------------------- the methods


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"])
def test_grpo_every_loss_type_trains(loss_type):
    module = GRPO(reward_funcs=["arithmetic_reward"], num_generations=4, max_completion_length=16, loss_type=loss_type, beta=0.04,
                  optimizer=adamw(1e-2))
    before = module.configure_model() or {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer, record = fit(module, PromptOnlyDataModule(DATA, batch_size=16), steps=2, callbacks=[scripted(module)[0]])
    m = record.metrics[-1]
    assert m["train/reward"] == pytest.approx(0.5) and m["train/frac_reward_zero_std"] == 0.0  # scripted: half right
    assert {"train/kl", "train/entropy", "train/completions/mean_length", "train/rewards/arithmetic_reward/mean"} <= set(m)
    assert ("train/cispo_clip_ratio" in m) == (loss_type == "cispo")
    assert ("train/clip_ratio/region_mean" in m) == (loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"))
    assert any(not torch.equal(v, module.model.state_dict()[k]) for k, v in before.items())
    assert not any(k.startswith("ref_model.") for k in module.state_dict())  # the reference stays out of checkpoints


def test_num_iterations_reuses_the_rollout_with_its_old_logps():
    module = GRPO(reward_funcs=["arithmetic_reward"], num_generations=4, max_completion_length=16, num_iterations=2,
                  optimizer=adamw(5e-2))
    callback, engine = scripted(module)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((batch.prompts, batch.rollout))

    fit(module, PromptOnlyDataModule(DATA, batch_size=8), steps=4, callbacks=[callback, Spy()])
    assert engine.calls == 2  # four updates from two rollouts
    assert seen[0][1] is seen[1][1] and seen[2][1] is seen[3][1] and seen[1][1] is not seen[2][1]
    assert seen[0][0] == seen[1][0]  # the DataModule repeats the prompt batch
    assert seen[0][1].old_logps is not None


def test_dynamic_sampling_redraws_groups_without_reward_spread():
    class FlatFirst(ScriptedEngine):
        def generate(self, model, prompt_ids, prompt_mask, sampling):
            gens = super().generate(model, prompt_ids, prompt_mask, sampling)
            if self.calls == 1:  # every completion of the first draw is the (right) first one
                G = sampling.num_generations
                gens.completion_ids = gens.completion_ids[::G].repeat_interleave(G, 0)
                gens.completion_mask = gens.completion_mask[::G].repeat_interleave(G, 0)
            return gens

    engine = FlatFirst(builtin_tokenizer())
    module = GRPO(reward_funcs=["arithmetic_reward"], num_generations=4, max_completion_length=16, dynamic_sampling=True)
    _, record = fit(module, PromptOnlyDataModule(DATA, batch_size=8), steps=1, callbacks=[RolloutCallback(engine=engine)])
    assert engine.calls == 2 and record.metrics[0]["train/frac_reward_zero_std"] == 0.0


def test_rloo_folds_the_kl_into_the_reward():
    module = RLOO(reward_funcs=["arithmetic_reward"], num_generations=4, max_completion_length=16, optimizer=adamw(1e-2))
    callback, _ = scripted(module)
    _, record = fit(module, PromptOnlyDataModule(DATA, batch_size=8), steps=3, callbacks=[callback])
    m = record.metrics[-1]
    assert {"train/kl", "train/reward", "train/clip_ratio/region_mean", "train/entropy"} <= set(m)
    assert m["train/kl"] != 0.0  # the policy moved away from its reference after two updates


def test_ppo_with_reward_and_value_models():
    module = PPO(reward_model_name_or_path="builtin:tiny", value_model_name_or_path="builtin:tiny", num_ppo_epochs=2,
                 num_mini_batches=2, max_completion_length=16, kl_estimator="k3", whiten_rewards=True, missing_eos_penalty=1.0,
                 optimizer=adamw(1e-3))
    trainer, record = fit(module, PromptOnlyDataModule(DATA, batch_size=8), steps=4)
    assert trainer.global_step == 4  # manual optimisation: 2 epochs x 2 mini-batches per rollout
    m = record.metrics[-1]
    for key in ("objective/kl", "objective/entropy", "objective/rlhf_reward", "objective/scores", "policy/approxkl_avg",
                "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio", "rewards/builtin:tiny/mean"):
        assert f"train/{key}" in m, key
    assert any(k.startswith("value_model.") for k in module.state_dict())  # the critic is trained and saved


@pytest.mark.parametrize(
    "cls,kwargs,per_batch",
    [
        (GRPO, {"num_generations": 4, "beta": 0.04, "max_completion_length": 16}, 1),
        (PPO, {"num_ppo_epochs": 2, "max_completion_length": 16}, 2),
        (OnlineDPO, {"max_new_tokens": 16}, 1),
    ],
)
def test_checkpoint_resume_continues_online_training(tmp_path, cls, kwargs, per_batch):
    def make():
        return cls(reward_funcs=["arithmetic_reward"], **kwargs)

    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / cls.__name__, save_last=True)
    trainer, _ = fit(make(), PromptOnlyDataModule(DATA, batch_size=8), steps=2 * per_batch, callbacks=[ckpt],
                     enable_checkpointing=True)
    state = torch.load(tmp_path / cls.__name__ / "last.ckpt", weights_only=False)
    assert not any(k.startswith("ref_model.") for k in state["state_dict"])
    resumed = L.Trainer(max_steps=4 * per_batch, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    resumed.fit(make(), PromptOnlyDataModule(DATA, batch_size=8), ckpt_path=str(tmp_path / cls.__name__ / "last.ckpt"))
    assert resumed.global_step == 4 * per_batch


def test_completion_table_goes_to_wandb(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="lit-align", save_dir=str(tmp_path), offline=True)
    tables = []
    logger.log_table = lambda key, columns, data: tables.append((key, columns, data))
    module = GRPO(reward_funcs=["arithmetic_reward"], num_generations=4, max_completion_length=16, log_completions=True,
                  log_completions_steps=1)
    L.Trainer(max_steps=2, accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path).fit(module, PromptOnlyDataModule(DATA, batch_size=8))
    import wandb

    wandb.finish()
    assert len(tables) == 2
    key, columns, rows = tables[0]
    assert key == "completions" and columns == ["step", "prompt", "completion", "arithmetic_reward", "advantage"]
    assert len(rows) == 8 and rows[0][1].startswith("Compute")
    assert sorted(p.name for p in (tmp_path / "completions").iterdir()) == ["completions_00000.parquet", "completions_00001.parquet"]


# --------------------------------------------------------------------------- bad input


def test_reward_function_errors_name_the_function():
    def broken(prompts, completions, **kwargs):
        raise KeyError("answer")

    def short(prompts, completions, **kwargs):
        return [1.0]

    for func, message in ((broken, "reward function 'broken' raised KeyError"), (short, "'short' returned 1 values for 8")):
        module = GRPO(reward_funcs=[func], num_generations=4, max_completion_length=4)
        with pytest.raises((RuntimeError, ValueError), match=message):
            fit(module, PromptOnlyDataModule(DATA, batch_size=8), steps=1)


def test_prompt_longer_than_the_context_is_reported():
    module = GRPO(reward_funcs=["arithmetic_reward"], num_generations=2, max_completion_length=1020)
    with pytest.raises(ValueError, match=r"has \d+ tokens; with max_completion_length=1020 it exceeds the model's context of 1024"):
        fit(module, PromptOnlyDataModule(DATA, batch_size=4), steps=1)


def test_bad_online_settings_are_reported():
    with pytest.raises(ValueError, match="needs reward_funcs"):
        fit(GRPO(num_generations=2, max_completion_length=4), PromptOnlyDataModule(DATA, batch_size=4), steps=1)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        GRPO(reward_funcs=["arithmetic_reward"], num_generations=1)
    with pytest.raises(ValueError, match="reward_weights has 2 values for 1 reward functions"):
        GRPO(reward_funcs=["arithmetic_reward"], reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="cannot import 'no_such_reward'"):
        GRPO(reward_funcs=["no_such_reward"])
    with pytest.raises(ValueError, match="PPO needs reward_model_name_or_path or reward_funcs"):
        PPO()
    with pytest.raises(ValueError, match="num_iterations > 1 reuses each micro-batch's rollout"):
        fit(OnlineDPO(reward_funcs=["arithmetic_reward"], max_new_tokens=4, num_iterations=2),
            PromptOnlyDataModule(DATA, batch_size=4), steps=1, accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="reward_clip_range"):
        RLOO(reward_funcs=["arithmetic_reward"], reward_clip_range=(1.0, 0.0))


# --------------------------------------------------------------------------- learning


def mean_reward(record: Record, part: slice) -> float:
    values = [m["train/reward"] for m in record.metrics[part]]
    return sum(values) / len(values)


@pytest.mark.slow
@pytest.mark.learning
@pytest.mark.parametrize(
    "method,kwargs,batch_size,steps",
    [
        ("grpo", {"num_generations": 8}, 128, 120),
        ("rloo", {"num_generations": 4, "beta": 0.05}, 64, 160),
        # PPO: one sample per prompt and no group baseline, so more prompts per rollout (128) and two
        # epochs per rollout (100 rollouts).
        ("ppo", {"num_ppo_epochs": 2, "num_mini_batches": 1, "kl_coef": 0.05, "missing_eos_penalty": 1.0}, 128, 200),
    ],
)
def test_online_methods_raise_the_correctness_reward(learning, method, kwargs, batch_size, steps):
    """From builtin:tiny-sft (it knows the sums but samples a slipped answer about as often as its
    demonstrations had one), the mean correctness reward of the last quarter of a short run (the
    configs' settings, fewer steps) is clearly above the first quarter's."""
    cls = {"grpo": GRPO, "rloo": RLOO, "ppo": PPO}[method]
    module = cls("builtin:tiny-sft", reward_funcs=["arithmetic_reward"], max_completion_length=24, optimizer=adamw(5e-4), **kwargs)
    data = PromptOnlyDataModule("builtin:arithmetic?size=2000&steps=1&max_operand=9", batch_size=batch_size, seed=learning.seed)
    _, record = fit(module, data, steps=steps, gradient_clip_val=None if method == "ppo" else 1.0)
    n = len(record.metrics) // 4
    first, last = mean_reward(record, slice(0, n)), mean_reward(record, slice(-n, None))
    learning.record(first=first, last=last, rise=last - first)
    assert last > first + 0.08, (first, last)


def test_select_sequences_equals_collating_the_subset_again():
    from lit_align.ops.completions import select_sequences

    prompt_ids, prompt_mask, completion_ids, cmask = random_rollout(3, n=6)
    index = torch.tensor([4, 1, 3])
    picked = select_sequences(completion_batch(prompt_ids, prompt_mask, completion_ids, cmask, 256), index)
    again = completion_batch(prompt_ids[index], prompt_mask[index], completion_ids[index], cmask[index], 256)
    for name in ("input_ids", "position_ids", "sequence_ids", "completion_mask", "attention_mask"):
        assert torch.equal(getattr(picked, name), getattr(again, name)), name


def test_ppo_reference_arguments_follow_kl_coef():
    """PPO(sync_ref_model=True) demanded beta > 0, an argument PPO does not read; and it accepted
    mask_truncated_completions and beta and ignored them."""
    module = PPO(reward_funcs=["arithmetic_reward"], sync_ref_model=True)  # kl_coef=0.05: a reference to sync
    assert module.needs_reference and module.sync_ref_model
    with pytest.raises(ValueError, match="sync_ref_model=True needs a reference model: set kl_coef != 0"):
        PPO(reward_funcs=["arithmetic_reward"], sync_ref_model=True, kl_coef=0.0)
    for name, message in (("beta", "PPO does not use beta: its KL weight is kl_coef"),
                          ("mask_truncated_completions", "PPO does not use mask_truncated_completions")):
        with pytest.raises(ValueError, match=message):
            PPO(reward_funcs=["arithmetic_reward"], **{name: 0.1 if name == "beta" else True})


def test_generations_select_and_cat_keep_every_field():
    """The row operations carry the sampling log-probs too (the positional rebuilds they replace
    dropped them)."""
    from lit_align.rollout.engines import Generations

    def gens(width, start):
        n = 2
        return Generations(torch.ones(n, 3, dtype=torch.long), torch.ones(n, 3, dtype=torch.long),
                           torch.arange(start, start + n * width).view(n, width), torch.ones(n, width, dtype=torch.long),
                           torch.tensor([False, True]), torch.full((n, width), -float(start)))

    a, b = gens(2, 1), gens(3, 10)
    both = a.cat(b, pad_token_id=0)
    assert both.completion_ids.tolist() == [[1, 2, 0], [3, 4, 0], [10, 11, 12], [13, 14, 15]]
    assert both.completion_mask[:2, 2].tolist() == [0, 0] and both.sampling_logps[:2, 2].tolist() == [0.0, 0.0]
    assert both.sampling_logps[2:, 0].tolist() == [-10.0, -10.0] and both.is_truncated.tolist() == [False, True] * 2
    picked = both.select(torch.tensor([3, 0]))
    assert picked.completion_ids.tolist() == [[13, 14, 15], [1, 2, 0]] and picked.sampling_logps[:, 0].tolist() == [-10.0, -1.0]
    assert a.cat(Generations(*[getattr(b, f) for f in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "is_truncated")]), 0).sampling_logps is None


def test_a_module_says_when_its_engine_cannot_sample_a_model():
    """An engine that samples only the policy (vLLM) declares it; asking it for another model is a
    clear error before anything is sampled, whoever the engine is."""
    from lit_align import XPO

    class PolicyOnly:
        samples_any_model = False

        def connect(self, tokenizer):
            pass

        def generate(self, *args):
            raise AssertionError("not reached")

    module = XPO(reward_funcs=["arithmetic_reward"], max_new_tokens=4)
    module.configure_model()
    module.engine = PolicyOnly()
    ids = torch.ones(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="XPO samples .* a model other than the policy, but its engine PolicyOnly samples the policy only"):
        module.sample(module.ref_model, ids, ids)
    with pytest.raises(ValueError, match="samples the policy only"):  # the policy's weights as the reference (LoRA)
        module.sample(module.model, ids, ids, policy=False)


def test_the_reference_is_chosen_in_one_place():
    """A copy when the policy is trained whole, the policy with its adapters off under LoRA: the
    same choice for the offline and online methods (``WithReference``), no copy loaded for LoRA,
    and sync_ref_model refused where there is no copy to sync."""
    from lit_align import DPO
    from lit_align.models.builtin import builtin_tokenizer

    tok = builtin_tokenizer()
    ids = torch.tensor([tok("Q: 1+2=")["input_ids"]])
    base = builtin_model("builtin:tiny").eval()
    for cls, kwargs in ((GRPO, {"reward_funcs": ["arithmetic_reward"], "beta": 0.04}), (DPO, {})):
        whole = cls(**kwargs)
        whole.configure_model()
        assert whole.reference_model is whole.ref_model is not None
        lora = cls(peft={"r": 2, "target_modules": ["q_proj"], "init_lora_weights": False}, **kwargs)
        lora.configure_model()
        assert lora.ref_model is None and lora.reference_model is lora.model
        with torch.no_grad():
            on = lora.model(ids).logits
            with lora.reference_context():
                off = lora.reference_model(ids).logits
        assert not torch.allclose(on, off) and torch.allclose(off, base(ids).logits, atol=1e-6)
        with pytest.raises(ValueError, match="sync_ref_model=True needs a separate reference model"):
            cls(peft={"r": 2}, sync_ref_model=True, **kwargs)


# --------------------------------------------------------------------------- the rollout template


class ReinforcePlusPlus(__import__("lit_align").methods.online.OnlineModule):
    """A new online method as the template promises it: an advantages function and a loss.
    REINFORCE++ (Hu 2025): the reward minus the batch mean over the batch std, no critic."""

    def advantages(self, rollout, rewards):
        from lit_align.losses.advantages import nanstd, weighted_rewards
        from lit_align.rollout.types import Advantages

        all_rewards, mine = self.gather(rewards)
        weighted = weighted_rewards(all_rewards, self.reward_weights)
        adv = (weighted - weighted.mean()) / (nanstd(weighted) + 1e-4)
        return Advantages(adv[mine], weighted[mine], {"reward": weighted.mean().item()}, {"batch_std": nanstd(weighted)})

    def shared_step(self, batch, stage):
        r = batch.rollout
        logps, _ = self.token_logps(self.model, r.sequences, r.generations)
        loss = -(r.advantages[:, None] * logps * r.loss_mask).sum() / r.loss_mask.sum().clamp(min=1)
        self.log_metrics({"loss": loss.detach(), **r.metrics}, stage, len(r))
        return loss


def test_a_new_online_method_is_an_advantages_function_and_a_loss():
    """The template gives every method the same core: the reference log-probs when it has a KL
    weight, no old log-probs when each rollout serves one step, completion metrics and token
    counts, the rows per prompt; truncated completions leave the loss mask when asked."""
    module = ReinforcePlusPlus(reward_funcs=["arithmetic_reward"], num_generations=4, max_completion_length=3,
                               beta=0.1, mask_truncated_completions=True, optimizer=adamw(1e-3))

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.rollout = batch.rollout

    capture = Capture()
    _, record = fit(module, PromptOnlyDataModule(DATA, batch_size=8), steps=2, callbacks=[capture])
    r = capture.rollout
    assert r.rows_per_prompt == 4 and len(r) == 8 and r.old_logps is None and r.ref_logps.shape == r.loss_mask.shape
    assert set(r.extras) == {"batch_std"} and r.advantages.shape == (8,)
    truncated = r.generations.is_truncated
    assert truncated.any()  # 3 tokens are too few for most answers
    assert (r.loss_mask[truncated] == 0).all() and (r.loss_mask[~truncated].sum(1) > 0).all()
    assert {"train/completions/mean_length", "train/num_tokens", "train/reward"} <= set(record.metrics[-1])
    assert record.metrics[-1]["train/num_tokens"] > record.metrics[0]["train/num_tokens"]


def test_an_engine_declared_without_a_tokenizer_gets_the_modules():
    """An engine made without a tokenizer (as YAML would declare it) is connected when the module
    takes it; one made with its own keeps it."""
    module = GRPO(reward_funcs=["arithmetic_reward"], num_generations=2, max_completion_length=4)
    engine = HFEngine()
    with pytest.raises(RuntimeError, match="HFEngine has no tokenizer"):
        _ = engine.pad_token_id
    fit(module, PromptOnlyDataModule(DATA, batch_size=4), steps=1, callbacks=[RolloutCallback(engine=engine)])
    assert module.engine is engine and engine.tokenizer is module.tokenizer
    own = builtin_tokenizer()
    kept = HFEngine(own)
    kept.connect(module.tokenizer)
    assert kept.tokenizer is own


def test_reward_models_load_with_the_other_models():
    """A reward model is not read when the module is constructed (the CLI builds modules before
    any device is chosen) but in configure_model, and scores on the module's device."""
    module = PPO(reward_model_name_or_path="builtin:tiny", num_ppo_epochs=1, max_completion_length=4)
    scorer = module.reward_funcs[-1]
    assert scorer.model is None
    module.configure_model()
    assert scorer.model is not None and not scorer.model.training


def test_cast_lm_head_to_fp32_takes_the_logits_in_fp32():
    """On a bf16 policy, cast_lm_head_to_fp32 gives the log-probs of fp32 logits from the bf16
    hidden states and head (to fp32 precision); without it the matmul runs in bf16."""
    from lit_align.rollout.engines import Generations

    prompt_ids, prompt_mask, completion_ids, cmask = random_rollout(3)
    gens = Generations(prompt_ids, prompt_mask, completion_ids, cmask, torch.zeros(len(cmask), dtype=torch.bool))
    seqs = completion_batch(prompt_ids, prompt_mask, completion_ids, cmask, 256)
    exact, plain = [GRPO(reward_funcs=["arithmetic_reward"], num_generations=2, dtype="bfloat16", cast_lm_head_to_fp32=cast)
                    for cast in (True, False)]
    for m in (exact, plain):
        m.configure_model()
    plain.model.load_state_dict(exact.model.state_dict())
    with torch.no_grad():
        states, labels, index = completion_hidden(exact.model, seqs)
        head = exact.model.get_output_embeddings().weight
        want = torch.log_softmax(states.float() @ head.float().T, -1).gather(-1, labels[:, None]).squeeze(-1)
        got = exact.token_logps(exact.model, seqs, gens)[0][gens.completion_mask.bool()]
        rough = plain.token_logps(plain.model, seqs, gens)[0][gens.completion_mask.bool()]
    assert got.dtype == torch.float32
    assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (rough - want).abs().max() > 1e-4
