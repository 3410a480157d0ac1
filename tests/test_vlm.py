"""Vision-language models: builtin:tiny-vlm, images in the data formats, and parity with TRL 1.16.

``builtin:tiny-vlm`` saved with its processor is what TRL loads as a path; lit-align builds it in
memory. Both read the same ``builtin:shapes`` rows in the same order. Checked: the image tokens
and pixels of a collated batch line up with the text, image tokens never count as completion
tokens, the errors a user can meet, and SFT/DPO against TRL's vision collators (first step to
1e-5, then three AdamW steps).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")

import datasets
import lightning as L
import pytest
import torch
from PIL import Image

from lit_align import (
    DPO,
    GRPO,
    KTO,
    SFT,
    LanguageModelingDataModule,
    NashMD,
    OnlineDPO,
    PreferenceDataModule,
    PromptCompletionDataModule,
    PromptOnlyDataModule,
    RolloutCallback,
    UnpairedPreferenceDataModule,
)
from lit_align.data.shapes import shapes_rows
from lit_align.data.sources import DataFormatError
from lit_align.data.vision import ImageTokens, with_image_parts
from lit_align.models.export import save_hf_model
from lit_align.models.loading import apply_peft, load_causal_lm, load_processor, load_tokenizer
from lit_align.models.vlm import IMAGE_TOKEN, tiny_vlm, tiny_vlm_processor

MODEL = "builtin:tiny-vlm"
BATCH = 8
LR = 1e-3
IMAGE_TOKENS = 16  # (32 / 8) ** 2 patches; CLIP's class token is dropped


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny_vlm")
    tiny_vlm().save_pretrained(path)
    tiny_vlm_processor().save_pretrained(path)
    return str(path)


def _saved(rows: list[dict], path) -> str:
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def _data(cls, rows, tmp_path, **kwargs):
    data = cls(_saved(rows, tmp_path / "rows"), batch_size=BATCH, shuffle=False, group_by_length=False, **kwargs)
    data.connect(tiny_vlm_processor())
    data.setup("fit")
    return data


# --------------------------------------------------------------------------- the model


def test_tiny_vlm_is_seeded_and_reloads_from_a_directory(model_dir: str) -> None:
    a, b = tiny_vlm().state_dict(), load_causal_lm(model_dir).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert torch.equal(a["lm_head.weight"], tiny_vlm().state_dict()["lm_head.weight"])
    processor = load_processor(model_dir)
    assert processor.image_token == IMAGE_TOKEN
    assert load_tokenizer(model_dir).chat_template == load_tokenizer(MODEL).chat_template
    assert load_processor("builtin:tiny") is None


def test_the_warm_start_answers_like_tiny_sft_before_it_looks() -> None:
    """The projector's last layer starts at zero, so image tokens enter the language model as zeros: the
    output is the same whatever the image."""
    model, processor = tiny_vlm(), tiny_vlm_processor()
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
    logits = [model(**processor(text=[text], images=[[Image.new("RGB", (32, 32), c)]], return_tensors="pt")).logits
              for c in ((255, 0, 0), (0, 0, 255))]
    assert torch.equal(logits[0], logits[1])


def test_lora_adapts_the_language_model_unless_told_otherwise() -> None:
    def adapted(peft: dict) -> list[str]:
        return [n for n, _ in apply_peft(tiny_vlm(), peft).named_modules() if n.endswith("lora_A")]

    default = adapted({"r": 4})
    assert default and all(".language_model." in n for n in default)
    everything = adapted({"r": 4, "target_modules": "all-linear"})
    assert any(".vision_tower." in n for n in everything) and any(".multi_modal_projector." in n for n in everything)


def test_the_processor_is_loaded_once_and_holds_the_modules_tokenizer(model_dir: str, monkeypatch) -> None:
    import lit_align.methods.base as base

    calls = []
    load = base.load_processor
    monkeypatch.setattr(base, "load_processor", lambda *a, **k: calls.append(a) or load(*a, **k))
    monkeypatch.setattr(base, "load_tokenizer", lambda *a, **k: pytest.fail("a VLM's tokenizer comes from its processor"))
    module = SFT(model_dir, eos_token="<|im_end|>")
    assert module.processor.tokenizer is module.tokenizer and module.tokenizer.eos_token == "<|im_end|>"
    assert module.tokenizer.chat_template and len(calls) == 1


def test_the_export_holds_the_processor(tmp_path) -> None:
    save_hf_model(tiny_vlm(), tiny_vlm_processor(), tmp_path)
    assert (tmp_path / "processor_config.json").is_file() or (tmp_path / "preprocessor_config.json").is_file()
    image = Image.new("RGB", (32, 32), (255, 255, 0))
    assert torch.equal(load_processor(str(tmp_path))(text=[IMAGE_TOKEN], images=[[image]], return_tensors="pt")["pixel_values"],
                       tiny_vlm_processor()(text=[IMAGE_TOKEN], images=[[image]], return_tensors="pt")["pixel_values"])


# --------------------------------------------------------------------------- tokens and pixels


def test_expand_repeats_each_image_token_and_never_trains_on_it() -> None:
    tokens = ImageTokens(tiny_vlm_processor())
    t = tokens.token_id
    seq = {"input_ids": [1, t, 2, t, 3], "completion_mask": [1, 1, 1, 1, 1]}
    out = tokens.expand(seq, [2, 3], "row 0")
    assert out == {"input_ids": [1, t, t, 2, t, t, t, 3], "completion_mask": [1, 0, 0, 1, 0, 0, 0, 1]}
    with pytest.raises(DataFormatError, match="2 image tokens .* for 1 images"):
        tokens.expand(seq, [2], "row 0")


def test_collated_pixels_and_image_tokens_line_up_with_the_text(tmp_path) -> None:
    rows = shapes_rows("prompt_completion", size=BATCH)
    batch = next(iter(_data(PromptCompletionDataModule, rows, tmp_path).train_dataloader()))
    token_id = load_tokenizer(MODEL).convert_tokens_to_ids(IMAGE_TOKEN)
    image = batch.input_ids == token_id
    assert image.sum(1).tolist() == [IMAGE_TOKENS] * BATCH
    assert not (image & batch.completion_mask).any()
    pixels = batch.vision["pixel_values"]
    assert pixels.shape == (BATCH, 3, 32, 32)
    expected = tiny_vlm_processor().image_processor([r["images"][0] for r in rows], return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, expected)  # row i's image, in row order
    completions = [load_tokenizer(MODEL).decode(ids[m]) for ids, m in zip(batch.input_ids, batch.completion_mask)]
    assert completions == [r["completion"][0]["content"][0]["text"] + "<|im_end|>\n" for r in rows]


def test_language_modeling_rows_train_on_every_token_but_the_image(tmp_path) -> None:
    rows = shapes_rows("language_modeling", size=4)
    batch = next(iter(_data(LanguageModelingDataModule, rows, tmp_path).train_dataloader()))
    image = batch.input_ids == load_tokenizer(MODEL).convert_tokens_to_ids(IMAGE_TOKEN)
    assert torch.equal(batch.completion_mask, (batch.sequence_ids >= 0) & ~image)


def test_preference_pairs_repeat_each_rows_image_for_chosen_and_rejected(tmp_path) -> None:
    rows = shapes_rows("preference", size=4)
    batch = next(iter(_data(PreferenceDataModule, rows, tmp_path).train_dataloader()))
    assert batch.num_sequences == 8 and batch.vision["pixel_values"].shape[0] == 8
    assert torch.equal(batch.vision["pixel_values"][:4], batch.vision["pixel_values"][4:])


def test_kto_rows_and_their_kl_pairs_carry_the_prompts_image(tmp_path) -> None:
    rows = shapes_rows("unpaired_preference", size=4)
    data = _data(UnpairedPreferenceDataModule, rows, tmp_path, kl_pairs=True)
    batch = next(iter(data.train_dataloader()))
    token_id = load_tokenizer(MODEL).convert_tokens_to_ids(IMAGE_TOKEN)
    assert batch.num_sequences == 8 and (batch.input_ids == token_id).sum(1).tolist() == [IMAGE_TOKENS] * 8
    pixels = batch.vision["pixel_values"]
    assert torch.equal(pixels[:4], pixels[4:])  # KL sequence E+i: row i's prompt (and image), row i-1's completion
    loss, metrics = _first_step(KTO(MODEL), batch)
    assert torch.isfinite(torch.tensor(loss)) and "kl" in metrics


def test_string_contents_get_image_parts_in_the_first_user_turn() -> None:
    messages = [{"role": "system", "content": "Look."}, {"role": "user", "content": "What colour?"},
                {"role": "user", "content": "Sure?"}]
    out = with_image_parts(messages, 2, "row 0")
    assert out[0]["content"] == [{"type": "text", "text": "Look."}]
    assert out[1]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What colour?"}]
    assert out[2]["content"] == [{"type": "text", "text": "Sure?"}]


@pytest.mark.parametrize("source", ["path", "bytes", "pil"])
def test_images_from_paths_bytes_or_pil(source: str, tmp_path) -> None:
    image = Image.new("RGB", (32, 32), (0, 255, 0))
    path = tmp_path / "green.png"
    image.save(path)
    value = {"path": str(path), "bytes": path.read_bytes(), "pil": image}[source]
    rows = [{"image": value if source != "pil" else str(path), "prompt": "<image>What colour?", "completion": " green"}]
    if source == "bytes":
        rows = [{**rows[0], "image": path.read_bytes()}]
    data = PromptCompletionDataModule(_saved(rows, tmp_path / "rows"), batch_size=1).connect(tiny_vlm_processor())
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert torch.equal(batch.vision["pixel_values"], tiny_vlm_processor().image_processor([image], return_tensors="pt")["pixel_values"])


# --------------------------------------------------------------------------- online: generating from images


def _prompts(tmp_path, size: int = 8):
    data = PromptOnlyDataModule("builtin:shapes?size=8", batch_size=size, eval_split="test", eval_batch_size=size)
    data.connect(tiny_vlm_processor())
    data.setup("fit")
    return next(iter(data.val_dataloader()))


def test_the_engine_reads_each_prompts_pixels(tmp_path) -> None:
    """builtin:tiny-vlm-sft answers greedily with the colour of the image it is given: its own prompt's, and
    another prompt's when the pixels are rolled by one (so the answers follow the pixels, not the text)."""
    from lit_align.rewards.shapes import shapes_reward
    from lit_align.rollout.engines import HFEngine, SamplingParams

    batch, model, tok = _prompts(tmp_path), load_causal_lm("builtin:tiny-vlm-sft"), load_tokenizer("builtin:tiny-vlm-sft")
    greedy = SamplingParams(max_completion_length=8, temperature=0.0, num_generations=2)
    engine = HFEngine(tok)
    for shift in (0, 1):
        rows = batch.vision_rows[shift:] + batch.vision_rows[:shift]
        gens = engine.generate(model, batch.prompt_ids, batch.prompt_mask, greedy, vision_rows=rows)
        answers = batch.extras["answer"][shift:] + batch.extras["answer"][:shift]
        texts = tok.batch_decode(gens.completion_ids, skip_special_tokens=True)
        assert shapes_reward(None, texts, [a for a in answers for _ in range(2)]) == [1.0] * 16, texts
        assert len(gens.vision_rows) == 16 and gens.vision_rows[2] is rows[1]  # each completion keeps its prompt's
    picked = gens.select(torch.tensor([3, 0])).cat(gens.select(torch.tensor([5])), tok.pad_token_id)
    assert [r is gens.vision_rows[i] for r, i in zip(picked.vision_rows, (3, 0, 5))] == [True] * 3


