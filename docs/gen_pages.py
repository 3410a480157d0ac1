"""Write the documentation site's pages into build/docs from the README, docs/*.md, the configs
and the docstrings; then `mkdocs build --strict` renders them (mkdocs.yml).

    python docs/gen_pages.py && mkdocs build --strict

Pages: the README (home), one page per method (its README section, its shipped config and recipe,
its arguments from the docstrings), the data formats, the architecture and formulas documents,
and the migration page from TRL: every field TRL 1.16's configs add to `TrainingArguments`, and
where it lives in lit-align (`--check` fails if a field has no entry).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "docs"

# README section title -> (page name, the classes documented on it)
METHOD_PAGES = {
    "SFT": ("sft", ["SFT"]),
    "DPO": ("dpo", ["DPO"]),
    "CPO, SimPO, AlphaPO": ("cpo", ["CPO"]),
    "ORPO": ("orpo", ["ORPO"]),
    "KTO": ("kto", ["KTO"]),
    "BCO": ("bco", ["BCO"]),
    "RewardModel": ("reward", ["RewardModel"]),
    "PRM": ("prm", ["PRM"]),
    "GRPO": ("grpo", ["GRPO"]),
    "RLOO": ("rloo", ["RLOO"]),
    "PPO": ("ppo", ["PPO"]),
    "OnlineDPO": ("online_dpo", ["OnlineDPO"]),
    "NashMD": ("nash_md", ["NashMD"]),
    "XPO": ("xpo", ["XPO"]),
    "GKD": ("gkd", ["GKD"]),
}
GUIDE_PAGES = {  # README sections gathered on their own pages
    "Data formats": ("data", ["LanguageModelingDataModule", "PromptCompletionDataModule", "PreferenceDataModule",
                              "UnpairedPreferenceDataModule", "StepwiseDataModule", "PromptOnlyDataModule"]),
    "Online methods: rollouts, engines, rewards": ("online", ["RolloutCallback"]),
    "Generation server": ("server", ["rollout.server_engine.ServerEngine"]),
    "Tools and environments": ("tools", []),
    "Pairwise judges": ("judges", []),
    "The CLI": ("cli", []),
}

# --------------------------------------------------------------------------- migration from TRL

TRL_CONFIGS = {  # TRL config -> the lit-align module and the DataModules it trains on
    "SFTConfig": ("trl", "SFT", ["LanguageModelingDataModule", "PromptCompletionDataModule"]),
    "DPOConfig": ("trl", "DPO", ["PreferenceDataModule"]),
    "KTOConfig": ("trl", "KTO", ["UnpairedPreferenceDataModule"]),
    "RewardConfig": ("trl", "RewardModel", ["PreferenceDataModule"]),
    "CPOConfig": ("trl.experimental.cpo", "CPO", ["PreferenceDataModule"]),
    "ORPOConfig": ("trl.experimental.orpo", "ORPO", ["PreferenceDataModule"]),
    "GKDConfig": ("trl.experimental.gkd", "GKD", ["LanguageModelingDataModule", "PromptCompletionDataModule"]),
    "OnlineDPOConfig": ("trl.experimental.online_dpo", "OnlineDPO", ["PromptOnlyDataModule"]),
    "RLOOConfig": ("trl", "RLOO", ["PromptOnlyDataModule"]),
    "GRPOConfig": ("trl", "GRPO", ["PromptOnlyDataModule"]),
}
ELSEWHERE = {  # fields lit-align does not take, and why; (config or *, field)
    ("*", "ds3_gather_for_generation"): "not yet: DeepSpeed is the issue \"Scale-out and real-model speed\"",
    ("*", "max_completion_length"): "TRL reads it for encoder-decoder models only; for a causal LM `max_length` bounds "
    "prompt and completion together, as TRL",
    ("*", "is_encoder_decoder"): "not applicable: lit-align trains causal LMs (TRL reads it only for a model made by "
    "`model_init`)",
    ("*", "log_multimodal"): "not yet: vision-language models are the issue \"Vision-language models\"",
    ("GKDConfig", "completion_only_loss"): "not applicable: TRL's GKDTrainer ignores it too (its collator masks the "
    "prompt; the loss is the JSD over the completion tokens)",
    ("GKDConfig", "assistant_only_loss"): "not applicable: TRL's GKDTrainer ignores it too (conversational rows distil "
    "their last assistant turn)",
    ("GKDConfig", "loss_type"): "not applicable: TRL's GKDTrainer ignores it too (its loss is the generalized JSD, "
    "`beta`)",
}


def init_params(cls: type) -> dict[str, str]:
    """Constructor parameters over the class and its bases: name -> the class that declares it."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in klass.__dict__:
            for name, p in inspect.signature(klass.__init__).parameters.items():
                if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    out[name] = klass.__name__
    return out


def migration_rows() -> dict[str, list[tuple[str, str, str]]]:
    """Per TRL config: (field, TRL default, where it lives in lit-align), for every field beyond
    ``TrainingArguments``; a field with no place raises."""
    import importlib

    from transformers import TrainingArguments

    import lit_align

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    tables: dict[str, list[tuple[str, str, str]]] = {}
    missing = []
    for config, (module, method, datamodules) in TRL_CONFIGS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls = getattr(importlib.import_module(module), config)
        on_module = init_params(getattr(lit_align, method))
        on_data = {n: dm for dm in datamodules for n in init_params(getattr(lit_align, dm))}
        rows = []
        for f in dataclasses.fields(cls):
            if f.name in base:
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
            if f.name in on_module:
                where = f"`{method}({f.name}=...)`"
            elif f.name in on_data:
                where = f"`{on_data[f.name]}({f.name}=...)`"
            elif (config, f.name) in ELSEWHERE or ("*", f.name) in ELSEWHERE:
                where = ELSEWHERE.get((config, f.name)) or ELSEWHERE[("*", f.name)]
            else:
                missing.append(f"{config}.{f.name}")
                continue
            rows.append((f.name, repr(default), where))
        tables[config] = rows
    if missing:
        raise SystemExit(f"docs/gen_pages.py: no migration entry for {', '.join(missing)}: add it to ELSEWHERE")
    return tables


