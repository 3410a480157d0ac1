"""KTO and unpaired APO-zero on per-row log-probs (TRL 1.16 ``KTOTrainer._compute_loss``, docs/methods.md §4).

Rows are unpaired: each has a completion ``y`` for a prompt ``x`` and a bool label (desirable or
not). With ``r = logp - ref_logp`` (summed over the completion), ``b = beta`` and ``z`` the KL
reference point, KTO (Ethayarajh et al. 2024, Eq. 7; TRL's sigmoid value function) is::

    desirable:   L = 1 - sigma(b (r - z))        undesirable:   L = 1 - sigma(b (z - r))

``z`` is estimated from mismatched pairs ``(x_i, y_{i-1})`` in the same batch, averaged over the
rows of each device, then over devices (a mean of per-device means), clamped at 0 and detached:
:func:`kl_estimate` is the per-device part, :func:`clamp_kl` the rest. How TRL builds the
mismatched pairs: :func:`rotated_completions`.

The loss is ``nanmean(cat(w_d * L_desirable, w_u * L_undesirable))``: the weights scale the terms
but the mean divides by the row count, not by the total weight. Under DDP each device takes this
mean over its own rows and the gradients are averaged.

Metrics: TRL logs ``rewards/*`` and ``logps/*`` as (all-device nansum) / (all-device row count) of
each class, so :func:`kto_loss` returns local sums and counts (:data:`UNPAIRED_SUM_KEYS`); sum
them over devices and turn them into TRL's values with :func:`unpaired_metric_values`.

Departure from TRL: none in value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import Tensor

KTOLossType = Literal["kto", "apo_zero_unpaired"]

# Per-class sums and row counts; add them over devices before :func:`unpaired_metric_values`.
UNPAIRED_SUM_KEYS: tuple[str, ...] = (
    "rewards/chosen_sum",
    "logps/chosen_sum",
    "count/chosen",
    "rewards/rejected_sum",
    "logps/rejected_sum",
    "count/rejected",
)

T = TypeVar("T")


# --- one function per loss_type: (r_desirable, r_undesirable, z, beta) -> per-row losses ---


def _kto(
    chosen_logratios: Tensor, rejected_logratios: Tensor, kl: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024, Eq. 7): 1 - sigma(b (r_c - z)), 1 - sigma(b (z - r_r))."""
    chosen = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
    rejected = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    return chosen, rejected


def _apo_zero_unpaired(
    chosen_logratios: Tensor, rejected_logratios: Tensor, kl: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7), unpaired: 1 - sigma(b r_c), sigma(b r_r); no KL term."""
    return 1 - torch.sigmoid(beta * chosen_logratios), torch.sigmoid(beta * rejected_logratios)


KTO_LOSSES: dict[str, Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]] = {
    "kto": _kto,
    "apo_zero_unpaired": _apo_zero_unpaired,
}
# Loss types that need the mismatched KL pass (TRL: ``calculate_KL``).
KL_LOSS_TYPES: frozenset[str] = frozenset({"kto"})


# --- the KL reference point z ---


def kl_estimate(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """This device's ``mean_i (log pi(y'_i|x_i) - log pi_ref(y'_i|x_i))`` over its ``(B,)`` mismatched rows, detached.

    All rows count, desirable or not. Combine devices with :func:`clamp_kl`.
    """
    return (kl_logps - ref_kl_logps).mean().detach()  # ()


def clamp_kl(device_means: Tensor) -> Tensor:
    """KTO's ``z``: the mean of the per-device :func:`kl_estimate` values, clamped at 0, detached.

    Pass the gathered ``(world,)`` means, or the scalar ``all_reduce_sum(mean) / world_size``: TRL
    averages the per-device means (``gather_for_metrics(kl).mean()``), not all mismatched rows.
    """
    return device_means.detach().mean().clamp(min=0)  # ()


def rotated_completions(items: Sequence[T], block_size: int) -> list[T]:
    """TRL's mismatched KL completions: in each consecutive block of ``block_size`` rows, row ``i``
    gets row ``i-1``'s completion and the block's first row its last's, ``[y_n, y_1, ..., y_{n-1}]``.

    TRL does this once at data-preparation time (``datasets.map(batched=True,
    batch_size=per_device_train_batch_size)`` over the tokenized, filtered dataset, eval sets
    included), and the sequential sampler keeps each block in one device batch. The last block may
    be shorter; a block of one row pairs the row with its own completion.
    ``rotated_completions(range(n), b)`` gives the source row of each KL completion.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}")
    out: list[T] = []
    for start in range(0, len(items), block_size):
        block = list(items[start : start + block_size])
        out.extend(block[-1:] + block[:-1])
    return out


# --- the loss ---


@dataclass(frozen=True)
class KTOLossConfig:
    """KTO's loss settings under TRL's names, checked once when built (``KTO`` builds it from its
    arguments)."""

    loss_type: KTOLossType = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.loss_type not in KTO_LOSSES:
            raise ValueError(f"unknown KTO loss_type {self.loss_type!r}: expected one of {list(KTO_LOSSES)}")

    @property
    def needs_kl(self) -> bool:
        """Whether the loss reads the KL estimate ``z`` (the KL completions are then collated)."""
        return self.loss_type in KL_LOSS_TYPES


