"""What every method shares: building the policy, optimizers, token-count bookkeeping, logging.

A method subclasses :class:`AlignModule`, sets ``default_lr`` (TRL's default learning
rate for it) and writes ``training_step``/``validation_step`` from ``ops`` and ``losses``.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lit_align.data.base import DataRequirements
from lit_align.methods.distributed import Distributed
from lit_align.methods.moe import RouterAuxLoss
from lit_align.methods.safeguards import Safeguards
from lit_align.models.compile import compile_layers
from lit_align.models.loading import (
    ModelInit,
    apply_peft,
    customise_tokenizer,
    fit_model_to_tokenizer,
    load_causal_lm,
    load_processor,
    load_tokenizer,
    processor_tokenizer,
    tokenizer_pad_id,
)
from lit_align.models.onednn import use_onednn_linear
from lit_align.ops.onednn import onednn_available
from lit_align.optim import LinearWarmupDecay, default_adamw


class AlignModule(Safeguards, Distributed, RouterAuxLoss, L.LightningModule):
    """Base class of the lit-align methods (not used directly)."""

    default_lr: ClassVar[float] = 1e-6
    disable_dropout_default: ClassVar[bool] = True  # TRL: True for DPO/KTO/Reward/CPO/ORPO/OnlineDPO/GKD
    peft_task_type: ClassVar[str] = "CAUSAL_LM"
    # Frozen models loaded from their own path (reference, teacher): kept out of checkpoints.
    frozen_submodules: ClassVar[tuple[str, ...]] = ()
    add_bos_to_prompt: ClassVar[bool] = False  # TRL's CPO/ORPO put the tokenizer's BOS before every prompt

    def __init__(
        self,
        model_name_or_path: str = "builtin:tiny",
        dtype: str = "float32",
        attn_implementation: str | None = None,
        model_init_kwargs: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        chat_template_path: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        peft: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        torch_compile: bool = False,
        onednn_linear: bool = False,
        activation_offloading: bool = False,
        router_aux_loss_coef: float | None = None,
        disable_dropout: bool | None = None,
        chunk_size: int = 1024,
        nonfinite: Literal["error", "skip"] = "error",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        """
        Args:
            model_name_or_path: The policy: a Hub id, a local Hugging Face model directory, or an
                embedded model (``builtin:tiny``). Its tokenizer is the data's tokenizer.
            dtype: Weights dtype: ``float32`` (TRL's default), ``bfloat16``, ``float16`` or ``auto``.
            attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2``... (None: transformers' default).
            model_init_kwargs: ``from_pretrained``'s keyword arguments for the policy and, as TRL, the
                reference, reward and value models: ``revision``, ``subfolder``, ``gguf_file`` (a GGUF
                file in the model directory, de-quantised; the tokenizer comes from it too),
                ``quantization_config`` (``BitsAndBytesConfig`` fields such as ``{load_in_4bit: true}``;
                CUDA only; with ``peft`` this is QLoRA), ... ``dtype`` and ``attn_implementation`` here
                are the arguments above. ``device_map`` is refused: the Trainer places the model.
            trust_remote_code: Run the model's own code from its repository (TRL's field).
            chat_template_path: The chat template to train with: a ``.jinja`` file, or a tokenizer whose
                template, special tokens and EOS are copied (embeddings grow to hold new tokens).
            eos_token: The token that ends completions (a token of the vocabulary), mirrored into the
                model's and generation configs. The data uses the module's tokenizer with both applied.
            pad_token: The token that pads batches (a token of the vocabulary; None: the tokenizer's own,
                or its EOS when it has none), mirrored into the model's configs (TRL's, deprecated there).
            peft: Adapters: ``peft.LoraConfig`` fields (for example ``{r: 16, lora_alpha: 32}``; DoRA with
                ``use_dora: true``, rsLoRA with ``use_rslora: true``), or another PEFT method as
                ``{class_path: peft.IA3Config, init_args: {...}}`` (LoHa, LoKr, IA3, ...), or None to train
                every weight. The policy with its adapters off is the reference where one is needed.
            gradient_checkpointing: Recompute activations in backward (less memory, about 30% slower).
            torch_compile: Compile each transformer layer of the policy, and of a frozen reference or teacher,
                with ``torch.compile`` (TRL's field; regional, ``lit_align.models.compile``): fused elementwise
                ops, fewer activations kept.
                The first steps pay the compilation; generation runs the layers eagerly.
            onednn_linear: On a CPU in fp32, run the linear layers of the policy (and of a frozen reference
                or teacher), and the chunked LM head's products, on oneDNN instead of MKL
                (``lit_align.models.onednn``): on some CPUs (AMD EPYC in ``benchmarks/README.md``) a faster
                product, the same fp32 arithmetic up to rounding. Other devices, dtypes and autocast are
                unaffected.
            activation_offloading: Keep the activations saved for backward in CPU memory (pinned on
                CUDA) instead of the accelerator's, as TRL's; the step's math is unchanged.
            router_aux_loss_coef: Weight of a Mixture-of-Experts model's load-balancing loss added to
                the training loss (``train/aux_loss``). None: the model config's own, as TRL; 0: off.
            disable_dropout: Set every dropout probability of the policy to 0 (None: the method's TRL
                default, on for preference methods, off for SFT/GRPO/RLOO).
            chunk_size: Tokens per block of the chunked LM-head log-prob op (memory is ``chunk_size x vocab``).
            nonfinite: A training loss or gradient that is NaN or inf: ``error`` stops the run at that step
                saying where; ``skip`` drops that optimizer step (no update from the batch, on every
                device) with a warning, counted in ``train/skipped_steps``. A reward function or a data
                value that is not finite is a bug and always an error.
            optimizer: Optimizer factory; default AdamW at the method's TRL learning rate, no weight decay,
                fused where torch has the kernel (TRL's ``adamw_torch_fused``; ``lit_align.optim.default_adamw``).
            lr_scheduler: Scheduler factory, stepped every optimizer step; default constant.
                ``lit_align.optim.LinearWarmupDecay`` is TRL's default linear decay.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model_name_or_path = model_name_or_path
        self.model_init = ModelInit.from_arguments(model_init_kwargs, dtype, attn_implementation, trust_remote_code)
        self.dtype_name = self.model_init.dtype
        self.chat_template_path = chat_template_path
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.attn_implementation = self.model_init.attn_implementation
        self.peft = peft
        self.gradient_checkpointing = gradient_checkpointing
        self.torch_compile = torch_compile
        if onednn_linear and not onednn_available():
            raise ValueError("onednn_linear=True: this torch build has no oneDNN (torch.backends.mkldnn); "
                             "set onednn_linear: false")
        self.onednn_linear = onednn_linear
        self.activation_offloading = activation_offloading
        self.router_aux_loss_coef = router_aux_loss_coef
        self.disable_dropout = self.disable_dropout_default if disable_dropout is None else disable_dropout
        self.chunk_size = chunk_size
        if nonfinite not in ("error", "skip"):
            raise ValueError(f"nonfinite={nonfinite!r}: expected 'error' or 'skip'")
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._nonfinite_loss = False
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.model: torch.nn.Module | None = None
        self._tokenizer = None
        self._processor: Any = False  # not loaded yet (None: a text-only model)
        self.num_tokens_seen = 0
        self.strict_loading = not self.frozen_submodules  # checkpoints hold no frozen weights
        self.sharded_submodules: list[str] = []  # the FSDP2-sharded children (configure_model under ModelParallelStrategy)

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is None:  # Lightning may call it more than once
            self.model = self.build_policy()
            self.build_other_models()
        if self.processor is not None:
            self.allow_unused_vision_parameters()
        if self.device_mesh is not None and not self.sharded_submodules:  # ModelParallelStrategy: FSDP2
            self.shard(self.device_mesh)
        models = [m for m in (self.model, *(getattr(self, name, None) for name in self.frozen_submodules))
                  if isinstance(m, torch.nn.Module)]  # the reference or teacher too: its forward is in the step
        if self.onednn_linear:
            for model in models:
                use_onednn_linear(model)
        if self.torch_compile:  # after sharding, as FSDP2 asks; compiling twice only compiles again
            for model in models:
                compile_layers(model)

    def on_fit_start(self) -> None:
        """Lightning warns when modules are in eval mode as training starts; a frozen reference, teacher or
        reward model is in eval mode on purpose. The warning is silenced for exactly that count (one more
        eval module anywhere, and it shows)."""
        super().on_fit_start()
        frozen = [getattr(self, name, None) for name in self.frozen_submodules]
        in_eval = sum(not m.training for model in frozen if isinstance(model, torch.nn.Module) for m in model.modules())
        if in_eval and in_eval == sum(not m.training for m in self.modules()):
            warnings.filterwarnings("ignore", message=rf"Found {in_eval} module\(s\) in eval mode at the start of training")

    def allow_unused_vision_parameters(self) -> None:
        """A VLM reads its vision tower's features at one layer (LLaVA: ``vision_feature_layer``), so the
        layers and norm past it get no gradient, and a batch without images leaves the whole tower out.
        DDP then needs ``find_unused_parameters``, which the Hugging Face Trainer turns on by default for
        such models; under Lightning's DDP strategy this does the same, unless the strategy says otherwise.
        Called before the strategy wraps the model."""
        from lightning.pytorch.strategies import DDPStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DDPStrategy):
            strategy._ddp_kwargs.setdefault("find_unused_parameters", True)

    def shard(self, mesh) -> None:
        """Shard the policy and the other models over ``mesh`` with FSDP2 (``lit_align.ops.sharding``):
        Lightning's ``ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1)``,
        on GPUs or CPUs (gloo)."""
        from lit_align.ops.sharding import shard_module

        self.sharded_submodules = shard_module(self, mesh)

    def build_other_models(self) -> None:
        """The models besides the policy (a reference, a teacher, a critic), built once after it."""

    def load_model(self) -> torch.nn.Module:
        """The trained network before LoRA (a causal LM; reward models override it)."""
        return load_causal_lm(self.model_name_or_path, self.dtype_name, self.attn_implementation, **self.model_init.kwargs)

    def build_policy(self) -> torch.nn.Module:
        model = self.fit_to_tokenizer(self.load_model())
        self.enable_router_aux_loss(model)
        if self.disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if self.peft is not None:
            if self.model_init.quantized:  # QLoRA: norms in fp32, inputs that carry gradients into the adapters
                from peft import prepare_model_for_kbit_training

                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=self.gradient_checkpointing)
            elif self.gradient_checkpointing:
                model.enable_input_require_grads()
            model = apply_peft(model, self.peft, self.peft_task_type)
        return model.train()  # from_pretrained returns eval mode; dropout is the model's own choice

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            processor = self.loaded_processor()  # a VLM's tokenizer is its processor's: loaded once
            tokenizer = (processor_tokenizer(processor) if processor is not None
                         else load_tokenizer(self.model_name_or_path, **self.model_init.tokenizer_kwargs))
            self._tokenizer = customise_tokenizer(tokenizer, self.chat_template_path, self.eos_token, self.pad_token)
            if processor is not None:
                processor.tokenizer = self._tokenizer  # one tokenizer: customised, shared with the data
        return self._tokenizer

    @property
    def processor(self) -> Any:
        """A vision-language policy's processor (its image processor and tokenizer), None for a text model."""
        processor = self.loaded_processor()
        if processor is not None:
            self.tokenizer  # noqa: B018 -- the processor holds the customised tokenizer
        return processor

    def loaded_processor(self) -> Any:
        """The policy's processor as loaded (None for a text model), loaded once."""
        if self._processor is False:
            self._processor = load_processor(self.model_name_or_path, **self.model_init.tokenizer_kwargs)
        return self._processor

    @functools.cached_property
    def image_tokens(self) -> Any:
        """How the processor turns images into tokens (:class:`lit_align.data.vision.ImageTokens`); VLMs only."""
        from lit_align.data.vision import ImageTokens

        if self.processor is None:
            raise ValueError(f"{self.model_name_or_path} is a text-only model: it reads no images")
        return ImageTokens(self.processor)

    def fit_to_tokenizer(self, model: torch.nn.Module) -> torch.nn.Module:
        """A model loaded from the policy's path, fitted to a customised tokenizer (new tokens, EOS)."""
        if self.chat_template_path or self.eos_token or self.pad_token:
            fit_model_to_tokenizer(model, self.tokenizer)
        return model

    @property
    def pad_token_id(self) -> int:
        return tokenizer_pad_id(self.tokenizer)

    # -- data ----------------------------------------------------------------------------------
    def data_requirements(self) -> DataRequirements:
        """What this method asks of its data; a lit-align DataModule receives it when a fit sets it up."""
        return DataRequirements(tokenizer_name_or_path=self.model_name_or_path, tokenizer=self.tokenizer,
                                add_bos_to_prompt=self.add_bos_to_prompt, processor=self.processor)

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        make = self.optimizer or functools.partial(default_adamw, lr=self.default_lr)
        optimizer = make(params)
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        if isinstance(scheduler, LinearWarmupDecay) and scheduler.total_steps is None:
            scheduler.set_total_steps(int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- steps -------------------------------------------------------------------------------
    def shared_step(self, batch: Any, stage: str) -> Tensor:
        """The loss of one batch, its metrics logged under ``<stage>/``; each method defines it."""
        raise TypeError(f"{type(self).__name__} does not define shared_step")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        with self.activation_context():
            return self.with_router_aux_loss(self.shared_step(batch, "train"))

    def activation_context(self) -> contextlib.AbstractContextManager:
        """Where the forward of a training step keeps what backward needs (``activation_offloading``)."""
        if self.activation_offloading:
            return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
        return contextlib.nullcontext()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, "test")

    # -- logging -----------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, Tensor | float], stage: str, batch_size: int) -> None:
        """Log ``metrics`` under ``<stage>/<TRL name>``. Values are already global (reduced over
        devices) so training logs need no sync; validation averages over batches per epoch."""
        train = stage == "train"
        for name, value in metrics.items():
            self.log(
                f"{stage}/{name}",
                value,
                on_step=train,
                on_epoch=not train,
                prog_bar=name == "loss",
                batch_size=batch_size,
                sync_dist=False,
            )

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        state = super().state_dict(*args, **kwargs)
        skip = tuple(kwargs.get("prefix", "") + name + "." for name in self.frozen_submodules)
        return {k: v for k, v in state.items() if not k.startswith(skip)} if skip else state
