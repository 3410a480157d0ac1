"""TRL's ``generate_during_eval`` (CPO, ORPO): the policy's own completions of validation prompts,
shown next to the metrics."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lit_align.methods.sampling import Sampling
from lit_align.ops.completions import last_completion_run, left_padded_prompts
from lit_align.ops.sharding import full_parameters
from lit_align.rollout.engines import SamplingParams


class GenerateDuringEval(Sampling):
    """At each validation the policy completes the prompts of the first batch (sampling at
    temperature 1, up to the DataModule's ``max_length`` in all, as TRL's ``generate``), logged by
    rank 0 as the W&B table ``game_log`` with TRL's columns ``Prompt`` and ``Policy``."""

    def __init__(self, *args: Any, generate_during_eval: bool = False, **kwargs: Any) -> None:
        """
        Args:
            generate_during_eval: Sample the policy's completions of the first validation batch's
                prompts at each validation and log them to W&B (the table ``game_log``).
        """
        super().__init__(*args, **kwargs)
        self.generate_during_eval = generate_during_eval

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.generate_during_eval and not self.wandb_loggers():
            warnings.warn("generate_during_eval logs its completions to W&B, and the Trainer has no WandbLogger", stacklevel=2)

    def wandb_loggers(self) -> list:
        from lightning.pytorch.loggers import WandbLogger

        return [lg for lg in self.trainer.loggers if isinstance(lg, WandbLogger)]

    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_validation_batch_end(outputs, batch, batch_idx, dataloader_idx)
        trainer = self.trainer
        if not self.generate_during_eval or batch_idx or trainer.sanity_checking:
            return
        with full_parameters(self.model):  # FSDP2: every rank gathers the weights together, rank 0 samples
            if trainer.is_global_zero:
                self.log_eval_samples(batch)

    def log_eval_samples(self, batch: Any) -> None:
        trainer = self.trainer
        loggers = self.wandb_loggers()
        if not loggers:
            return
        e = batch.num_examples  # the chosen sequences; the rejected ones share their prompts
        ids, mask = left_padded_prompts(batch, last_completion_run(batch), self.pad_token_id)
        ids, mask = ids[:e], mask[:e]
        total = getattr(trainer.datamodule, "max_length", None) or 512  # TRL's default max_length
        if total - ids.size(1) < 1:
            return
        with torch.no_grad():
            gens = self.sample(self.model, ids, mask, sampling=SamplingParams(max_completion_length=total - ids.size(1)))
        decode = self.tokenizer.batch_decode
        prompts = decode([row[m.bool()].tolist() for row, m in zip(ids, mask)], skip_special_tokens=True)
        completions = decode([row[m.bool()].tolist() for row, m in zip(gens.completion_ids, gens.completion_mask)],
                             skip_special_tokens=True)
        for logger in loggers:
            logger.log_table(key="game_log", columns=["Prompt", "Policy"], data=[list(pair) for pair in zip(prompts, completions)])
