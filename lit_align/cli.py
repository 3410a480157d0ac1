"""``lit-align fit|validate|test --config FILE``: Lightning's CLI over every lit-align method.

The module and the DataModule are chosen by short class name (``--model SFT``,
``--data PreferenceDataModule``); the tokenizer follows the model's
``model_name_or_path``; optimizers and schedulers are injected
(``--model.optimizer AdamW``). The resolved config is saved beside the run and sent to
every logger (W&B shows it as the run's config).
"""

from __future__ import annotations

import yaml
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback

import lit_align  # noqa: F401  (registers every method and DataModule for short names)
from lit_align.data.base import AlignDataModule
from lit_align.methods.base import AlignModule


class SaveConfigToLoggers(SaveConfigCallback):
    """Also attach the resolved config to the loggers (W&B run config)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


class LitAlignCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer_name_or_path")


def build_cli(args: ArgsType = None, run: bool = True) -> LitAlignCLI:
    """The CLI object (tests and notebooks call this with ``args`` as a list or dict)."""
    return LitAlignCLI(
        AlignModule,
        AlignDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigToLoggers,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: ArgsType = None) -> None:
    """Console entry point ``lit-align``."""
    build_cli(args)


if __name__ == "__main__":
    main()
