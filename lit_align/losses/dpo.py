"""DPO and its 14 siblings on per-pair log-probs (TRL 1.16 ``DPOTrainer._compute_loss``, docs/methods.md §3).

Everything here is a pure function of per-pair (or per-target-token) tensors; the forward pass,
LD-DPO/WPO token bookkeeping and cross-device reduction belong to the caller. Pairs are indexed
``i < E``; sequences ``s < 2E`` with ``s < E`` chosen and ``s >= E`` rejected (as in
:class:`~lit_align.ops.packing.SequenceBatch`).

Notation: ``cl = logp_c - ref_c`` and ``rl = logp_r - ref_r`` are the log-ratios (summed over the
completion); ``cs = f(cl)``, ``rs = f(rl)`` their f-divergence scores (f-DPO, Wang et al. 2023);
``d = cs - rs``; ``b = beta``; ``eps = label_smoothing``. The total is ``sum_k w_k * mean_i L_k(i)``.

Where this departs from TRL 1.16:

- WPO multiplies each per-pair loss out of place. TRL does ``per_sequence_loss *= w``, which raises
  for ``sft`` (an in-place write into an expanded tensor) and breaks ``hinge``'s backward (relu's
  saved output is modified). Here both work; every other value is TRL's.
- ``check_dpo_config`` raises upfront for an unknown ``loss_type``/``f_divergence_type`` (TRL: at the
  first step) and for ``ld_alpha`` outside [0, 1] (TRL documents the range but does not check it);
  ``use_weighting`` with ``aot*`` raises ``ValueError`` (TRL raises a not-implemented error); the robust
  range is a warning, as in TRL.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DPOLossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]

# The f-DPO reparameterisation leaves a beta*log Z(x) term that only cancels in the chosen - rejected
# score difference, so TRL allows a non-default f-divergence only for the losses built on it.
F_DIVERGENCE_LOSS_TYPES: frozenset[str] = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)


@dataclass
class PairLogps:
    """Per-pair log-probs, all ``(E,)`` unless said.

    ``chosen_len``/``rejected_len`` are used by ``ipo`` and ``sigmoid_norm`` only (clamped at 1).
    TRL counts ``completion_mask`` there, not the shifted target mask: the two agree unless a
    completion starts at position 0 (empty prompt), where TRL's count is one more.
    """

    chosen: Tensor  # policy log p(y_c|x) summed over the completion (LD-DPO weighted if any)
    rejected: Tensor
    ref_chosen: Tensor  # reference, same weighting
    ref_rejected: Tensor
    chosen_len: Tensor  # completion tokens, float or long
    rejected_len: Tensor
    # () mean of the *unweighted* policy log-probs over all chosen target tokens of the (local) batch;
    # needed by loss_type "sft" only (TRL: -per_token_logps[chosen][mask].mean(), a token mean)
    chosen_token_logps_mean: Tensor | None = None
    wpo_weight: Tensor | None = None  # (E,) w_c * w_r from wpo_weights, no grad


@dataclass
class PairTerms:
    """What a DPO loss variant reads: the pair log-probs, their log-ratios and scores, the hyper-params."""

    pairs: PairLogps
    chosen_logratios: Tensor  # (E,) cl
    rejected_logratios: Tensor  # (E,) rl
    chosen_scores: Tensor  # (E,) cs = f(cl)
    rejected_scores: Tensor  # (E,) rs = f(rl)
    cfg: DPOLossConfig

    @property
    def beta(self) -> float:
        return self.cfg.beta

    @property
    def label_smoothing(self) -> float:
        return self.cfg.label_smoothing

    @property
    def discopop_tau(self) -> float:
        return self.cfg.discopop_tau

    @property
    def delta(self) -> Tensor:
        return self.chosen_scores - self.rejected_scores  # (E,) d = cs - rs

    def normalized_delta(self) -> Tensor:
        """Per-token score difference ``cs/len_c - rs/len_r`` (lengths clamped at 1)."""
        chosen = self.chosen_scores / self.pairs.chosen_len.clamp(min=1.0)
        rejected = self.rejected_scores / self.pairs.rejected_len.clamp(min=1.0)
        return chosen - rejected


# --- f-divergence score maps s(u) of a log-ratio u = log(pi/pi_ref) (f-DPO: f'(t) at t = e^u) ---


def _reverse_kl(u: Tensor, alpha: float) -> Tensor:
    return u  # f'(t) = log t + 1 (the constant cancels in d)


def _forward_kl(u: Tensor, alpha: float) -> Tensor:
    return 1 - torch.exp(-u)  # f'(t) = 1 - 1/t


def _js_divergence(u: Tensor, alpha: float) -> Tensor:
    return math.log(2) + F.logsigmoid(u)  # f'(t) = log(2t / (t + 1))


def _alpha_divergence(u: Tensor, alpha: float) -> Tensor:
    if abs(alpha - 1.0) < 1e-6:  # limit alpha -> 1 is reverse KL
        return u
    t = (alpha - 1.0) * u  # f'(t) = (t^(alpha-1) - 1) / (alpha - 1)
    dtype = t.dtype
    low = dtype in (torch.float16, torch.bfloat16)
    # TRL clamps the exponent so exp stays representable once cast back (fp16 overflows above e^11)
    t = torch.clamp(t.float() if low else t, max=11.0 if dtype == torch.float16 else 80.0)
    return (torch.exp(t) - 1.0).to(dtype) * (1.0 / (alpha - 1.0))


F_DIVERGENCES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "reverse_kl": _reverse_kl,
    "forward_kl": _forward_kl,
    "js_divergence": _js_divergence,
    "alpha_divergence": _alpha_divergence,
}


def f_divergence_scores(
    logratios: Tensor, f_divergence_type: str = "reverse_kl", alpha: float = 0.5
) -> Tensor:
    """Score ``s(u)`` of each log-ratio ``u`` (any shape) under ``f_divergence_type``."""
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(
            f"unknown f_divergence_type {f_divergence_type!r}: expected one of {list(F_DIVERGENCES)}"
        )
    return F_DIVERGENCES[f_divergence_type](logratios, alpha)


# --- one function per loss_type: PairTerms -> per-pair loss (E,) ---


def sigmoid_loss(t: PairTerms) -> Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7): -log sigma(b d)."""
    return -F.logsigmoid(t.beta * t.delta)