def test_the_image_token_is_never_sampled(tmp_path) -> None:
    from lit_align.rollout.engines import HFEngine, SamplingParams

    batch, model = _prompts(tmp_path), load_causal_lm("builtin:tiny-vlm")
    token_id = model.config.image_token_id
    model.lm_head.register_forward_hook(lambda m, i, out: out.index_add(-1, torch.tensor([token_id]),
                                                                        torch.full((*out.shape[:-1], 1), 50.0)))
    gens = HFEngine(load_tokenizer(MODEL), seed=0).generate(model, batch.prompt_ids, batch.prompt_mask,
                                                            SamplingParams(max_completion_length=4, num_generations=2),
                                                            vision_rows=batch.vision_rows)
    assert not (gens.completion_ids == token_id).any()


def test_grpo_trains_on_images_and_rewards_get_them() -> None:
    seen: dict = {}

    def reward(prompts, completions, answer, images, **kwargs):
        from lit_align.rewards.shapes import shapes_reward

        seen.update(images=images, answer=answer)
        return shapes_reward(prompts, completions, answer)

    module = GRPO("builtin:tiny-vlm-sft", reward_funcs=[reward], num_generations=4, max_completion_length=8, beta=0.04)
    data = PromptOnlyDataModule("builtin:shapes?size=16", batch_size=16)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[RolloutCallback()]).fit(module, data)
    assert len(seen["images"]) == 16 and isinstance(seen["images"][0][0], Image.Image)  # each completion's row's images
    assert torch.isfinite(module.trainer.callback_metrics["train/loss"])
    assert 0.0 < float(module.trainer.callback_metrics["train/reward"]) <= 1.0


