"""TRL's model_init_kwargs (and teacher_model_init_kwargs, trust_remote_code): from_pretrained's
keyword arguments reach the policy, its tokenizer (the data's too), the reference copy, the
teacher and reward models; what cannot apply is refused by name before anything loads."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_align import DPO, GKD, PreferenceDataModule
from lit_align.models.builtin import builtin_model, builtin_tokenizer
from lit_align.models.loading import ModelInit

PAIRS = "builtin:arithmetic?size=16&steps=1&max_operand=4"


def test_model_init_kwargs_fold_dtype_and_attention_and_refuse_device_map():
    init = ModelInit.from_arguments({"torch_dtype": "torch.bfloat16", "attn_implementation": "eager", "revision": "v1"},
                                    trust_remote_code=True)
    assert (init.dtype, init.attn_implementation) == ("bfloat16", "eager")
    assert dict(init.kwargs) == {"revision": "v1", "trust_remote_code": True}
    assert init.tokenizer_kwargs == {"revision": "v1", "trust_remote_code": True}
    with pytest.raises(ValueError, match=r"model_init_kwargs.dtype='float16' disagrees with dtype='bfloat16'"):
        ModelInit.from_arguments({"dtype": "float16"}, dtype="bfloat16")
    with pytest.raises(ValueError, match="model_init_kwargs.device_map is not used: Lightning places the model"):
        DPO(model_init_kwargs={"device_map": "auto"})
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        DPO(model_init_kwargs={"dtype": "float8"})


def test_builtin_models_refuse_hub_arguments():
    module = DPO(model_init_kwargs={"revision": "main"})
    with pytest.raises(ValueError, match=r"builtin:tiny is embedded in lit-align: model_init_kwargs \['revision'\]"):
        module.configure_model()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU message")
def test_quantization_says_it_needs_cuda():
    with pytest.raises(ValueError, match="quantization_config: bitsandbytes 4/8-bit weights .* need a CUDA GPU"):
        DPO(model_init_kwargs={"quantization_config": {"load_in_4bit": True}}, peft={"r": 4})


@pytest.fixture(scope="module")
def nested_model(tmp_path_factory):
    """A model directory whose files sit in a subfolder, as Hub repositories with several variants do."""
    root = tmp_path_factory.mktemp("model")
    builtin_model("builtin:tiny").save_pretrained(root / "variant")
    builtin_tokenizer("builtin:tiny").save_pretrained(root / "variant")
    return str(root)


def test_the_policy_its_tokenizer_the_data_and_the_reference_read_the_kwargs(nested_model):
    """DPO from a directory whose model is in a subfolder: without ``subfolder`` nothing is found;
    with it the policy, the reference copy and the data's tokenizer all load and a step runs."""
    with pytest.raises((OSError, ValueError)):
        DPO(model_name_or_path=nested_model).configure_model()
    module = DPO(model_name_or_path=nested_model, model_init_kwargs={"subfolder": "variant"})
    data = PreferenceDataModule(PAIRS, batch_size=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    assert module.ref_model is not None and data.tokenizer.vocab_size == builtin_tokenizer("builtin:tiny").vocab_size
    assert trainer.global_step == 1


def test_the_teacher_has_its_own_kwargs(nested_model):
    module = GKD(teacher_model_name_or_path=nested_model, teacher_model_init_kwargs={"subfolder": "variant"})
    module.configure_model()
    assert module.teacher is not None and not module.teacher.training
    assert module.teacher_init.dtype == "float32"  # the policy's, unless the teacher's kwargs say otherwise
    assert GKD(teacher_model_name_or_path=nested_model, teacher_model_init_kwargs={"dtype": "bfloat16"}).teacher_init.dtype == "bfloat16"


# --------------------------------------------------------------------------- chat_template_path, eos_token

TEMPLATE = "{%- for m in messages -%}{{- '[' + m['role'] + '] ' + m['content'] + '<|im_end|>' -}}{%- endfor -%}"


def test_a_jinja_template_is_the_one_the_data_is_tokenized_with(tmp_path):
    from lit_align import SFT, LanguageModelingDataModule

    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    module = SFT(chat_template_path=str(tmp_path / "chat.jinja"))
    assert module.tokenizer.chat_template == TEMPLATE
    data = LanguageModelingDataModule("builtin:arithmetic?size=16&steps=1&max_operand=4&conversational=true", batch_size=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    assert data.tokenizer is module.tokenizer
    row = data.datasets["train"][0]["input_ids"][0]
    assert module.tokenizer.decode(row).startswith("[user] ")
    with pytest.raises(FileNotFoundError, match="no such template file"):
        _ = SFT(chat_template_path=str(tmp_path / "missing.jinja")).tokenizer


def test_a_cloned_template_brings_its_tokens_and_eos_and_the_models_grow(tmp_path):
    """As TRL's clone_chat_template: the source's template, its special tokens the policy lacks,
    its EOS; the policy's and the reference copy's embeddings grow to a multiple of 64."""
    source = builtin_tokenizer("builtin:tiny")
    source.add_special_tokens({"additional_special_tokens": ["<|tool|>", *(f"<|slot{i}|>" for i in range(4))]})
    source.chat_template = TEMPLATE.replace("<|im_end|>", "<|tool|>")
    source.eos_token = "<|tool|>"
    source.save_pretrained(tmp_path / "source")
    module = DPO(chat_template_path=str(tmp_path / "source"))
    tok = module.tokenizer
    assert "<|tool|>" in tok.get_vocab() and tok.eos_token == "<|tool|>" and len(tok) == 265  # the embedding has 264 rows
    module.configure_model()
    assert module.model.get_input_embeddings().num_embeddings == 320
    assert module.ref_model.get_input_embeddings().num_embeddings == 320
    assert module.model.config.eos_token_id == module.model.generation_config.eos_token_id == tok.eos_token_id


def test_eos_token_must_be_a_token():
    from lit_align import SFT

    module = SFT(eos_token="<|endoftext|>")
    module.configure_model()
    assert module.tokenizer.eos_token == "<|endoftext|>"
    assert module.model.config.eos_token_id == module.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with pytest.raises(ValueError, match=r"eos_token '</s>' is not a token of the tokenizer"):
        _ = SFT(eos_token="</s>").tokenizer


# --------------------------------------------------------------------------- PEFT beyond LoRA, activation offloading


def one_step(module, data, steps=1):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    return trainer


@pytest.mark.parametrize("peft", [
    {"r": 4, "use_dora": True},
    {"r": 4, "use_rslora": True, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["embed_tokens"]},
    {"class_path": "peft.LoHaConfig", "init_args": {"r": 4, "target_modules": "all-linear"}},
    {"class_path": "IA3Config", "init_args": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}},
], ids=["dora", "rslora", "loha", "ia3"])
def test_peft_methods_train_with_the_adapters_off_policy_as_reference(peft, tmp_path):
    """DPO with each PEFT method: no reference copy is loaded (the adapters-off policy is the
    reference), only adapter (and modules_to_save) weights move, and the export merges them."""
    from lit_align import SaveHFModel

    module = DPO(peft=peft, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    export = SaveHFModel(str(tmp_path / "hf"))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[export])
    data = PreferenceDataModule(PAIRS, batch_size=4)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer.fit(module, data)
    assert module.ref_model is None
    moved = {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(p.requires_grad for n, p in module.model.named_parameters() if n in moved)
    assert not any(p.requires_grad for n, p in module.model.named_parameters() if "base_layer" in n)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert not any("lora" in n or "hada" in n or "ia3" in n for n, _ in merged.named_parameters())


def test_prompt_learning_and_bad_peft_settings_are_refused():
    with pytest.raises(ValueError, match="PromptTuningConfig adds virtual tokens in PeftModel.forward"):
        DPO(peft={"class_path": "peft.PromptTuningConfig", "init_args": {"num_virtual_tokens": 4}}).configure_model()
    with pytest.raises(ValueError, match="peft class_path 'peft.NoSuchConfig': cannot import"):
        DPO(peft={"class_path": "peft.NoSuchConfig"}).configure_model()
    with pytest.raises(ValueError, match="invalid peft settings"):
        DPO(peft={"rank": 4}).configure_model()


def test_activation_offloading_keeps_the_step_exact(monkeypatch):
    """The saved activations go through save_on_cpu; loss and gradients are bit-identical."""
    from lit_align import SFT, PromptCompletionDataModule

    entered = []
    real = torch.autograd.graph.save_on_cpu

    def counting(*args, **kwargs):
        entered.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", counting)
    grads = []
    for offload in (False, True):
        torch.manual_seed(0)
        module = SFT(activation_offloading=offload)
        data = PromptCompletionDataModule("builtin:arithmetic?size=16&steps=1&max_operand=4", batch_size=4, shuffle=False)
        data.connect(module.tokenizer)
        data.setup()
        module.configure_model()
        batch = data.collate([data.datasets["train"][i] for i in range(4)])
        with module.activation_context():
            loss = module.shared_step(batch, "val")
        loss.backward()
        grads.append([p.grad.clone() for p in module.model.parameters()])
    assert len(entered) == 1 and entered[0] == {"pin_memory": False}
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# --------------------------------------------------------------------------- router_aux_loss_coef


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM

    tok = builtin_tokenizer("builtin:tiny")
    config = MixtralConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                           router_aux_loss_coef=0.02, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("moe")
    MixtralForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_router_aux_loss_matches_the_models_own_loss(tiny_moe):
    """SFT on a Mixture-of-Experts model adds the config's router_aux_loss_coef times the
    load-balancing loss, as the model's own forward with labels does (TRL's default)."""
    from transformers import AutoModelForCausalLM

    from lit_align import SFT, LanguageModelingDataModule

    module = SFT(model_name_or_path=tiny_moe)
    module.configure_model()
    data = LanguageModelingDataModule("builtin:arithmetic?size=4&steps=1&max_operand=4", batch_size=1)
    data.connect(module.tokenizer)
    data.setup()
    batch = data.collate([data.datasets["train"][0]])
    loss = module.with_router_aux_loss(module.shared_step(batch, "val"))
    theirs = AutoModelForCausalLM.from_pretrained(tiny_moe)(input_ids=batch.input_ids, labels=batch.input_ids, output_router_logits=True)
    torch.testing.assert_close(loss, theirs.loss)
    assert module.aux_loss_coef == 0.02 and module.router_logits.losses == []
    off = SFT(model_name_or_path=tiny_moe, router_aux_loss_coef=0.0)
    off.configure_model()
    assert off.router_logits is None and not off.model.config.output_router_logits
    with pytest.raises(ValueError, match=r"router_aux_loss_coef=0.01 but LlamaForCausalLM is not a Mixture-of-Experts model"):
        SFT(router_aux_loss_coef=0.01).configure_model()


def test_router_aux_loss_is_logged_in_training(tiny_moe):
    from lit_align import DPO

    module = DPO(model_name_or_path=tiny_moe, router_aux_loss_coef=0.1)

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            self.aux = float(trainer.callback_metrics["train/aux_loss"])

    record = Record()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[record])
    trainer.fit(module, PreferenceDataModule(PAIRS, batch_size=4))
    assert record.aux > 0 and module.ref_model.config.output_router_logits is False


def test_kwargs_as_lit_align_loads(monkeypatch):
    """GGUF files become dense models; bitsandbytes weights load onto this process's GPU (TRL's
    get_kbit_device_map), the one place device_map is set."""
    from transformers import BitsAndBytesConfig, GgufConfig

    from lit_align.models.loading import pretrained_kwargs

    gguf = pretrained_kwargs({"gguf_file": "m.gguf"})["quantization_config"]
    assert isinstance(gguf, GgufConfig) and gguf.dequantize
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pretrained_kwargs({"quantization_config": BitsAndBytesConfig(load_in_4bit=True)})["device_map"] == {"": 3}
    assert pretrained_kwargs({"revision": "v1"}) == {"revision": "v1"}
