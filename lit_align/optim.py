"""Learning-rate schedules that need the length of the run (filled in by the module)."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR


class LinearWarmupDecay(LambdaLR):
    """Linear warm-up over ``warmup_steps`` (or ``warmup_ratio`` of the run), then linear decay to 0.

    TRL's (transformers') default ``lr_scheduler_type="linear"``. ``total_steps=None`` is
    filled in from ``trainer.estimated_stepping_batches`` when the optimizer is configured.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
        total_steps: int | None = None,
    ) -> None:
        self.warmup_steps = warmup_steps
        self.warmup_ratio = warmup_ratio
        self.total_steps = total_steps
        super().__init__(optimizer, self._factor)

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the run length and reset the current learning rate to this schedule's first value."""
        self.total_steps = total_steps
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self._factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _factor(self, step: int) -> float:
        total = self.total_steps
        if total is None:  # not yet known (first call from the constructor)
            return 1.0
        warmup = self.warmup_steps or int(self.warmup_ratio * total + 0.999999)
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))


FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def default_adamw(params: list[torch.Tensor], lr: float) -> torch.optim.AdamW:
    """lit-align's default optimizer: AdamW at ``lr``, no weight decay, with torch's fused kernel when it applies.

    TRL trains with transformers' ``adamw_torch_fused``. torch's own default for CPU tensors is the
    per-parameter loop, about ten times slower there (SmolLM2-135M on 2 cores: 1.7 s of a 4.8 s SFT step
    against 0.17 s fused, ``benchmarks/bench_real.py --profile``). Fused needs plain floating-point tensors
    on one device type with a fused kernel; sharded (FSDP2 ``DTensor``) or other parameters keep torch's
    default choice. The arithmetic is AdamW's either way; only the rounding order differs."""
    plain = [p for p in params if type(p) in (torch.Tensor, torch.nn.Parameter)]
    fused = (
        bool(params)
        and len(plain) == len(params)
        and all(p.is_floating_point() for p in params)
        and len({p.device.type for p in params}) == 1
        and params[0].device.type in FUSED_DEVICES
    )
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True if fused else None)