def migration_page() -> str:
    tables = migration_rows()
    total = sum(len(r) for r in tables.values())
    same = sum(1 for r in tables.values() for _, _, w in r if w.startswith("`") and "(" in w and "=...)`" in w)
    lines = [
        "# Migrating from TRL",
        "",
        "Every field TRL 1.16's configs add to `transformers.TrainingArguments`, and where it lives in lit-align. "
        f"{same} of {total} are accepted under TRL's name by the module or its DataModule; the rest say where their "
        "job is done or why it is not (yet). Generated by `docs/gen_pages.py` from TRL's dataclasses and lit-align's "
        "signatures.",
        "",
        "`TrainingArguments` itself maps onto Lightning's Trainer: `max_steps` / `num_train_epochs` -> "
        "`--trainer.max_steps` / `--trainer.max_epochs`; `gradient_accumulation_steps` -> "
        "`--trainer.accumulate_grad_batches`; `max_grad_norm` -> `--trainer.gradient_clip_val`; `bf16` / `fp16` -> "
        "`--trainer.precision` (or the module's `dtype`); `logging_steps` -> `--trainer.log_every_n_steps`; "
        "`eval_steps` -> `--trainer.val_check_interval`; `save_steps` -> `ModelCheckpoint(every_n_train_steps=...)`; "
        "`output_dir` -> `--trainer.default_root_dir`; `seed` -> `--seed_everything`; `report_to: wandb` -> "
        "`--trainer.logger WandbLogger`; `per_device_train_batch_size` -> the DataModule's `batch_size`; "
        "`learning_rate` / `lr_scheduler_type` / `warmup_steps` -> the module's `optimizer` and `lr_scheduler` "
        "(`lit_align.LinearWarmupDecay`); `gradient_checkpointing` -> the module's `gradient_checkpointing`; "
        "`torch_compile` -> the module's `torch_compile` (each transformer layer compiled on its own).",
        "",
    ]
    for config, rows in tables.items():
        lines += [f"## {config}", "", "| TRL field | TRL default | lit-align |", "|---|---|---|"]
        lines += [f"| `{name}` | `{default}` | {where} |".replace("``", "` `") for name, default, where in rows]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- pages from the README


def sections(text: str) -> dict[str, str]:
    """README level-2 sections by title."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


LINK = re.compile(r"\[([^\]]+)\]\(([^)#]+)(#[^)]*)?\)")


def site_links(text: str, depth: int = 0) -> str:
    """Links into the repository become links between pages where the file is a page, and a
    file name in code elsewhere (the site holds the docs, not the repository)."""
    up = "../" * depth

    def swap(m: re.Match) -> str:
        label, target, anchor = m.group(1), m.group(2), m.group(3) or ""
        if target.startswith(("http://", "https://")):
            return m.group(0)
        name = target.split("/")[-1]
        if target.startswith("docs/") and name in ("architecture.md", "methods.md"):
            return f"[{label}]({up}{name}{anchor})"
        return label if label.strip("`") == target else f"{label} (`{target}`)"

    text = LINK.sub(swap, text)
    return text.replace("](#", f"]({up}index.md#") if depth else text


def method_page(title: str, body: str, classes: list[str], configs: list[Path]) -> str:
    lines = [f"# {title}", "", site_links(body.strip(), depth=1), ""]
    for path in configs:
        lines += [f"## `{path.relative_to(ROOT)}`", "", "```yaml", path.read_text().rstrip(), "```", ""]
    if classes:
        lines += ["## Arguments", ""]
        lines += [f"::: lit_align.{c}\n" for c in classes]
    return "\n".join(lines)


def build() -> None:
    readme = (ROOT / "README.md").read_text()
    parts = sections(readme)
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "methods").mkdir(parents=True)
    (OUT / "guide").mkdir(parents=True)
    (OUT / "index.md").write_text(site_links(readme))
    for name in ("architecture.md", "methods.md"):
        (OUT / name).write_text(site_links((ROOT / "docs" / name).read_text()))
    for title, (page, classes) in METHOD_PAGES.items():
        if title not in parts:
            raise SystemExit(f"docs/gen_pages.py: README has no section '## {title}'")
        stem = page.replace("_", "-")
        configs = [ROOT / "configs" / f"{page}.yaml", *sorted((ROOT / "configs" / "recipes").glob(f"{stem}-*.yaml"))]
        (OUT / "methods" / f"{page}.md").write_text(method_page(title, parts[title], classes, [p for p in configs if p.exists()]))
    for title, (page, classes) in GUIDE_PAGES.items():
        if title not in parts:
            raise SystemExit(f"docs/gen_pages.py: README has no section '## {title}'")
        (OUT / "guide" / f"{page}.md").write_text(method_page(title, parts[title], classes, []))
    (OUT / "migration.md").write_text(migration_page())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that every TRL field has an entry")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if args.check:
        migration_rows()
    else:
        build()
