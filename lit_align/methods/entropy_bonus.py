"""GRPO's entropy bonus (TRL 1.16's ``entropy_coef``, ``use_adaptive_entropy``,
``entropy_coef_min|max|delta``, ``entropy_target``): ``loss = policy loss - coef * mean entropy``,
the coefficient fixed or moved after every optimizer step by Skywork-OR1's adaptive control
(:class:`~lit_align.losses.policy.AdaptiveEntropy`), whose state is part of the checkpoint."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_align.losses.policy import AdaptiveEntropy, entropy_bonus


class EntropyBonus:
    """Mixin of an online module (before it in the bases); its loss calls :meth:`entropy_term`."""

    def __init__(
        self,
        *args: Any,
        entropy_coef: float = 0.0,
        use_adaptive_entropy: bool = False,
        entropy_coef_min: float = 0.0,
        entropy_coef_max: float = 1.0,
        entropy_coef_delta: float = 0.005,
        entropy_target: float = 0.2,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            entropy_coef: ``loss = policy loss - entropy_coef * mean entropy`` of the loss's tokens, for
                every ``loss_type`` (0: off); the start value of the adaptive one.
            use_adaptive_entropy: After each optimizer step the coefficient moves by ``entropy_coef_delta``,
                up if that step's entropy was <= ``entropy_target``, else down; it applies only then.
            entropy_coef_min: Lower bound of the adaptive coefficient.
            entropy_coef_max: Upper bound of the adaptive coefficient.
            entropy_coef_delta: Step of the adaptive coefficient per optimizer step.
            entropy_target: Target mean entropy per token (nats) of the adaptive control.
        """
        super().__init__(*args, **kwargs)
        self.entropy_control = AdaptiveEntropy(entropy_coef, use_adaptive_entropy, entropy_coef_min, entropy_coef_max,
                                               entropy_coef_delta, entropy_target)

    def entropy_term(self, entropy: Tensor, mask: Tensor, stage: str) -> Tensor:
        """``coef * mean entropy`` over ``mask`` (TRL's bonus; Lightning divides it by the accumulation as
        it does the policy loss); a training step also adds its sums to the adaptive control's window."""
        if stage == "train":
            self.entropy_control.observe(entropy, mask)
        return self.entropy_control.applied * entropy_bonus(entropy, mask)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """At each optimizer step: the adaptive coefficient from the step's entropy over every micro-batch
        and device (TRL: at ``sync_gradients``), and TRL's ``entropy_coef`` metric."""
        super().on_before_optimizer_step(optimizer)
        if self.entropy_control.enabled:
            self.entropy_control.end_step(self.global_sum)
            self.log("train/entropy_coef", self.entropy_control.coef, on_step=True, on_epoch=False, sync_dist=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.entropy_control.adaptive:
            checkpoint["grpo_entropy_control"] = self.entropy_control.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.entropy_control.adaptive and "grpo_entropy_control" in checkpoint:
            self.entropy_control.load_state_dict(checkpoint["grpo_entropy_control"])
