"""Regenerate ``builtin:tiny-sft``, the shipped warm start of the online configs.

``python -m lit_align.tiny_sft`` runs the recipe ``models/assets/tiny-sft.yaml`` through
``lit-align fit`` (one torch thread, in a temporary directory) and writes the trained weights to
``models/assets/tiny-sft.safetensors`` (float32, about 0.5 MB). The config of the model is
``builtin:tiny``'s, so only the weights are stored.

Training on another CPU gives other weights of the same quality (floating-point reduction order
differs between kernels); shipping the file makes every machine start the online methods from the
same model, so no config depends on another having run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "models" / "assets"
RECIPE = ASSETS / "tiny-sft.yaml"
WEIGHTS = ASSETS / "tiny-sft.safetensors"


def regenerate(out: Path = WEIGHTS, overrides: list[str] = ()) -> Path:
    """Train the recipe (with CLI ``overrides`` such as ``--trainer.max_steps=3``) and save its weights to ``out``."""
    import torch
    from safetensors.torch import load_file, save_file

    from lit_align.cli import build_cli

    torch.set_num_threads(1)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            build_cli(["fit", f"--config={RECIPE}", "--trainer.enable_progress_bar=false", *overrides])
        finally:
            os.chdir(cwd)
        state = load_file(str(Path(tmp) / "runs/tiny-sft/hf_model/model.safetensors"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata={"recipe": RECIPE.name})
    out.chmod(0o644)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="where to write the weights (default: the package's)")
    print(f"wrote {regenerate(parser.parse_args().out)}")


if __name__ == "__main__":
    main()
