"""TRL's ``router_aux_loss_coef``: the load-balancing loss of Mixture-of-Experts models, added to
the training loss of every method (``train/aux_loss``)."""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn


class RouterLogits:
    """A forward hook on the decoder that keeps the load-balancing loss of each forward run with
    gradients (the policy's training forwards, not the no-grad reference or rollout ones)."""

    def __init__(self, model: nn.Module) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.loss_func = getattr(sys.modules[type(base).__module__], "load_balancing_loss_func", None)
        if self.loss_func is None:
            raise ValueError(f"{type(base).__name__} returns router logits but its module has no load_balancing_loss_func")
        config = base.config.get_text_config()
        self.num_experts = getattr(base, "num_experts", None) or config.num_local_experts
        self.top_k = getattr(base, "num_experts_per_tok", None) or config.num_experts_per_tok
        self.losses: list[Tensor] = []

    def __call__(self, module: nn.Module, args, output) -> None:
        if torch.is_grad_enabled() and getattr(output, "router_logits", None) is not None:
            self.losses.append(self.loss_func(output.router_logits, self.num_experts, self.top_k, None))

    def pop(self) -> Tensor | None:
        """The mean loss of the forwards since the last call (None if there were none)."""
        losses, self.losses = self.losses, []
        return torch.stack(losses).mean() if losses else None


class RouterAuxLoss:
    """Mixed into :class:`~lit_align.methods.base.AlignModule`: reads ``router_aux_loss_coef``
    (None: the model config's own, as TRL; 0 turns it off)."""

    router_logits: RouterLogits | None = None

    def enable_router_aux_loss(self, model: nn.Module) -> None:
        """On a model that returns router logits, record them when the coefficient is not 0; a
        coefficient for a model without experts is an error."""
        config = model.config.get_text_config()
        coef = self.router_aux_loss_coef
        if coef and not hasattr(config, "output_router_logits"):
            raise ValueError(
                f"router_aux_loss_coef={coef} but {type(model).__name__} is not a Mixture-of-Experts model that "
                "returns router logits: there is no auxiliary loss to weigh"
            )
        self.aux_loss_coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if coef is None else float(coef)
        if not hasattr(config, "output_router_logits"):
            return
        config.output_router_logits = self.aux_loss_coef != 0.0
        if config.output_router_logits:
            self.router_logits = RouterLogits(model)
            model.get_decoder().register_forward_hook(self.router_logits)

    def with_router_aux_loss(self, loss: Tensor, stage: str = "train") -> Tensor:
        """``loss + router_aux_loss_coef * aux_loss`` over the step's forwards, logging ``aux_loss``
        (a per-device mean: DDP's gradient average makes it the mean over devices, as TRL's)."""
        aux = self.router_logits.pop() if self.router_logits is not None else None
        if aux is None:
            return loss
        self.log_metrics({"aux_loss": self.global_sum(aux.detach()) / self.world_size}, stage, 1)
        return loss + self.aux_loss_coef * aux