def hinge_loss(t: PairTerms) -> Tensor:
    """SLiC (Zhao et al. 2023): relu(1 - b d)."""
    return torch.relu(1 - t.beta * t.delta)


def ipo_loss(t: PairTerms) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17, beta = tau) on per-token scores: (cs/len_c - rs/len_r - 1/(2b))^2."""
    return (t.normalized_delta() - 1 / (2 * t.beta)) ** 2


def exo_pair_loss(t: PairTerms) -> Tensor:
    """EXO (Ji et al. 2024, Eq. 16), K=2: KL(q || p) with q = softmax(b [cs, rs]), p = [1-eps, eps]."""
    logits = t.beta * t.delta
    q_w, log_q_w = torch.sigmoid(logits), F.logsigmoid(logits)
    q_l, log_q_l = torch.sigmoid(-logits), F.logsigmoid(-logits)
    eps = torch.tensor(t.label_smoothing, device=logits.device)  # fp32, as TRL
    return q_w * (log_q_w - torch.log1p(-eps)) + q_l * (log_q_l - torch.log(eps))


def nca_pair_loss(t: PairTerms) -> Tensor:
    """NCA (Chen et al. 2024): -log sigma(b cl) - 0.5 log sigma(-b cl) - 0.5 log sigma(-b rl)."""
    chosen, rejected = t.beta * t.chosen_logratios, t.beta * t.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def robust_loss(t: PairTerms) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, Eq. 8), eps = flip rate: (-(1-eps) ls(bd) + eps ls(-bd)) / (1-2eps)."""
    eps = t.label_smoothing
    clean = -(1 - eps) * F.logsigmoid(t.beta * t.delta)
    flipped = -eps * F.logsigmoid(-t.beta * t.delta)
    return (clean - flipped) / (1 - 2 * eps)