def test_online_dpo_samples_pairs_from_images(tmp_path) -> None:
    """Both samples of a pair come from their prompt's pixels, and the policy's and the reference's forward
    read them: with the pixels of one pair swapped for another's, the pair's log-probs change."""
    from lit_align.rollout.engines import HFEngine

    module = OnlineDPO("builtin:tiny-vlm-sft", reward_funcs=["shapes_reward"], max_new_tokens=4, temperature=1.0)
    module.configure_model()
    module.engine = HFEngine(module.tokenizer, seed=0)
    batch = _prompts(tmp_path)
    rollout = module.make_rollout(batch, "train")
    E = len(batch)
    rows = rollout.generations.vision_rows
    assert len(rows) == 2 * E and all(rows[i] is batch.vision_rows[i] and rows[E + i] is batch.vision_rows[i] for i in range(E))
    assert rollout.sequences.vision["pixel_values"].shape[0] == 2 * E
    logps = module.token_logps(module.model, rollout.sequences, rollout.generations)[0]
    swapped = replace(rollout.generations, vision_rows=[rows[1], rows[0], *rows[2:]])
    other = module.token_logps(module.model, module.sequences(swapped), swapped)[0]
    changed = (logps - other).abs().sum(1) > 1e-4
    assert changed[:2].all() and not changed[2:].any()
    assert rollout.ref_logps is not None and torch.isfinite(rollout.ref_logps).all()


