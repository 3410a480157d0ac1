"""BCO: binary classifier optimisation (Jung et al. 2024) on unpaired rows, as TRL 0.29.1
``trl.experimental.bco`` (removed from TRL in 1.x; docs/methods.md §12).

With ``r = b (logp - ref_logp)`` the implicit reward of a row (summed over its completion) and
``delta`` the running mean of all rewards seen in training (:class:`RunningMoments`)::

    desirable:   L = -log sigma(r - delta)         undesirable:   L = -w(x) log sigma(-(r - delta))

``w(x) = 1`` unless the underlying-distribution-matching (UDM) weights are used: a classifier of
prompt embeddings estimates ``p = P(desirable | x)`` and ``w = clamp(p / (1 - p), min, max)``
(:func:`fit_density_classifier`, :func:`density_ratio_weights`). The loss is the ``nanmean`` of the
per-row terms on each device.

Order of a training step (TRL): rewards of the device's rows -> update the running moments with
the batch moments of all devices' rewards (:func:`batch_moments`) -> ``delta = running.mean``
(post-update) -> :func:`bco_loss`. Evaluation does not update. ``delta`` is checkpointed with the
moments (TRL: ``running.json``).

Departures from TRL 0.29.1:

- UDM uses :func:`fit_density_classifier`, a torch L-BFGS fit of the same objective as sklearn's
  ``LogisticRegression(class_weight="balanced")`` (L2, ``C=1``, unpenalised intercept), so sklearn
  and joblib are not needed; probabilities agree with sklearn's to the solver tolerance.
- TRL drops from the UDM weights any row whose embedding *mean* equals the embedding tokenizer's
  pad id (its cross-device padding test), which misaligns weights and rows; here every undesirable
  row gets its weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_align.losses.kto import UNPAIRED_SUM_KEYS, unpaired_metric_values, unpaired_sums

__all__ = [
    "UNPAIRED_SUM_KEYS",
    "DensityClassifier",
    "RunningMoments",
    "batch_moments",
    "bco_loss",
    "bco_rewards",
    "density_ratio_weights",
    "fit_density_classifier",
    "unpaired_metric_values",
]


class RunningMoments:
    """Running mean and variance of a stream, merged one batch at a time (Chan et al. 1979), with
    TRL 0.29.1's arithmetic: batch moments in fp32, ``mean`` accumulated as a Python float, the
    stream starting from ``mean=0, var=1, count=1e-24`` (so the prior has no weight), ``var`` the
    biased (population) variance of the stream and ``std`` its unbiased (n - 1) standard deviation.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0, var: float = 1.0, count: float = 1e-24) -> None:
        self.mean, self.std, self.var, self.count = mean, std, var, count

    @torch.no_grad()
    def update(self, batch_mean: Tensor | float, batch_var: Tensor | float, batch_count: float) -> None:
        """Merge a batch given by its mean, *biased* variance and size (global over devices:
        :func:`batch_moments`)."""
        xs_mean = torch.as_tensor(batch_mean).float()
        xs_var = torch.as_tensor(batch_var).float()
        xs_count = float(batch_count)
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count  # the batch's sum of squared deviations
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count  # Chan et al. merge
        self.mean += (delta * xs_count / tot_count).item()
        new_var = (old_sum + new_sum) / tot_count
        self.std = (new_var * tot_count / (tot_count - 1)).float().sqrt().item()
        self.var = new_var.item()
        self.count = tot_count

    def update_from_sums(self, total: Tensor | float, total_sq: Tensor | float, count: float) -> None:
        """Merge a batch given by ``sum x``, ``sum x^2`` and its size (each all-reduced with SUM).

        One collective instead of :func:`batch_moments`' two; the variance ``E[x^2] - E[x]^2`` is
        formed in fp64, so it equals the two-pass value to about fp32 precision, not bit for bit.
        """
        count = float(count)
        mean = torch.as_tensor(total, dtype=torch.float64) / count
        var = (torch.as_tensor(total_sq, dtype=torch.float64) / count - mean**2).clamp(min=0)
        self.update(mean, var, count)

    def state_dict(self) -> dict[str, float]:
        """The four numbers TRL saves as ``running.json``."""
        return {"mean": self.mean, "std": self.std, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.std = float(state["mean"]), float(state["std"])
        self.var, self.count = float(state["var"]), float(state["count"])

    def __repr__(self) -> str:
        return f"RunningMoments(mean={self.mean}, std={self.std}, var={self.var}, count={self.count})"


@torch.no_grad()
def batch_moments(
    xs: Tensor, reduce_sum: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor, Tensor, float]:
    """``(mean, biased var, count)`` of ``xs`` (any shape) over all devices, as TRL 0.29.1 computes them.

    ``reduce_sum`` all-reduces a tensor with SUM across devices (None: one device,
    ``torch.var_mean(unbiased=False)``). Distributed, TRL makes two passes: ``[sum, count]`` is
    reduced first, then the squared deviations from the global mean.
    """
    if reduce_sum is None:
        var, mean = torch.var_mean(xs, unbiased=False)
        return mean, var, float(xs.numel())
    sum_and_count = reduce_sum(
        torch.stack([xs.sum().float(), xs.new_tensor(xs.numel(), dtype=torch.float32)])
    )
    total, count = sum_and_count
    mean = total / count
    var = reduce_sum(torch.sum((xs - mean) ** 2)) / count
    return mean, var, count.item()


def bco_rewards(logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """Implicit rewards ``b (logp - ref_logp)`` ``(B,)``, what the running moments track."""
    return beta * (logps - ref_logps)


def bco_loss(
    logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    delta: Tensor | float,
    *,
    beta: float = 0.1,
    udm_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """BCO loss ``nanmean(cat(L_desirable, w * L_undesirable))`` on this device's rows, and its metric sums.

    ``logps``/``ref_logps`` ``(B,)``: log-probs summed over each completion; ``labels`` ``(B,)``
    bool, True for desirable; ``delta`` ``()``: the running reward mean *after* this step's
    update (``RunningMoments.mean``); ``udm_weights`` ``(B,)``: density-ratio weights of the rows
    (:func:`density_ratio_weights`), only the undesirable rows' values are used.

    Metrics (detached): ``delta`` and this device's :data:`UNPAIRED_SUM_KEYS` (sum them over
    devices, then :func:`unpaired_metric_values`).
    """
    labels = labels.to(device=logps.device, dtype=torch.bool)
    rewards = bco_rewards(logps, ref_logps, beta)  # (B,) r
    delta = torch.as_tensor(delta, device=rewards.device)  # fp32, as TRL
    # a logistic classifier with logit r - delta: desirable rows are class 1, undesirable class 0
    chosen_losses = -F.logsigmoid(rewards[labels] - delta)
    rejected_losses = -F.logsigmoid(-(rewards[~labels] - delta))
    if udm_weights is not None:  # importance weight P(x|desirable) / P(x|undesirable) of the prompt
        rejected_losses = udm_weights.to(rejected_losses.device)[~labels] * rejected_losses
    loss = torch.cat((chosen_losses, rejected_losses)).nanmean()

    metrics = unpaired_sums(rewards.detach(), logps.detach(), labels)
    metrics["delta"] = delta.detach()
    return loss, metrics


# --- underlying distribution matching (UDM) ---


def density_ratio_weights(
    prob_desirable: Tensor, min_density_ratio: float = 0.5, max_density_ratio: float = 10.0
) -> Tensor:
    """``clamp(p / (1 - p + 1e-8), min, max)``: the density ratio ``P(x|desirable) / P(x|undesirable)``
    of a balanced classifier's ``p = P(desirable | x)`` (any shape), clamped as TRL."""
    return (prob_desirable / (1 - prob_desirable + 1e-8)).clamp(min=min_density_ratio, max=max_density_ratio)


@dataclass
class DensityClassifier:
    """A fitted logistic model ``P(desirable | e) = sigma(e w + b)``; call it on embeddings ``(n, D)``."""

    coef: Tensor  # (D,) fp64
    intercept: Tensor  # () fp64

    def __call__(self, embeddings: Tensor) -> Tensor:
        """``(n,)`` probabilities of being desirable, in the embeddings' dtype and device."""
        logits = (
            embeddings.detach().to(device=self.coef.device, dtype=torch.float64) @ self.coef + self.intercept
        )
        return torch.sigmoid(logits).to(device=embeddings.device, dtype=embeddings.dtype)

    def state_dict(self) -> dict[str, Tensor]:
        return {"coef": self.coef, "intercept": self.intercept}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> DensityClassifier:
        return cls(coef=state["coef"], intercept=state["intercept"])


def fit_density_classifier(
    embeddings_desirable: Tensor,
    embeddings_undesirable: Tensor,
    *,
    C: float = 1.0,
    max_iter: int = 500,
    tol: float = 1e-12,
) -> DensityClassifier:
    """Fit ``P(desirable | e)`` on prompt embeddings ``(n_d, D)`` and ``(n_u, D)``.

    The objective is sklearn's ``LogisticRegression(class_weight="balanced", C=C)`` (TRL's UDM
    classifier): sample weights ``s_i = n / (2 n_class(i))``, minimise
    ``sum_i s_i softplus(-y_i (e_i w + b)) + ||w||^2 / (2 C)`` (intercept unpenalised), solved in
    fp64 with L-BFGS to a tighter tolerance than sklearn's. TRL fits on up to
    ``prompt_sample_size`` prompts of each class, sampled with replacement, gathered from all devices.
    """
    if embeddings_desirable.size(0) == 0 or embeddings_undesirable.size(0) == 0:
        raise ValueError("fit_density_classifier needs at least one desirable and one undesirable embedding")
    x = torch.cat((embeddings_desirable, embeddings_undesirable)).detach().cpu().to(torch.float64)  # (n, D)
    n_d, n_u = embeddings_desirable.size(0), embeddings_undesirable.size(0)
    n = n_d + n_u
    y = torch.cat((x.new_ones(n_d), -x.new_ones(n_u)))  # (n,) +1 desirable, -1 undesirable
    weights = torch.cat((x.new_full((n_d,), n / (2 * n_d)), x.new_full((n_u,), n / (2 * n_u))))  # balanced

    scale = weights.sum()  # divide the objective by n (same optimum) so L-BFGS sees O(1) values
    params = torch.zeros(x.size(1) + 1, dtype=torch.float64, requires_grad=True)  # [w, b]
    optimizer = torch.optim.LBFGS(
        [params],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-15,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        w, b = params[:-1], params[-1]
        margins = y * (x @ w + b)  # (n,)
        objective = ((weights * F.softplus(-margins)).sum() + (w @ w) / (2 * C)) / scale
        objective.backward()
        return objective

    optimizer.step(closure)
    params = params.detach()
    return DensityClassifier(coef=params[:-1].clone(), intercept=params[-1].clone())