def bco_pair_loss(t: PairTerms) -> Tensor:
    """BCO on pairs (Jung et al. 2024), without the running reward shift: -ls(b cl) - ls(-b rl)."""
    return -F.logsigmoid(t.beta * t.chosen_logratios) - F.logsigmoid(-(t.beta * t.rejected_logratios))


def sppo_hard_loss(t: PairTerms) -> Tensor:
    """SPPO (Wu et al. 2024, Eq. 4.7) with hard P in {0, 1}: (cl - 1/(2b))^2 + (rl + 1/(2b))^2."""
    return (t.chosen_logratios - 0.5 / t.beta) ** 2 + (t.rejected_logratios + 0.5 / t.beta) ** 2


def _smoothed_sigmoid(delta: Tensor, beta: float, eps: float) -> Tensor:
    return -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps


def aot_loss(t: PairTerms) -> Tensor:
    """AOT paired (Melnyk et al. 2024): Delta = sort_batch(logp_c - logp_r) - sort_batch(ref_c - ref_r)."""
    p = t.pairs
    logratios, _ = torch.sort(p.chosen - p.rejected, dim=0)
    ref_logratios, _ = torch.sort(p.ref_chosen - p.ref_rejected, dim=0)
    return _smoothed_sigmoid(logratios - ref_logratios, t.beta, t.label_smoothing)


def aot_unpaired_loss(t: PairTerms) -> Tensor:
    """AOT unpaired: Delta = sort_batch(cl) - sort_batch(rl)."""
    chosen, _ = torch.sort(t.chosen_logratios, dim=0)
    rejected, _ = torch.sort(t.rejected_logratios, dim=0)
    return _smoothed_sigmoid(chosen - rejected, t.beta, t.label_smoothing)


def apo_zero_loss(t: PairTerms) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): (1 - sigma(b cl)) + sigma(b rl)."""
    return (1 - torch.sigmoid(t.beta * t.chosen_logratios)) + torch.sigmoid(t.beta * t.rejected_logratios)


def apo_down_loss(t: PairTerms) -> Tensor:
    """APO-down (Eq. 8): sigma(b cl) + (1 - sigma(b (cl - rl)))."""
    cl, rl = t.chosen_logratios, t.rejected_logratios
    return torch.sigmoid(t.beta * cl) + (1 - torch.sigmoid(t.beta * (cl - rl)))


def discopop_loss(t: PairTerms) -> Tensor:
    """DiscoPOP (Chris Lu et al. 2024, Eq. 5): z = b d, m = sigma(z/tau); (1-m)(-ls(z)) + m e^{-z}."""
    logits = t.delta * t.beta
    modulation = torch.sigmoid(logits / t.discopop_tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


def sft_loss(t: PairTerms) -> Tensor:
    """NLL of the chosen completions as a token mean over the batch (RPO's term), broadcast to (E,)."""
    if t.pairs.chosen_token_logps_mean is None:
        raise ValueError("loss_type 'sft' needs PairLogps.chosen_token_logps_mean")
    return (-t.pairs.chosen_token_logps_mean).expand(t.pairs.chosen.size(0))


def sigmoid_norm_loss(t: PairTerms) -> Tensor:
    """Length-normalised DPO: -log sigma(b (cs/len_c - rs/len_r))."""
    return -F.logsigmoid(t.beta * t.normalized_delta())


DPO_LOSSES: dict[str, Callable[[PairTerms], Tensor]] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "robust": robust_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sft": sft_loss,
    "sigmoid_norm": sigmoid_norm_loss,
}