def test_online_dpo_trains_on_images() -> None:
    module = OnlineDPO("builtin:tiny-vlm-sft", reward_funcs=["shapes_reward"], max_new_tokens=4, temperature=1.0)
    data = PromptOnlyDataModule("builtin:shapes?size=16", batch_size=8)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[RolloutCallback()]).fit(module, data)
    metrics = module.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and 0.0 <= float(metrics["train/objective/scores"]) <= 1.0


def test_methods_that_do_not_generate_from_images_say_so(tmp_path) -> None:
    module = NashMD("builtin:tiny-vlm-sft", reward_funcs=["shapes_reward"], max_new_tokens=4)
    module.configure_model()
    with pytest.raises(ValueError, match="NashMD does not generate from images yet"):
        module.make_rollout(_prompts(tmp_path), "train")


# --------------------------------------------------------------------------- errors


def test_images_for_a_text_only_model_are_refused(tmp_path) -> None:
    data = PromptCompletionDataModule(_saved(shapes_rows("prompt_completion", size=4), tmp_path / "rows"))
    data.connect(load_tokenizer("builtin:tiny"))
    with pytest.raises(DataFormatError, match="rows have images .* text-only model"):
        data.setup("fit")


def test_unreadable_and_missing_images_name_the_row(tmp_path) -> None:
    rows = shapes_rows("prompt_completion", size=3)
    rows[2] = {**rows[2], "images": [str(tmp_path / "nowhere.png")]}
    rows = [{**r, "images": [r["images"][0] if isinstance(r["images"][0], str) else str(tmp_path / "ok.png")]} for r in rows]
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rows[1] = {**rows[1], "images": [str(tmp_path / "bad.png")]}
    with pytest.raises(DataFormatError, match=r"row 1, image 0: cannot read the image"):
        _data(PromptCompletionDataModule, rows[:2], tmp_path / "a")
    with pytest.raises(DataFormatError, match=r"row 2, image 0: image file .*nowhere.png.* does not exist"):
        _data(PromptCompletionDataModule, [rows[0], rows[0], rows[2]], tmp_path / "b")


