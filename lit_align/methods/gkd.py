"""Generalized knowledge distillation (TRL ``experimental.gkd.GKDTrainer``, docs/methods.md §11;
Agarwal et al. 2024, "On-policy distillation of language models: learning from self-generated mistakes").

Each training batch, with probability ``lmbda``, has its completions replaced by the student's own
samples (on-policy); otherwise, with ``seq_kd``, by the teacher's samples; otherwise it is used as
is. The loss is the generalized JSD between the student's and the frozen teacher's next-token
distributions over the completion tokens, averaged over all of them (over every device):

    loss = sum_{trained t} JSD_beta(p_student(. | y_<t) || p_teacher(. | y_<t)) / #trained

computed in chunks from hidden states (:func:`lit_align.ops.distill.chunked_generalized_jsd`),
never from ``[B, T, V]`` logits. The trained tokens of a sequence are its last completion span:
the completion of prompt-completion data, the last assistant turn of a conversation (as TRL's
``DataCollatorForChatML``, which trains on the last message); its prompt is everything before.

Departures from TRL: the coin for on-policy batches comes from a generator seeded by the Lightning
seed, the epoch and the batch index (TRL: Python's global ``random``), so it is reproducible and the
same on every DDP rank. As in TRL, ``temperature`` is the sampling temperature only; the divergence
is taken at temperature 1 (``GKDTrainer.compute_loss`` does not pass it on).
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lit_align.methods.base import AlignModule
from lit_align.methods.sampling import Sampling
from lit_align.models.loading import ModelInit
from lit_align.models.reference import frozen_copy
from lit_align.ops.completions import completion_batch, last_completion_run, left_padded_prompts
from lit_align.ops.distill import LMHead, chunked_generalized_jsd, divergence_kind
from lit_align.ops.forward import decoder_hidden, lm_head_params, target_mask
from lit_align.ops.packing import SequenceBatch
from lit_align.rollout.engines import GenerationEngine, HFEngine, SamplingParams

Source = Literal["student", "teacher", "data"]


def check_shared_vocabulary(student: nn.Module, teacher: nn.Module, student_name: str, teacher_name: str) -> None:
    s, t = (m.config.get_text_config().vocab_size for m in (student, teacher))
    if s != t:
        raise ValueError(
            f"teacher {teacher_name!r} has a vocabulary of {t} tokens, student {student_name!r} {s}; GKD "
            "needs a shared tokenizer (it compares full next-token distributions)"
        )


class GKD(Sampling, AlignModule):
    """Distillation of a frozen teacher into the policy, on-policy with probability ``lmbda``."""

    default_lr = 2e-5  # GKDConfig inherits SFTConfig's learning rate
    disable_dropout_default = True
    frozen_submodules = ("teacher",)

    def __init__(
        self,
        *args: Any,
        teacher_model_name_or_path: str | None = None,
        teacher_model_init_kwargs: dict[str, Any] | None = None,
        temperature: float = 0.9,
        lmbda: float = 0.5,
        beta: float = 0.5,
        max_new_tokens: int = 128,
        seq_kd: bool = False,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            teacher_model_name_or_path: The teacher (required): a Hub id, a local Hugging Face model
                directory or ``builtin:...``; loaded frozen with the policy's dtype, kept out of
                checkpoints. It must share the policy's tokenizer; it may be larger.
            teacher_model_init_kwargs: ``from_pretrained``'s keyword arguments for the teacher, as
                ``model_init_kwargs`` for the policy (``dtype`` and ``attn_implementation`` default
                to the policy's).
            temperature: Sampling temperature of the student's (and, with ``seq_kd``, the teacher's)
                completions. As in TRL, the divergence itself is taken at temperature 1.
            lmbda: Probability that a training batch is replaced by the student's own completions
                (0: never, 1: always, fully on-policy).
            beta: Interpolation of the generalized JSD in [0, 1]: 0 is the forward KL(teacher || student),
                1 the reverse KL(student || teacher).
            max_new_tokens: Longest sampled completion, in tokens.
            seq_kd: Sequence-level KD: batches that are not on-policy get the teacher's completions
                instead of the data's.
        """
        super().__init__(*args, **kwargs)
        if not teacher_model_name_or_path:
            raise ValueError(
                "GKD needs a teacher: set teacher_model_name_or_path (a Hub id, a local model directory or "
                "builtin:...) sharing the student's tokenizer"
            )
        divergence_kind(beta)  # checks beta is in [0, 1]
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1] (the probability of an on-policy batch), got {lmbda}")
        self.teacher_model_name_or_path = teacher_model_name_or_path
        self.teacher_init = ModelInit.from_arguments(
            {"dtype": self.dtype_name, "attn_implementation": self.attn_implementation, **(teacher_model_init_kwargs or {})},
            name="teacher_model_init_kwargs",
        )
        self.temperature = temperature
        self.lmbda = lmbda
        self.beta = beta
        self.max_new_tokens = max_new_tokens
        self.seq_kd = seq_kd
        # TRL's generation config: pure sampling (top_k 0, top_p 1) at ``temperature``.
        self.sampling = SamplingParams(max_completion_length=max_new_tokens, temperature=temperature)
        self.teacher: nn.Module | None = None

    def build_other_models(self) -> None:
        super().build_other_models()
        init = self.teacher_init
        self.teacher = frozen_copy(self.teacher_model_name_or_path, init.dtype, init.attn_implementation, **init.kwargs)
        check_shared_vocabulary(self.model, self.teacher, self.model_name_or_path, self.teacher_model_name_or_path)

    def make_engine(self) -> GenerationEngine:
        return HFEngine(self.tokenizer, seed=self.base_seed + self.global_rank)

    @property
    def base_seed(self) -> int:
        return int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by seed_everything (the CLI's seed_everything)

    # -- where a batch's completions come from ------------------------------------------------------
    def batch_source(self, batch_idx: int) -> Source:
        """``student`` with probability ``lmbda``, else ``teacher`` (``seq_kd``) or ``data``; the same
        draw on every rank, from the seed, the epoch and the batch index."""
        key = ((self.base_seed * 1_000_003 + self.current_epoch) * 1_000_003 + batch_idx) % 2**63
        draw = torch.rand((), generator=torch.Generator().manual_seed(key)).item()
        if draw < self.lmbda:
            return "student"
        return "teacher" if self.seq_kd else "data"

    def generate_completions(self, batch: SequenceBatch, model: nn.Module) -> SequenceBatch:
        """The batch's prompts with completions sampled from ``model`` (up to and including EOS)."""
        prompt_ids, prompt_mask = left_padded_prompts(batch, last_completion_run(batch), self.pad_token_id)
        gens = self.sample(model, prompt_ids, prompt_mask, policy=model is self.model)
        return completion_batch(gens.prompt_ids, gens.prompt_mask, gens.completion_ids, gens.completion_mask, self.pad_token_id)

    # -- loss -----------------------------------------------------------------------------------
    def token_divergence(self, batch: SequenceBatch, mask: Tensor) -> Tensor:
        """Generalized JSD at the positions ``mask`` ``(R, T-1)`` whose next token is distilled: ``(n,)``."""
        student = decoder_hidden(self.model, batch)[:, :-1][mask]  # (n, H)
        with torch.no_grad():
            teacher = decoder_hidden(self.teacher, batch)[:, :-1][mask]  # (n, H_t)
        return chunked_generalized_jsd(
            student,
            teacher,
            LMHead(**lm_head_params(self.model)),
            LMHead(**lm_head_params(self.teacher)),
            beta=self.beta,
            chunk_size=self.chunk_size,
        )

    def training_step(self, batch: SequenceBatch, batch_idx: int) -> Tensor:
        source = self.batch_source(batch_idx)
        if source != "data":
            batch = self.generate_completions(batch, self.model if source == "student" else self.teacher)
        with self.activation_context():
            return self.with_router_aux_loss(self.shared_step(batch, "train"))

    def shared_step(self, batch: SequenceBatch, stage: str) -> Tensor:
        if self.teacher is None:
            raise RuntimeError("GKD has no teacher: configure_model() loads it (the Trainer calls it)")
        mask = target_mask(batch, last_completion_run(batch))  # (R, T-1)
        jsd = self.token_divergence(batch, mask)  # (n,)
        loss_sum = jsd.sum()
        local = torch.stack(
            [loss_sum.detach(), mask.sum().float(), torch.tensor(float(batch.num_tokens), device=mask.device)]
        )
        total_loss, n_targets, n_tokens = self.global_sum(local)
        n = n_targets.clamp(min=1)
        loss = self.global_token_mean(loss_sum, n_targets)
        metrics = {"loss": total_loss / n, "num_tokens": self.count_tokens(n_tokens, stage)}
        self.log_metrics(metrics, stage, batch_size=batch.num_examples)
        return loss