def kto_loss(
    logps: Tensor, ref_logps: Tensor, labels: Tensor, kl: Tensor | None = None, *, cfg: KTOLossConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO-family loss ``nanmean(cat(w_d L_c, w_u L_r))`` on this device's rows, and its metric sums.

    ``logps``/``ref_logps`` ``(B,)``: policy/reference log-probs summed over each completion;
    ``labels`` ``(B,)`` bool, True for desirable; ``kl`` ``()``: ``z`` from :func:`clamp_kl`
    (required by ``kto``, ignored by ``apo_zero_unpaired``). The loss is NaN when ``B == 0``.

    Metrics (detached): ``kl`` (the ``z`` used, 0 for ``apo_zero_unpaired``, already global: do
    not sum it) and the :data:`UNPAIRED_SUM_KEYS` of this device: ``rewards/*_sum`` =
    nansum(b r), ``logps/*_sum`` = nansum(logp), ``count/*`` = rows (NaN rows included).
    """
    loss_type, beta = cfg.loss_type, cfg.beta
    if cfg.needs_kl and kl is None:
        raise ValueError(f"loss_type {loss_type!r} needs the KL estimate `kl` (see clamp_kl)")
    labels = labels.to(device=logps.device, dtype=torch.bool)
    logratios = logps - ref_logps  # (B,) r
    if kl is None:
        kl = torch.zeros((), dtype=logps.dtype, device=logps.device)
    chosen_losses, rejected_losses = KTO_LOSSES[loss_type](logratios[labels], logratios[~labels], kl, beta)
    losses = torch.cat((cfg.desirable_weight * chosen_losses, cfg.undesirable_weight * rejected_losses))  # (B,)
    loss = losses.nanmean()

    metrics = unpaired_sums(beta * logratios.detach(), logps.detach(), labels)
    metrics["kl"] = kl.detach() if cfg.needs_kl else torch.zeros_like(kl)
    return loss, metrics


def unpaired_sums(rewards: Tensor, logps: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """The :data:`UNPAIRED_SUM_KEYS` of one device: per-class nansums of ``rewards``/``logps`` ``(B,)``
    and row counts (float), split by the bool ``labels`` ``(B,)``."""
    chosen, rejected = labels, ~labels
    count_dtype = torch.promote_types(rewards.dtype, torch.float32)  # bf16 cannot count past 256
    return {
        "rewards/chosen_sum": rewards[chosen].nansum(),
        "logps/chosen_sum": logps[chosen].nansum(),
        "count/chosen": chosen.sum().to(count_dtype),
        "rewards/rejected_sum": rewards[rejected].nansum(),
        "logps/rejected_sum": logps[rejected].nansum(),
        "count/rejected": rejected.sum().to(count_dtype),
    }


def unpaired_metric_values(sums: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """TRL's ``rewards/chosen``, ``logps/chosen``, ``rewards/rejected``, ``logps/rejected``,
    ``rewards/margins`` from the :data:`UNPAIRED_SUM_KEYS` summed over devices.

    As TRL, a class with no rows in the (global) batch is left out, and so is ``rewards/margins``
    unless both classes have rows (TRL appends nothing for that step).
    """
    out: dict[str, Tensor] = {}
    for side in ("chosen", "rejected"):
        count = sums[f"count/{side}"]
        if count > 0:
            out[f"rewards/{side}"] = sums[f"rewards/{side}_sum"] / count
            out[f"logps/{side}"] = sums[f"logps/{side}_sum"] / count
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


# --- configuration check ---


def check_kto_weights(
    num_desirable: int, num_undesirable: int, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> str | None:
    """TRL's warning when the class weights fall outside the range of Eq. 8 of the KTO paper, else None.

    Eq. 8 asks ``w_d n_d / (w_u n_u)`` in ``[1, 4/3]``; TRL accepts the configuration if EITHER
    ``w_d`` lies in ``[n_u w_u / n_d, 1.33 n_u w_u / n_d]`` or ``w_u`` in ``[n_d w_d / n_u / 1.33,
    n_d w_d / n_u]`` (bounds rounded to 2 decimals). Counts are over the train set; as TRL,
    ``n_d`` is at least 1 and ``n_u = max(total - n_d, 1)``, and equal counts never warn.
    """
    total = num_desirable + num_undesirable
    n_d = max(num_desirable, 1)
    n_u = max(total - n_d, 1)
    if n_d == n_u:
        return None
    des_low = round((n_u * undesirable_weight / n_d) * 1, 2)
    des_high = round((n_u * undesirable_weight / n_d) * 1.33, 2)
    und_low = round((n_d * desirable_weight / n_u) / 1.33, 2)
    und_high = round((n_d * desirable_weight / n_u) / 1, 2)
    if des_low <= desirable_weight <= des_high or und_low <= undesirable_weight <= und_high:
        return None
    return (
        "You have different amounts of desirable/positive and undesirable/negative examples but the "
        "weights on the desirable and undesirable losses don't seem to be in an ideal range. Based "
        f"on your data, we recommend EITHER "
        f"desirable_weight in [{des_low}, {des_high}] or "
        f"undesirable_weight in [{und_low}, {und_high}] (but NOT BOTH). "
        "See the documentation on how to optimally set these weights."
    )
