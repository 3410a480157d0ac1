"""Reference-free preference losses: CPO (+SimPO, AlphaPO) and ORPO (TRL 1.16 ``trl.experimental``,
docs/methods.md §8-9).

Inputs are per-pair *summed* completion log-probs ``(E,)`` and completion lengths ``(E,)`` (target
tokens); the functions average them per token where TRL does: CPO for ``ipo``/``simpo``/``alphapo``,
ORPO always (TRL's ``get_batch_logps(average_log_prob=...)``, a plain ``sum / len``, no clamp).

The NLL term is a scalar the caller passes, because the two trainers average different tokens:

- CPO: token mean of ``-log p`` over the *completion* tokens of the chosen sequences of the batch
  (``CrossEntropyLoss`` on ``chosen_labels``, prompt masked). It equals
  ``-chosen_logps.sum() / chosen_len.sum()``, used when ``chosen_nll`` is None.
- ORPO: token mean over *all* tokens of the chosen sequences, prompt included (every attended
  token but the first), so it cannot be derived from completion log-probs.

Departure from TRL: none in value. TRL's ``CPOConfig`` maps ``loss_type="alphapo"`` to ``simpo``
with ``cpo_alpha=0``; ``cpo_loss`` does the same (the AlphaPO reward shape is still ``alpha``,
default 0, so ``alphapo`` alone is SimPO without the NLL term).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

CPOLossType = Literal["sigmoid", "hinge", "ipo", "simpo", "alphapo"]


def _smoothed_sigmoid(logits: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    """CPO paper Eq. 3 with conservative label smoothing: -(1-eps) ls(b z) - eps ls(-b z)."""
    return (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    )


def _simpo(logits: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    """SimPO (Meng et al. 2024, Eq. 6): the sigmoid loss on z - gamma/b (z on per-token log-probs)."""
    return _smoothed_sigmoid(logits - gamma / beta, beta, label_smoothing, gamma)


def _hinge(logits: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    """SLiC-style hinge: relu(1 - b z) (label_smoothing ignored, TRL warns)."""
    return torch.relu(1 - beta * logits)


def _ipo(logits: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17) on per-token log-probs: (z - 1/(2b))^2."""
    return (logits - 1 / (2 * beta)) ** 2


CPO_LOSSES: dict[str, Callable[[Tensor, float, float, float], Tensor]] = {
    "sigmoid": _smoothed_sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "simpo": _simpo,
}
AVERAGED_CPO_LOSSES = frozenset({"ipo", "simpo"})  # TRL averages the log-probs per token for these


def alphapo_reward(logps: Tensor, alpha: float) -> Tensor:
    """AlphaPO (Gupta et al. 2025) reward shape r = (1 - p^(-alpha)) / alpha, p = exp(logps); alpha=0: logps."""
    if alpha == 0.0:
        return logps
    return (1 - torch.exp(logps).pow(-alpha)) / alpha


def _reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
    }


@dataclass(frozen=True)
class CPOLossConfig:
    """CPO's loss settings under TRL's names, checked once when built (``CPO`` builds it from its
    arguments). ``alphapo`` is TRL's shorthand for SimPO without the NLL term on AlphaPO-shaped
    rewards: it is stored as ``simpo`` with ``cpo_alpha = 0``."""

    loss_type: CPOLossType = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type == "alphapo":  # CPOConfig.__post_init__ sugar
            object.__setattr__(self, "loss_type", "simpo")
            object.__setattr__(self, "cpo_alpha", 0.0)
        if self.loss_type not in CPO_LOSSES:
            raise ValueError(f"unknown CPO loss_type {self.loss_type!r}: expected one of {[*CPO_LOSSES, 'alphapo']}")


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
    chosen_nll: Tensor | None = None,
    *,
    cfg: CPOLossConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CPO loss ``mean_i L(i) + cpo_alpha * NLL_chosen`` and TRL's metrics (detached batch means).

    ``chosen_logps``/``rejected_logps`` ``(E,)`` are summed over the completion; ``chosen_len``/
    ``rejected_len`` ``(E,)`` count its target tokens; ``chosen_nll`` ``()`` is the chosen completion
    token-mean NLL (see the module docstring). Metrics: ``rewards/*`` are ``beta`` times the
    (averaged for ipo/simpo, AlphaPO-shaped if ``alpha``) log-probs, ``logps/*`` those log-probs
    before shaping, ``nll_loss`` the NLL (0 when ``cpo_alpha == 0``).
    """
    loss_type, beta, cpo_alpha, alpha = cfg.loss_type, cfg.beta, cfg.cpo_alpha, cfg.alpha
    if chosen_nll is None:
        chosen_nll = -chosen_logps.sum() / chosen_len.sum()  # token mean over the chosen completions
    if loss_type in AVERAGED_CPO_LOSSES:
        chosen_logps, rejected_logps = chosen_logps / chosen_len, rejected_logps / rejected_len  # (E,)
    chosen_rewards = alphapo_reward(chosen_logps, alpha)  # (E,)
    rejected_rewards = alphapo_reward(rejected_logps, alpha)
    losses = CPO_LOSSES[loss_type](chosen_rewards - rejected_rewards, beta, cfg.label_smoothing, cfg.simpo_gamma)  # (E,)

    # TRL skips the NLL forward entirely when its weight is 0 and logs nll_loss = 0
    nll = torch.zeros((), dtype=losses.dtype, device=losses.device) if cpo_alpha == 0 else chosen_nll
    loss = losses.mean() + cpo_alpha * nll

    metrics = _reward_metrics(beta * chosen_rewards.detach(), beta * rejected_rewards.detach())
    metrics["logps/chosen"] = chosen_logps.detach().mean()
    metrics["logps/rejected"] = rejected_logps.detach().mean()
    metrics["nll_loss"] = nll.detach()
    return loss, metrics


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, branching at -log 2 to avoid cancellation (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
    chosen_nll: Tensor,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO loss ``NLL_chosen - beta * mean_i log sigma(log_odds_i)`` (Hong et al. 2024, Eq. 6-7).

    ``chosen_logps``/``rejected_logps`` ``(E,)`` are summed over the completion and averaged here by
    ``chosen_len``/``rejected_len``; ``chosen_nll`` ``()`` is the token-mean NLL over the chosen
    sequences *including the prompt*. ``beta`` is the paper's lambda. With ``a = mean log p``,
    ``log_odds = (a_c - a_r) - (log(1 - e^{a_c}) - log(1 - e^{a_r}))``, computed in fp32.
    Metrics: ``rewards/*`` = beta * a, ``logps/*`` = a, ``nll_loss``, ``log_odds_ratio`` =
    mean log sigma(log_odds), ``log_odds_chosen`` = mean log_odds.
    """
    chosen_avg, rejected_avg = chosen_logps / chosen_len, rejected_logps / rejected_len  # (E,)
    chosen32, rejected32 = chosen_avg.float(), rejected_avg.float()
    log_odds = (chosen32 - rejected32) - (log1mexp(chosen32) - log1mexp(rejected32))  # (E,)
    ratio = F.logsigmoid(log_odds)  # (E,)
    loss = chosen_nll - (beta * ratio).mean()

    metrics = _reward_metrics(beta * chosen32.detach(), beta * rejected32.detach())
    metrics["logps/chosen"] = chosen_avg.detach().mean()
    metrics["logps/rejected"] = rejected_avg.detach().mean()
    metrics["nll_loss"] = chosen_nll.detach()
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return loss, metrics
