"""The embedded default: builtin:tiny (model + byte tokenizer) and builtin:arithmetic (task + rewards)."""

from __future__ import annotations

import os
import random
import re

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may touch the Hub

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from lit_align.data.arithmetic import (
    FORMATS,
    arithmetic_dataset,
    arithmetic_rows,
    parse_answer,
    parse_builtin_dataset,
    solve,
)
from lit_align.models.builtin import (
    BUILTIN_MODELS,
    builtin_model,
    builtin_tokenizer,
    is_builtin,
)
from lit_align.rewards import arithmetic_format_reward, arithmetic_reward

CONV = [
    {"role": "system", "content": "Be exact."},
    {"role": "user", "content": "Compute 7+5."},
    {"role": "assistant", "content": "7+5=12\nAnswer: 12"},
    {"role": "user", "content": "And 12-3? ünï 🚀"},
    {"role": "assistant", "content": "12-3=9\nAnswer: 9 ✓"},
]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return builtin_tokenizer()


@pytest.fixture(scope="module")
def model():
    return builtin_model()


def _text(value) -> str:
    return value if isinstance(value, str) else value[-1]["content"]


def _check_lines(prompt: str, completion: str) -> list[bool]:
    """For each solution line, whether its arithmetic holds and it starts from the previous total."""
    operands = [int(x) for x in re.findall(r"\d+", prompt)]
    ops = re.findall(r"[+-]", prompt.split(" ", 1)[1])
    lines = completion.split("\n")
    assert len(lines) == len(ops) + 1 and lines[-1].startswith("Answer: ")
    ok, total = [], operands[0]
    for line, op, n in zip(lines, ops, operands[1:]):
        m = re.fullmatch(r"(-?\d+)([+-])(\d+)=(-?\d+)", line)
        assert m, line
        a, o, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        assert (o, b) == (op, n)
        ok.append(a == total and c == (a + b if o == "+" else a - b))
        total = c
    return ok


# --------------------------------------------------------------------------- tokenizer


def test_is_builtin():
    assert is_builtin("builtin:tiny") and is_builtin("builtin:arithmetic?size=3")
    assert not is_builtin("meta-llama/Llama-3.2-1B") and not is_builtin("./builtin:tiny")


def test_byte_round_trip(tok):
    rng = random.Random(0)
    # Random code points across all planes (surrogates excluded: not encodable as UTF-8).
    samples = [
        "",
        "héllo wörld  \t\n\r end . , ' \"",
        "日本語 العربية עברית 🚀👩‍👩‍👧 e\u0301 \x00\x7f\u200b",
        "".join(
            chr(rng.choice([rng.randrange(0x20, 0xD800), rng.randrange(0xE000, 0x110000)]))
            for _ in range(300)
        ),
    ]
    for s in samples:
        ids = tok(s)["input_ids"]
        assert ids == list(s.encode("utf-8"))  # one token per byte, id == byte value, no BOS/EOS added
        assert tok.decode(ids) == s


