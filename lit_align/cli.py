"""``lit-align fit|validate|test --config FILE``: Lightning's CLI over every lit-align method.

The module and the DataModule are chosen by short class name (``--model SFT``,
``--data PreferenceDataModule``); the tokenizer follows the model's
``model_name_or_path``; optimizers and schedulers are injected
(``--model.optimizer AdamW``). The resolved config is saved beside the run and sent to
every logger (W&B shows it as the run's config).
"""

from __future__ import annotations

import csv
import difflib
import glob
import inspect
import os
import re
import sys
import warnings
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info

import lit_align  # noqa: F401  (registers every method and DataModule for short names)
from lit_align.allocator import keep_freed_memory
from lit_align.data.base import AlignDataModule
from lit_align.methods.base import AlignModule


class SaveConfigToLoggers(SaveConfigCallback):
    """Also attach the resolved config to the loggers (W&B run config)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


def init_parameters(cls: type) -> list[str]:
    """Every keyword a class's constructor accepts, through the ``**kwargs`` its ``__init__`` passes up."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def suggest(message: str, parser: ArgumentParser) -> str:
    """"did you mean ...?" for the unknown options named in a parser's error ``message``: a
    constructor argument of the class it names (``--model.bta`` -> ``beta``), or one of the parser's
    own options (``--trainer.max_step`` -> ``--trainer.max_steps``)."""
    hints = []
    for class_path, option in re.findall(r"class_path '([\w.]+)':\s+Option '(\w+)' is not accepted", message):
        try:
            module, _, name = class_path.rpartition(".")
            cls = getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError, ValueError):
            continue
        close = difflib.get_close_matches(option, init_parameters(cls), n=3, cutoff=0.6)
        if close:
            hints.append(f"{class_path} has no argument '{option}'; did you mean {' or '.join(map(repr, close))}?")
    known = [o for o in parser._option_string_actions if o.startswith("--")]
    _, _, unrecognized = message.partition("unrecognized arguments:")
    for option in re.findall(r"(--[\w.]+)", unrecognized):
        close = difflib.get_close_matches(option, known, n=3, cutoff=0.75)
        if close:
            hints.append(f"no option '{option}'; did you mean {' or '.join(close)}?")
    return "\n".join(hints)