def _as_list(loss_type: str | Sequence[str]) -> list[str]:
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def check_dpo_config(
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    label_smoothing: float = 0.0,
    use_weighting: bool = False,
    ld_alpha: float | None = None,
) -> None:
    """Raise ``ValueError`` for a DPO configuration TRL 1.16 rejects (``DPOConfig``/``DPOTrainer.__init__``)."""
    types = _as_list(loss_type)
    unknown = [name for name in types if name not in DPO_LOSSES]
    if not types or unknown:
        raise ValueError(f"unknown DPO loss_type {unknown or types!r}: expected one of {list(DPO_LOSSES)}")
    if loss_weights is not None and len(loss_weights) != len(types):
        raise ValueError(
            f"loss_weights must have the same length as loss_type: got {len(loss_weights)} weights "
            f"for {len(types)} loss types {types}"
        )
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(
            f"unknown f_divergence_type {f_divergence_type!r}: expected one of {list(F_DIVERGENCES)}"
        )
    if f_divergence_type != "reverse_kl" and not set(types) <= F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} is only supported for the loss types "
            f"{sorted(F_DIVERGENCE_LOSS_TYPES)}; got {types}. Use f_divergence_type='reverse_kl' with these losses."
        )
    if use_weighting and {"aot", "aot_unpaired"} & set(types):
        raise ValueError(
            "use_weighting (WPO) is not supported with 'aot' or 'aot_unpaired': those losses sort the "
            "batch, which would misalign the per-pair weights"
        )
    if "exo_pair" in types and label_smoothing == 0.0:
        raise ValueError(
            "label_smoothing must be greater than 0.0 for the 'exo_pair' loss; the EXO paper recommends 1e-3"
        )
    if "robust" in types and not 0.0 <= label_smoothing < 0.5:
        warnings.warn(  # TRL only warns
            f"label_smoothing should lie in [0.0, 0.5) for the 'robust' loss; got {label_smoothing}",
            stacklevel=2,
        )
    if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0.0, 1.0] (1.0: no LD-DPO weighting); got {ld_alpha}")


@dataclass(frozen=True)
class DPOLossConfig:
    """DPO's loss settings under TRL's names, checked once when built (:func:`check_dpo_config`;
    ``DPO`` builds it from its arguments). ``loss_type`` is one name or several combined with
    ``loss_weights`` (kept as tuples)."""

    loss_type: str | Sequence[str] = "sigmoid"
    loss_weights: Sequence[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: FDivergence = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    use_weighting: bool = False  # WPO (the weights themselves come with the pairs)
    ld_alpha: float | None = None  # LD-DPO (applied to the log-probs before the loss)

    def __post_init__(self) -> None:
        object.__setattr__(self, "loss_type", tuple(_as_list(self.loss_type)))
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(self.loss_weights))
        check_dpo_config(self.loss_type, self.loss_weights, self.f_divergence_type, self.label_smoothing,
                         self.use_weighting, self.ld_alpha)


def dpo_loss(pairs: PairLogps, cfg: DPOLossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """The DPO-family loss ``sum_k w_k mean_i L_k(i)`` (times WPO weights if ``pairs.wpo_weight``).

    Returns the scalar loss and TRL's metrics, detached local-batch means: ``rewards/chosen`` =
    mean(b cl), ``rewards/rejected`` = mean(b rl) (log-ratios, not f-divergence scores),
    ``rewards/accuracies`` = mean(b cl > b rl), ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.
    """
    types, beta = cfg.loss_type, cfg.beta
    weights = list(cfg.loss_weights) if cfg.loss_weights is not None else [1.0] * len(types)

    chosen_logratios = pairs.chosen - pairs.ref_chosen  # (E,) cl
    rejected_logratios = pairs.rejected - pairs.ref_rejected  # (E,) rl
    terms = PairTerms(
        pairs=pairs,
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_scores=f_divergence_scores(chosen_logratios, cfg.f_divergence_type, cfg.f_alpha_divergence_coef),
        rejected_scores=f_divergence_scores(rejected_logratios, cfg.f_divergence_type, cfg.f_alpha_divergence_coef),
        cfg=cfg,
    )
    loss = 0.0
    for name, weight in zip(types, weights):
        per_pair = DPO_LOSSES[name](terms)  # (E,)
        if pairs.wpo_weight is not None:
            per_pair = per_pair * pairs.wpo_weight  # WPO (Zhou et al. 2024, Eq. 2)
        loss = loss + per_pair.mean() * weight

    chosen_rewards = beta * chosen_logratios.detach()  # (E,)
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": pairs.chosen.detach().mean(),
        "logps/rejected": pairs.rejected.detach().mean(),
    }
    return loss, metrics


# --- per-target-token helpers (flat tokens with their sequence index, as ops.forward.target_logprobs) ---
