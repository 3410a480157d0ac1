"""lit-align's default optimizer: AdamW with torch's fused kernel where it applies (TRL's ``adamw_torch_fused``)."""

import pytest
import torch
from torch import nn

from lit_align import SFT
from lit_align.optim import default_adamw


def _params(seed: int) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=g)) for shape in ((7, 5), (5,), (3, 4, 2))]


def test_default_adamw_is_fused_on_cpu_and_steps_as_the_loop():
    fused_params, loop_params = _params(0), _params(0)
    fused = default_adamw(fused_params, lr=1e-2)
    loop = torch.optim.AdamW(loop_params, lr=1e-2, weight_decay=0.0, foreach=False)
    assert fused.defaults["fused"] is True and fused.defaults["weight_decay"] == 0.0
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in fused_params]
        for params, opt in ((fused_params, fused), (loop_params, loop)):
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            opt.step()
    for a, b in zip(fused_params, loop_params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)  # the same AdamW, another rounding order


@pytest.mark.parametrize("case", ["integer", "mixed devices", "empty"])
def test_default_adamw_keeps_torchs_choice_where_fused_does_not_apply(case):
    params = {
        "integer": [nn.Parameter(torch.ones(3)), torch.ones(3, dtype=torch.long)],
        "mixed devices": [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3, device="meta"))],
        "empty": [],
    }[case]
    if case == "empty":
        with pytest.raises(ValueError, match="empty parameter list"):
            default_adamw(params, lr=1e-3)
        return
    assert default_adamw(params, lr=1e-3).defaults["fused"] is None


def test_modules_train_with_the_fused_default_unless_given_an_optimizer():
    module = SFT("builtin:tiny")
    module.configure_model()  # the model is built here (Lightning calls it before configure_optimizers)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True and optimizer.defaults["lr"] == 2e-5  # TRL's SFT learning rate
    module = SFT("builtin:tiny", optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    module.configure_model()
    assert isinstance(module.configure_optimizers(), torch.optim.SGD)