def test_packing_with_images_is_refused(tmp_path) -> None:
    with pytest.raises(DataFormatError, match="packing and padding_free are not supported with images"):
        _data(LanguageModelingDataModule, shapes_rows("language_modeling", size=4), tmp_path, packing=True, max_length=256)


def test_a_row_cut_inside_its_image_is_dropped(tmp_path) -> None:
    rows = shapes_rows("prompt_completion", size=4)
    data = _data(PromptCompletionDataModule, rows, tmp_path, max_length=80)
    assert len(data.datasets["train"]) == 4  # 63-token prompts plus the answer fit
    with pytest.raises(DataFormatError, match="every row was dropped .* or the cut would split an image"):
        _data(PromptCompletionDataModule, rows, tmp_path / "b", max_length=30, truncation_mode="keep_end")  # keeps the answer


# --------------------------------------------------------------------------- parity with TRL 1.16


def _trl(trainer_cls, config_cls, model_dir: str, rows: list[dict], out_dir, max_steps: int = 1, **kw):
    args = config_cls(
        output_dir=str(out_dir), report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, train_sampling_strategy="sequential", learning_rate=kw.pop("learning_rate", LR),
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=1.0, max_steps=max_steps, logging_steps=1, save_strategy="no",
        disable_tqdm=True, seed=0, **kw,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(model=model_dir, args=args, train_dataset=datasets.Dataset.from_list(rows))
    assert trainer._is_vlm
    return trainer


def _first_step(module, batch) -> tuple[float, dict]:
    module.configure_model()
    logged: dict = {}
    module.log_metrics = lambda metrics, stage, batch_size: logged.update(metrics)
    return float(module.training_step(batch, 0).detach()), {k: float(v) for k, v in logged.items()}


def _approx(expected: float):
    return pytest.approx(expected, rel=1e-6, abs=1e-5)


def test_sft_first_step_matches_trl(model_dir: str, tmp_path) -> None:
    from trl import SFTConfig, SFTTrainer

    rows = shapes_rows("prompt_completion", size=BATCH)
    trainer = _trl(SFTTrainer, SFTConfig, model_dir, rows, tmp_path / "trl")
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    batch = next(iter(_data(PromptCompletionDataModule, rows, tmp_path).train_dataloader()))
    width = batch.input_ids.shape[1]  # TRL pads its completions to the longest, ours to the longest row
    assert torch.equal(batch.input_ids, theirs["input_ids"][:, :width])
    assert torch.equal(batch.completion_mask[:, 1:], theirs["labels"][:, 1:width] != -100)
    assert torch.equal(batch.vision["pixel_values"], theirs["pixel_values"])
    trainer.model.train()
    with torch.no_grad():
        expected = float(trainer.compute_loss(trainer.model, theirs))
    loss, metrics = _first_step(SFT(MODEL), batch)
    assert loss == _approx(expected)
    assert metrics["mean_token_accuracy"] == _approx(trainer._metrics["train"]["mean_token_accuracy"][-1])


def test_dpo_first_step_matches_trl(model_dir: str, tmp_path) -> None:
    from trl import DPOConfig, DPOTrainer

    rows = shapes_rows("preference", size=BATCH)
    trainer = _trl(DPOTrainer, DPOConfig, model_dir, rows, tmp_path / "trl", loss_type=["sigmoid", "sft"])
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    trainer.model.train()
    # the policy moved away from the reference, so the log-ratios are not all zero
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.01 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).view_as(p))
    with torch.no_grad():
        expected = float(trainer.compute_loss(trainer.model, theirs))
    ref_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    module = DPO(MODEL, loss_type=["sigmoid", "sft"])
    module.configure_model()
    module.model.load_state_dict(trainer.model.state_dict())
    loss, metrics = _first_step(module, next(iter(_data(PreferenceDataModule, rows, tmp_path).train_dataloader())))
    assert loss == _approx(expected)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert metrics[name] == _approx(ref_metrics[name]), name
    assert abs(metrics["rewards/chosen"]) > 1e-3


