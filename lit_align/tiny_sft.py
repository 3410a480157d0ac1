"""Regenerate the shipped warm starts: ``builtin:tiny-sft``, ``builtin:tiny-tools`` and ``builtin:tiny-vlm-sft``.

``python -m lit_align.tiny_sft [--model builtin:tiny-tools]`` runs the model's recipe
(``models/assets/<name>.yaml``) through ``lit-align fit`` (one torch thread, in a temporary
directory) and writes the trained weights to ``models/assets/<name>.safetensors`` (float32, about
0.5 MB). The config of the model is ``builtin:tiny``'s (``builtin:tiny-vlm``'s), so only the weights are stored.

Training on another CPU gives other weights of the same quality (floating-point reduction order
differs between kernels); shipping the file makes every machine start the online methods from the
same model, so no config depends on another having run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from lit_align.models.builtin import ASSETS
from lit_align.models.builtin import BUILTIN_WEIGHTS as TEXT_WEIGHTS
from lit_align.models.vlm import VLM_WEIGHTS

BUILTIN_WEIGHTS = {**TEXT_WEIGHTS, **VLM_WEIGHTS}

RECIPE = ASSETS / "tiny-sft.yaml"  # builtin:tiny-sft's
WEIGHTS = BUILTIN_WEIGHTS["builtin:tiny-sft"]


def recipe(name: str) -> Path:
    """The training recipe of a shipped builtin model."""
    if name not in BUILTIN_WEIGHTS:
        raise ValueError(f"{name!r} has no shipped weights; choose one of {', '.join(BUILTIN_WEIGHTS)}")
    return ASSETS / f"{name.removeprefix('builtin:')}.yaml"


def regenerate(out: Path = WEIGHTS, overrides: list[str] = (), name: str = "builtin:tiny-sft") -> Path:
    """Train ``name``'s recipe (with CLI ``overrides`` such as ``--trainer.max_steps=3``) and save its
    weights to ``out``."""
    import torch
    from safetensors.torch import load_file, save_file

    from lit_align.cli import build_cli
    from lit_align.models.loading import load_causal_lm

    path = recipe(name)
    torch.set_num_threads(1)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            build_cli(["fit", f"--config={path}", "--trainer.enable_progress_bar=false", *overrides])
        finally:
            os.chdir(cwd)
        # Each recipe's SaveHFModel writes to runs/<recipe name>/hf_model. A VLM is read back through
        # transformers, whose checkpoints name its weights otherwise than its modules do.
        saved = Path(tmp) / "runs" / path.stem / "hf_model"
        state = load_causal_lm(str(saved)).state_dict() if name in VLM_WEIGHTS else load_file(str(saved / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata={"recipe": path.name})
    out.chmod(0o644)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-sft", choices=list(BUILTIN_WEIGHTS), help="which shipped model")
    parser.add_argument("--out", type=Path, default=None, help="where to write the weights (default: the package's)")
    args = parser.parse_args()
    print(f"wrote {regenerate(args.out or BUILTIN_WEIGHTS[args.model], name=args.model)}")


if __name__ == "__main__":
    main()
