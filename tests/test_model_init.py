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