class _StepLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_three_sft_adamw_steps_match_trl(model_dir: str, tmp_path) -> None:
    from trl import SFTConfig, SFTTrainer

    steps = 3
    rows = shapes_rows("prompt_completion", size=steps * BATCH)
    trainer = _trl(SFTTrainer, SFTConfig, model_dir, rows, tmp_path / "trl", max_steps=steps)
    losses: list[float] = []
    compute = trainer.compute_loss
    trainer.compute_loss = lambda *a, **k: (lambda loss: losses.append(float(loss.detach())) or loss)(compute(*a, **k))
    trainer.train()
    module = SFT(MODEL, optimizer=lambda p: torch.optim.AdamW(p, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0))
    record = _StepLosses()
    L.Trainer(max_steps=steps, accelerator="cpu", devices=1, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[record]
              ).fit(module, _data(PromptCompletionDataModule, rows, tmp_path))
    assert record.losses == pytest.approx(losses, abs=1e-4)
    ours, theirs = module.model.state_dict(), trainer.model.state_dict()
    for name, w in ours.items():
        torch.testing.assert_close(w, theirs[name], atol=1e-4, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    moved = max((ours[n] - w).abs().max().item() for n, w in tiny_vlm().state_dict().items())
    assert moved > 2e-3


def test_three_dpo_steps_match_trl(model_dir: str, tmp_path) -> None:
    """DPO on images over three optimizer steps: each step's loss, and every weight after them, as TRL's
    (the reference is the starting weights on both sides, so the first loss is log 2 and the others move).
    Plain SGD on both sides: the projector's last layer starts at zero, so the vision tower's first
    gradients are rounding noise around zero, which Adam (dividing by the gradient's own size) would turn
    into steps of the learning rate on either side."""
    from trl import DPOConfig, DPOTrainer

    steps, lr = 3, 5.0
    rows = shapes_rows("preference", size=steps * BATCH)
    trainer = _trl(DPOTrainer, DPOConfig, model_dir, rows, tmp_path / "trl", max_steps=steps, optim="sgd", learning_rate=lr)
    losses: list[float] = []
    compute = trainer.compute_loss
    trainer.compute_loss = lambda *a, **k: (lambda loss: losses.append(float(loss.detach())) or loss)(compute(*a, **k))
    trainer.train()
    module = DPO(MODEL, optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    record = _StepLosses()
    L.Trainer(max_steps=steps, accelerator="cpu", devices=1, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[record]
              ).fit(module, _data(PreferenceDataModule, rows, tmp_path))
    assert record.losses == pytest.approx(losses, abs=1e-5)
    assert abs(losses[-1] - losses[0]) > 1e-2
    ours, theirs = module.model.state_dict(), trainer.model.state_dict()
    for name, w in ours.items():
        torch.testing.assert_close(w, theirs[name], atol=1e-4, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    moved = {n: (ours[n] - w).abs().max().item() for n, w in tiny_vlm().state_dict().items()}
    assert max(moved.values()) > 1e-3 and max(v for n, v in moved.items() if "vision_tower" in n) > 1e-6