def test_tokenizer_specials(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>" and tok.bos_token is None
    assert tok.padding_side == "right" and tok.model_max_length == 1024
    assert len(tok) == 256 + 4
    for special in ("<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        ids = tok(special)["input_ids"]
        assert len(ids) == 1 and ids[0] >= 256 and ids[0] in tok.all_special_ids
    assert tok.decode(tok("a<|im_end|>b")["input_ids"], skip_special_tokens=True) == "ab"


def test_chat_template_assistant_mask(tok):
    out = tok.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(mask) == len(ids)
    # Rebuild the expected mask by hand from the ChatML layout.
    expected_ids, expected_mask = [], []
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    for msg in CONV:
        header = [im_start, *f"{msg['role']}\n".encode()]
        body = [*msg["content"].encode(), im_end]
        expected_ids += header + body + [ord("\n")]
        trained = int(msg["role"] == "assistant")
        expected_mask += [0] * len(header) + [trained] * len(body) + [0]
    assert ids == expected_ids
    assert mask == expected_mask
    # Decoding the masked tokens gives exactly the assistant contents, each closed by <|im_end|>.
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert masked == "7+5=12\nAnswer: 12<|im_end|>12-3=9\nAnswer: 9 ✓<|im_end|>"


def test_chat_template_generation_prompt_is_prefix(tok):
    for cut in (2, 4):  # every assistant turn
        full = tok.apply_chat_template(CONV[: cut + 1], tokenize=True, return_dict=False)
        prompt = tok.apply_chat_template(
            CONV[:cut], tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert full[: len(prompt)] == prompt and len(full) > len(prompt)
        assert tok.decode(full[len(prompt) :]) == CONV[cut]["content"] + "<|im_end|>\n"
    text = tok.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=True)
    assert (
        text
        == "<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\nCompute 7+5.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tokenizer_save_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(again, PreTrainedTokenizerFast)
    assert again.chat_template == tok.chat_template
    assert (again.eos_token, again.pad_token, again.bos_token) == (tok.eos_token, tok.pad_token, None)
    assert (again.padding_side, again.model_max_length, len(again)) == ("right", 1024, len(tok))
    assert sorted(again.all_special_ids) == sorted(tok.all_special_ids)
    s = "Compute 7+5-3+8. ünï 🚀 <|im_start|>"
    assert again(s)["input_ids"] == tok(s)["input_ids"]
    kw = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert dict(again.apply_chat_template(CONV, **kw)) == dict(tok.apply_chat_template(CONV, **kw))


# --------------------------------------------------------------------------- model


def test_model_config(model, tok):
    cfg = model.config
    assert cfg.vocab_size >= len(tok) and cfg.vocab_size % 8 == 0
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        64,
        2,
        4,
        2,
    )
    assert cfg.intermediate_size == 192 and cfg.max_position_embeddings == 1024
    assert not cfg.tie_word_embeddings and cfg.attention_dropout == 0.0
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (
        tok.pad_token_id,
        tok.eos_token_id,
        None,
    )
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.dtype == torch.float32


def test_model_deterministic_and_rng_untouched(model):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    other = builtin_model()
    assert torch.equal(torch.rand(3), expected)  # global RNG not consumed
    a, b = model.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    half = builtin_model(dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_tiny_32k():
    assert "builtin:tiny-32k" in BUILTIN_MODELS
    big = builtin_model("builtin:tiny-32k")
    cfg = big.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (
        32000,
        128,
        4,
        4,
    )
    assert big.lm_head.weight.shape == (32000, 128)
    assert builtin_tokenizer("builtin:tiny-32k").eos_token_id < 300


def test_unknown_builtin_model():
    with pytest.raises(ValueError, match="builtin:tiny-32k"):
        builtin_model("builtin:huge")
    with pytest.raises(ValueError, match="builtin:tiny"):
        builtin_tokenizer("builtin:nope")


def test_generate_stops_by_max_new_tokens(model, tok):
    ids = tok.apply_chat_template(
        CONV[1:2], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=7, do_sample=False)
    n = ids["input_ids"].shape[1]
    assert torch.equal(out[:, :n], ids["input_ids"])
    # The untrained model does not emit EOS in its first 7 greedy tokens, so max_new_tokens stops it.
    assert tok.eos_token_id not in out[0, n:].tolist()
    assert out.shape[1] == n + 7


def test_save_reload_model_and_generate_stops_at_eos(model, tok, tmp_path):
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.tensor([list(b"Compute 7+5.")])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, again(x).logits)
    # Force EOS to be the argmax: generation must stop right after it (generation_config survived).
    eos = tok.eos_token_id
    hook = again.lm_head.register_forward_hook(
        lambda mod, inp, out: out.index_add(-1, torch.tensor([eos]), torch.full((*out.shape[:-1], 1), 1e4))
    )
    try:
        out = again.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False)
    finally:
        hook.remove()
    assert out[0, x.shape[1] :].tolist() == [eos]


# --------------------------------------------------------------------------- task


def test_solve_and_parse_answer():
    assert solve("Compute 7+5-3+8.") == 7 + 5 - 3 + 8 == 17
    assert solve("Compute 3-10-4.") == -11
    assert parse_answer("7+5=12\n12-3=9\n9+8=17\nAnswer: 17") == 17
    assert parse_answer("Answer: 3\nno wait\nAnswer: -4 because") == -4
    assert parse_answer("the answer is 17") is None
    assert parse_answer("Answer: seventeen") is None


@pytest.mark.parametrize("conversational", [False, True])
def test_formats_columns_and_types(conversational):
    def is_msgs(v, role):
        return (
            isinstance(v, list) and len(v) == 1 and v[0]["role"] == role and isinstance(v[0]["content"], str)
        )

    def prompt_ok(v):
        return is_msgs(v, "user") if conversational else isinstance(v, str)

    def completion_ok(v):
        return is_msgs(v, "assistant") if conversational else isinstance(v, str)

    expected = {
        "language_modeling": {"messages"} if conversational else {"text"},
        "prompt_completion": {"prompt", "completion"},
        "preference": {"prompt", "chosen", "rejected"},
        "unpaired_preference": {"prompt", "completion", "label"},
        "stepwise": {"prompt", "completions", "labels"},
        "prompt_only": {"prompt", "answer"},
    }
    assert set(FORMATS) == set(expected)
    for fmt in FORMATS:
        rows = arithmetic_rows(fmt, size=12, conversational=conversational)
        assert len(rows) == 12
        for row in rows:
            assert set(row) == expected[fmt], fmt
            if fmt == "language_modeling":
                if conversational:
                    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
                else:
                    prompt, completion = row["text"].split("\n", 1)
                    assert prompt.startswith("Compute ") and parse_answer(completion) == solve(prompt)
                continue
            assert prompt_ok(row["prompt"])
            if fmt == "prompt_completion":
                assert completion_ok(row["completion"])
            elif fmt == "preference":
                assert completion_ok(row["chosen"]) and completion_ok(row["rejected"])
            elif fmt == "unpaired_preference":
                assert completion_ok(row["completion"]) and type(row["label"]) is bool
            elif fmt == "stepwise":
                assert all(isinstance(s, str) for s in row["completions"])
                assert all(type(b) is bool for b in row["labels"])
                assert len(row["labels"]) == len(row["completions"]) == 4  # 3 steps + the answer line
            else:
                assert type(row["answer"]) is int and row["answer"] == solve(_text(row["prompt"]))


def test_rows_deterministic_and_splits_differ():
    a = arithmetic_rows("preference", size=50, seed=3)
    assert a == arithmetic_rows("preference", size=50, seed=3)
    assert a != arithmetic_rows("preference", size=50, seed=4)
    train = {r["prompt"] for r in arithmetic_rows("prompt_only", "train", size=400)}
    test = {r["prompt"] for r in arithmetic_rows("prompt_only", "test", size=100)}
    assert train.isdisjoint(test) and len(test) > 50
    # Same prompts in every format, so methods on different formats are comparable.
    assert [r["prompt"] for r in a] == [r["prompt"] for r in arithmetic_rows("stepwise", size=50, seed=3)]


def test_steps_option_and_prompt_length():
    rows = arithmetic_rows("prompt_completion", size=30, steps=5, max_operand=9)
    for r in rows:
        assert r["completion"].count("\n") == 5 and len(r["prompt"]) <= 40
        assert all(int(x) <= 9 for x in re.findall(r"\d+", r["prompt"]))


def test_correct_and_corrupted_solutions():
    for row in arithmetic_rows("preference", size=200, seed=1):
        prompt = row["prompt"]
        assert parse_answer(row["chosen"]) == solve(prompt)
        assert all(_check_lines(prompt, row["chosen"]))
        assert parse_answer(row["rejected"]) != solve(prompt)
        checks = _check_lines(prompt, row["rejected"])
        assert checks.count(False) == 1  # exactly one slip, carried on consistently afterwards
    unpaired = arithmetic_rows("unpaired_preference", size=200, seed=1)
    for row in unpaired:
        assert (parse_answer(row["completion"]) == solve(row["prompt"])) == row["label"]
    assert 80 <= sum(r["label"] for r in unpaired) <= 120
    for n in (2, 3):
        assert {r["label"] for r in arithmetic_rows("unpaired_preference", size=n, seed=9)} == {True, False}


def test_stepwise_labels_monotone():
    rows = arithmetic_rows("stepwise", size=200, seed=2)
    fully_correct = 0
    for row in rows:
        labels = row["labels"]
        first_false = labels.index(False) if False in labels else len(labels)
        assert labels == [True] * first_false + [False] * (len(labels) - first_false)
        completion = "\n".join(row["completions"])
        checks = _check_lines(row["prompt"], completion)
        if first_false == len(labels):
            fully_correct += 1
            assert all(checks) and parse_answer(completion) == solve(row["prompt"])
        else:
            assert checks.index(False) == first_false  # the first False label is the actual slip
            assert parse_answer(completion) != solve(row["prompt"])
    assert 0 < fully_correct < len(rows)


def test_rewards():
    for conversational in (False, True):
        rows = arithmetic_rows("preference", size=100, seed=5, conversational=conversational)
        prompts = [r["prompt"] for r in rows]
        answers = [solve(_text(p)) for p in prompts]
        assert arithmetic_reward(prompts, [r["chosen"] for r in rows]) == [1.0] * 100
        assert arithmetic_reward(prompts, [r["rejected"] for r in rows]) == [0.0] * 100
        assert arithmetic_reward(prompts, [r["chosen"] for r in rows], answer=answers) == [1.0] * 100
        assert arithmetic_format_reward(prompts, [r["rejected"] for r in rows]) == [1.0] * 100
    prompts = ["Compute 7+5-3+8."] * 5
    completions = ["Answer: 17", "Answer: 17\n", "Answer: 16", "17", "Answer: 17 because"]
    assert arithmetic_reward(prompts, completions, answer=[17] * 5) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert arithmetic_format_reward(prompts, completions) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_parse_builtin_dataset():
    name = "builtin:arithmetic?size=200&seed=3&steps=3&conversational=true"
    assert parse_builtin_dataset(name) == (
        "arithmetic",
        {"size": 200, "seed": 3, "steps": 3, "conversational": True},
    )
    assert parse_builtin_dataset("builtin:arithmetic") == ("arithmetic", {})
    with pytest.raises(ValueError, match="unknown builtin task 'algebra'.*arithmetic"):
        parse_builtin_dataset("builtin:algebra")
    with pytest.raises(ValueError, match="unknown option 'sz'.*size"):
        parse_builtin_dataset("builtin:arithmetic?sz=3")
    with pytest.raises(ValueError, match="'size'.*int.*'ten'"):
        parse_builtin_dataset("builtin:arithmetic?size=ten")
    with pytest.raises(ValueError, match="'conversational'.*bool.*'maybe'"):
        parse_builtin_dataset("builtin:arithmetic?conversational=maybe")
    with pytest.raises(ValueError, match="given twice"):
        parse_builtin_dataset("builtin:arithmetic?seed=1&seed=2")


def test_arithmetic_dataset():
    train = arithmetic_dataset("builtin:arithmetic?size=40&seed=1", "preference", "train")
    assert train.num_rows == 40 and train.column_names == ["prompt", "chosen", "rejected"]
    assert train[0] == arithmetic_rows("preference", size=40, seed=1)[0]
    assert arithmetic_dataset("builtin:arithmetic?size=40", "prompt_only", "test").num_rows == 16
    assert arithmetic_dataset("builtin:arithmetic?size=400", "prompt_only", "test").num_rows == 40
    assert arithmetic_dataset("builtin:arithmetic?test_size=5", "prompt_only", "test").num_rows == 5
    conv = arithmetic_dataset("builtin:arithmetic?size=4&conversational=1", "stepwise", "train")
    assert conv[0]["prompt"][0]["role"] == "user"
    with pytest.raises(ValueError, match="split 'validation'"):
        arithmetic_dataset("builtin:arithmetic", "prompt_only", "validation")
    with pytest.raises(ValueError, match="unknown format"):
        arithmetic_dataset("builtin:arithmetic", "pairs", "train")


# --------------------------------------------------------------------------- builtin:tiny-sft


def _accuracy(model, temperature: float, size: int = 64) -> float:
    """Correct answers on the training sums of builtin:tiny-sft's recipe, 4 samples per prompt."""
    from lit_align.data.formats import collate_prompts
    from lit_align.rollout.engines import HFEngine, SamplingParams

    tok = builtin_tokenizer()
    rows = arithmetic_rows("prompt_only", "train", size=size, steps=1, max_operand=9)
    batch = collate_prompts([{"input_ids": [tok(r["prompt"])["input_ids"]], "prompt": r["prompt"]} for r in rows], tok.pad_token_id)
    gen = torch.Generator().manual_seed(0)
    engine = HFEngine(tok)
    engine.generator = gen
    out = engine.generate(model, batch.prompt_ids, batch.prompt_mask, SamplingParams(max_completion_length=24, temperature=temperature, num_generations=4))
    texts = tok.batch_decode([c[m.bool()] for c, m in zip(out.completion_ids, out.completion_mask)], skip_special_tokens=True)
    answers = [r["answer"] for r in rows for _ in range(4)]
    return sum(arithmetic_reward(None, texts, answers)) / len(texts)


def test_tiny_sft_knows_the_sums_but_samples_slips():
    """The shipped warm start: the same network as builtin:tiny, other weights; greedy decoding right on
    most training sums, sampling at temperature 1 right on far fewer (the gap the online configs close)."""
    model = builtin_model("builtin:tiny-sft")
    tiny = builtin_model("builtin:tiny")
    assert model.config.to_dict() == tiny.config.to_dict()
    assert not torch.equal(model.lm_head.weight, tiny.lm_head.weight)
    torch.testing.assert_close(builtin_model("builtin:tiny-sft").lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    greedy, sampled = _accuracy(model, 0.0), _accuracy(model, 1.0)
    assert greedy >= 0.8 and 0.2 <= sampled <= 0.6 and greedy - sampled >= 0.3, (greedy, sampled)


def test_tiny_sft_recipe_runs_and_a_missing_weights_file_is_reported(tmp_path, monkeypatch):
    from lit_align import tiny_sft
    from lit_align.models import builtin

    out = tiny_sft.regenerate(tmp_path / "w.safetensors", ["--trainer.max_steps=2"])
    monkeypatch.setitem(builtin.BUILTIN_WEIGHTS, "builtin:tiny-sft", out)
    builtin_model("builtin:tiny-sft")  # a recipe run's file loads as the builtin
    monkeypatch.setitem(builtin.BUILTIN_WEIGHTS, "builtin:tiny-sft", tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match=r"regenerate them with: python -m lit_align.tiny_sft"):
        builtin_model("builtin:tiny-sft")


def test_noise_option_slips_that_share_of_demonstrations():
    rows = arithmetic_rows("prompt_completion", size=400, steps=1, max_operand=9, noise=0.5)
    wrong = sum(parse_answer(r["completion"]) != solve(r["prompt"]) for r in rows) / len(rows)
    assert 0.4 < wrong < 0.6
    assert arithmetic_rows("prompt_completion", size=50) == arithmetic_rows("prompt_completion", size=50, noise=0.0)
    assert arithmetic_rows("preference", size=20, noise=0.5) == arithmetic_rows("preference", size=20)
    with pytest.raises(ValueError, match=r"option 'noise' in 'builtin:arithmetic\?noise=1.5' must be a float in \[0, 1\]"):
        parse_builtin_dataset("builtin:arithmetic?noise=1.5")


def test_the_template_renders_tools_in_the_hermes_convention_and_plain_chats_as_before(tok):
    """Tools add a system turn and <tool_call> markup; a conversation without them renders as the
    template did before tools (builtin:tiny-sft was trained on those renders)."""
    plain = ("{%- for message in messages -%}{%- if message['role'] == 'assistant' -%}{{- '<|im_start|>assistant\\n' -}}"
             "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}{%- else -%}"
             "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
             "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
    for cut in range(1, len(CONV) + 1):
        for gen in (False, True):
            assert tok.apply_chat_template(CONV[:cut], tokenize=False, add_generation_prompt=gen) == tok.apply_chat_template(
                CONV[:cut], tokenize=False, add_generation_prompt=gen, chat_template=plain)
    conv = [{"role": "user", "content": "Compute 7+5."},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 7, "b": 5}}}]},
            {"role": "tool", "name": "add", "content": "12"}, {"role": "assistant", "content": "Answer: 12"}]
    schema = {"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {"type": "object", "properties": {}}}}
    text = tok.apply_chat_template(conv, tools=[schema], tokenize=False)
    assert text == ('<|im_start|>system\n<tools>add;</tools><|im_end|>\n<|im_start|>user\nCompute 7+5.<|im_end|>\n'
                    '<|im_start|>assistant\n<tool_call>{"name": "add", "arguments": {"a": 7, "b": 5}}</tool_call><|im_end|>\n'
                    '<|im_start|>tool\n12<|im_end|>\n<|im_start|>assistant\nAnswer: 12<|im_end|>\n')
    out = tok.apply_chat_template(conv, tools=[schema], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert marked == '<tool_call>{"name": "add", "arguments": {"a": 7, "b": 5}}</tool_call><|im_end|>Answer: 12<|im_end|>'


def test_tiny_tools_calls_the_calculator_in_some_samples_and_rightly():
    """builtin:tiny-tools, the warm start of configs/grpo_tools.yaml: greedy decoding works the sum out by
    hand (the demonstrations' mode); sampling calls the calculator now and then, and a call it writes holds
    the prompt's expression: the behaviour GRPO then reinforces from the reward."""
    from lit_align.data.formats import collate_prompts
    from lit_align.rollout.engines import HFEngine, SamplingParams
    from lit_align.rollout.tools import parse_tool_calls

    tok, model = builtin_tokenizer(), builtin_model("builtin:tiny-tools")
    assert not torch.equal(model.lm_head.weight, builtin_model("builtin:tiny-sft").lm_head.weight)
    rows = arithmetic_rows("prompt_only", "train", size=64, steps=1, max_operand=20, conversational=True, tools=True)
    ids = [tok.apply_chat_template(r["prompt"], tools=r["tools"], add_generation_prompt=True, tokenize=True, return_dict=False)
           for r in rows]
    batch = collate_prompts([{"input_ids": [i], "prompt": r["prompt"]} for i, r in zip(ids, rows)], tok.pad_token_id)
    expressions = [r["prompt"][0]["content"].removeprefix("Compute ").removesuffix(".") for r in rows]
    rates = {}
    for temperature in (0.0, 1.0):
        engine = HFEngine(tok)
        engine.generator = torch.Generator().manual_seed(0)
        out = engine.generate(model, batch.prompt_ids, batch.prompt_mask,
                              SamplingParams(max_completion_length=96, temperature=temperature, num_generations=4))
        texts = tok.batch_decode([c[m.bool()] for c, m in zip(out.completion_ids, out.completion_mask)], skip_special_tokens=True)
        calls = [parse_tool_calls(t).calls for t in texts]
        made = [(c[0], expressions[k // 4]) for k, c in enumerate(calls) if c]
        rates[temperature] = (len(made) / len(texts), sum(c.arguments.get("expression") == e for c, e in made) / max(len(made), 1))
    (greedy_calls, _), (sampled_calls, right) = rates[0.0], rates[1.0]
    assert greedy_calls <= 0.1 and 0.05 <= sampled_calls <= 0.4 and right >= 0.8, rates