class LitAlignParser(LightningArgumentParser):
    """Lightning's parser with short errors: the message, a "did you mean" for a misspelt option,
    and where the full usage is (instead of a hundred lines of usage above the message)."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        hint = suggest(message, parser)
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {message}\n" + (f"{hint}\n" if hint else "") + f"Every option: {prog} --help\n")
        sys.exit(2)


def _entries(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value] if value is not None else []


def _init_args(entry: Any) -> dict[str, Any]:
    return dict(entry.get("init_args") or {}) if hasattr(entry, "get") and entry.get("class_path") else {}


def find_last_checkpoint(trainer_config: Any) -> str | None:
    """The newest checkpoint of a run (``--ckpt_path last``): in the checkpoint callbacks' ``dirpath``,
    else where Lightning puts checkpoints by default, ``<save_dir>[/<name>/<version>]/checkpoints``
    under the loggers' ``save_dir`` and ``default_root_dir``. Unlike Lightning's own ``last``, this
    does not depend on a logger version that is new in every run (a W&B run id)."""
    roots = [trainer_config.get("default_root_dir") or os.getcwd()]
    roots += [_init_args(e).get("save_dir") for e in _entries(trainer_config.get("logger"))]
    patterns = [os.path.join(root, *["*"] * depth, "checkpoints", "*.ckpt") for root in roots if root for depth in range(3)]
    patterns += [os.path.join(d, "*.ckpt") for e in _entries(trainer_config.get("callbacks")) if (d := _init_args(e).get("dirpath"))]
    found = {path for pattern in patterns for path in glob.glob(pattern)}
    return max(found, key=os.path.getmtime) if found else None


# Constructor argument that names the run of each logger, so a resumed fit continues it.
RUN_ID_ARGUMENT = {"WandbLogger": "id", "CSVLogger": "version", "TensorBoardLogger": "version"}


class LitAlignCLI(LightningCLI):
    """Lightning's CLI with a ``--ckpt_path`` that resumes the whole run: ``last`` finds the run's
    newest checkpoint, and the loggers continue the run the checkpoint recorded (the same W&B run
    id, the same CSV/TensorBoard version, the CSV rows up to the checkpoint kept)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer_name_or_path")

    def before_instantiate_classes(self) -> None:
        self._resume_step, self._resume_loggers = None, []
        if self.subcommand != "fit" or not self.config.fit.get("ckpt_path"):
            return
        config = self.config.fit
        if config.ckpt_path == "last":
            found = find_last_checkpoint(config.trainer)
            if found is None:  # Lightning then warns and starts from scratch, as it does itself
                return
            config.ckpt_path = found
        if "://" in str(config.ckpt_path) or not os.path.isfile(config.ckpt_path):
            return  # Lightning reports a missing file; remote checkpoints keep their loggers as configured
        rank_zero_info(f"Resuming from {config.ckpt_path}")
        checkpoint = torch.load(config.ckpt_path, map_location="cpu", mmap=True, weights_only=False)
        self._resume_step = checkpoint.get("global_step")
        recorded = checkpoint.get("lit_align", {}).get("loggers", [])
        for entry, run in zip(_entries(config.trainer.get("logger")), recorded):
            argument = RUN_ID_ARGUMENT.get(run["class"])
            if not (argument and hasattr(entry, "get") and str(entry.get("class_path", "")).endswith(run["class"])):
                continue
            if entry.get("init_args") is None:
                entry.init_args = type(entry)()
            if entry.init_args.get(argument) is None and not (run["class"] == "WandbLogger" and entry.init_args.get("version")):
                entry.init_args[argument] = run["version"]
                self._resume_loggers.append(run["class"])

    def before_fit(self) -> None:
        """Lightning's CSV logger deletes the metrics file of the version it continues: keep the rows
        logged before the checkpoint (the resumed run logs the later ones again)."""
        if self._resume_step is None or not self.trainer.is_global_zero:
            return
        for logger in self.trainer.loggers:
            path = os.path.join(logger.log_dir, "metrics.csv") if isinstance(logger, CSVLogger) else None
            if path is None or type(logger).__name__ not in self._resume_loggers or not os.path.isfile(path):
                continue
            with open(path, newline="") as file:
                rows = [row for row in csv.DictReader(file) if int(row["step"]) < self._resume_step]
            with warnings.catch_warnings():  # "Previous log files ... will be deleted": not these rows
                warnings.filterwarnings("ignore", "Experiment logs directory")
                _ = logger.experiment
            for row in rows:  # the writer's buffer: written, with the new rows, at its next save
                logger.experiment.log_metrics({k: float(v) for k, v in row.items() if v != "" and k != "step"}, int(row["step"]))


def build_cli(args: ArgsType = None, run: bool = True) -> LitAlignCLI:
    """The CLI object (tests and notebooks call this with ``args`` as a list or dict)."""
    return LitAlignCLI(
        AlignModule,
        AlignDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigToLoggers,
        save_config_kwargs={"overwrite": True},
        parser_class=LitAlignParser,
        args=args,
        run=run,
    )


def main(args: ArgsType = None) -> None:
    """Console entry point ``lit-align``; ``lit-align serve ...`` runs the generation server
    (:mod:`lit_align.rollout.server`)."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and argv and argv[0] == "serve":
        from lit_align.rollout.server import serve_main

        return serve_main(list(argv[1:]))
    keep_freed_memory()  # a step's freed buffers are reused by the next without page faults (lit_align/allocator.py)
    build_cli(args)


if __name__ == "__main__":
    main()
