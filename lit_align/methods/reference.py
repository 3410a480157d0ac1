"""Methods that compare the policy with a reference (DPO, KTO, ...): how the reference is had.

Four ways, cheapest first (docs/methods.md §1):

- LoRA runs use the policy's own base with adapters disabled: no second model;
- ``precompute_ref_log_probs``: one pass before training, cached on disk by data and model;
  no reference during training;
- a separate frozen copy (``ref_model_name_or_path``, default the policy's path), kept out of
  checkpoints;
- TR-DPO (``sync_ref_model``): the copy is mixed towards the policy every few steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from tqdm.auto import tqdm

from lit_align.methods.base import AlignModule
from lit_align.models.reference import SyncReferenceModel, adapters_disabled, frozen_copy, is_peft_model
from lit_align.ops.packing import SequenceBatch
from lit_align.ops.preference import sequence_logps


def cache_dir() -> Path:
    """Where precomputed reference log-probs are kept (``$LIT_ALIGN_CACHE``, default ``~/.cache/lit_align``)."""
    return Path(os.environ.get("LIT_ALIGN_CACHE", Path.home() / ".cache" / "lit_align"))


class WithReference:
    """A frozen reference beside the policy, for the offline methods (:class:`ReferenceModule`)
    and the online ones (``OnlineModule``): its arguments declared once, the copy loaded once,
    TR-DPO syncing, and the one place that chooses between the copy and the policy with its LoRA
    adapters off (``reference_model`` under ``reference_context()``)."""

    frozen_submodules = ("ref_model",)

    def __init__(
        self,
        *args: Any,
        ref_model_name_or_path: str | None = None,
        sync_ref_model: bool = False,
        ref_model_mixup_alpha: float = 0.6,
        ref_model_sync_steps: int = 512,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            ref_model_name_or_path: The reference policy (default: ``model_name_or_path``). Unused with
                LoRA (the base model with adapters disabled is the reference).
            sync_ref_model: TR-DPO: mix the policy into the reference every ``ref_model_sync_steps``.
            ref_model_mixup_alpha: TR-DPO's alpha: ``ref = alpha * policy + (1 - alpha) * ref``.
            ref_model_sync_steps: Optimizer steps between two TR-DPO syncs.
        """
        super().__init__(*args, **kwargs)
        if sync_ref_model and self.peft is not None:
            raise ValueError("sync_ref_model=True needs a separate reference model; it cannot be used with peft")
        if not 0.0 <= ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"ref_model_mixup_alpha must be in [0, 1], got {ref_model_mixup_alpha}")
        self.ref_model_name_or_path = ref_model_name_or_path
        self.sync_ref_model = sync_ref_model
        self.ref_model_mixup_alpha = ref_model_mixup_alpha
        self.ref_model_sync_steps = ref_model_sync_steps
        self.ref_model: torch.nn.Module | None = None

    @property
    def loads_reference(self) -> bool:
        """Whether training needs the reference in memory (a copy, or the adapters-off policy)."""
        return True

    def load_reference_copy(self) -> torch.nn.Module:
        if self.ref_model_name_or_path:
            return frozen_copy(self.ref_model_name_or_path, self.dtype_name, self.attn_implementation, **self.model_init.kwargs)
        return self.fit_to_tokenizer(frozen_copy(self.model_name_or_path, self.dtype_name, self.attn_implementation, **self.model_init.kwargs))

    def build_other_models(self) -> None:
        super().build_other_models()
        if self.loads_reference and self.peft is None:  # LoRA: the policy's base is the reference
            self.ref_model = self.load_reference_copy()

    def configure_callbacks(self) -> list:
        callbacks = super().configure_callbacks()
        if self.sync_ref_model:
            callbacks.append(SyncReferenceModel(self.ref_model_mixup_alpha, self.ref_model_sync_steps))
        return callbacks

    @property
    def reference_model(self) -> torch.nn.Module:
        """The module whose forward is the reference's, run under :meth:`reference_context`."""
        if self.ref_model is not None:
            return self.ref_model
        if is_peft_model(self.model):
            return self.model
        raise RuntimeError(f"{type(self).__name__} has no reference model: none is loaded with these settings")

    def reference_context(self) -> contextlib.AbstractContextManager:
        """Nothing for a separate copy; the policy's adapters off when the policy is the reference."""
        return contextlib.nullcontext() if self.ref_model is not None else adapters_disabled(self.model)


class ReferenceModule(WithReference, AlignModule):
    """Base of the offline methods with a reference model (not used directly)."""

    def __init__(
        self,
        *args: Any,
        precompute_ref_log_probs: bool = False,
        precompute_ref_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            precompute_ref_log_probs: Compute the reference log-probs once before training (cached on
                disk by data and model) and train without a reference model in memory.
            precompute_ref_batch_size: Batch size of that pass (default: the eval batch size).
        """
        super().__init__(*args, **kwargs)
        if self.sync_ref_model and precompute_ref_log_probs:
            raise ValueError("sync_ref_model=True cannot be used with precompute_ref_log_probs=True")
        self.precompute_ref_log_probs = precompute_ref_log_probs
        self.precompute_ref_batch_size = precompute_ref_batch_size

    @property
    def loads_reference(self) -> bool:
        return not self.precompute_ref_log_probs

    # -- reference log-probs -----------------------------------------------------------------
    @torch.no_grad()
    def reference_sequence_logps(self, batch: SequenceBatch, ref_model: torch.nn.Module | None = None) -> Tensor:
        """Per-sequence reference log-probs ``(S,)``: precomputed, from ``ref_model`` (the
        precomputing pass's own copy), or from the reference (the copy, or adapters off)."""
        if batch.ref_logps is not None:
            return batch.ref_logps
        if ref_model is not None:
            return self.sequence_logps(ref_model, batch).logps
        if self.ref_model is None and not is_peft_model(self.model):
            raise RuntimeError(
                "no reference log-probs: the batch carries none and there is no reference model "
                "(precompute_ref_log_probs=True precomputes them in on_fit_start)"
            )
        with self.reference_context():
            return self.sequence_logps(self.reference_model, batch).logps

    def sequence_logps(self, model: torch.nn.Module, batch: SequenceBatch, with_extras: bool = False):
        """The method's per-sequence log-probs (overridden to pass method options such as ``ld_alpha``)."""
        return sequence_logps(model, batch, with_extras=with_extras, chunk_size=self.chunk_size)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.precompute_ref_log_probs:
            self._precompute(self.trainer.datamodule)

    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self.precompute_ref_log_probs and self.trainer.state.fn == "validate":
            self._precompute(self.trainer.datamodule)

    def _precompute(self, datamodule) -> None:
        if datamodule is None or not hasattr(datamodule, "datasets"):
            raise ValueError("precompute_ref_log_probs=True needs a lit-align DataModule passed to the Trainer")
        ref_model = None if is_peft_model(self.model) else self.load_reference_copy().to(self.device)
        for split, ds in list(datamodule.datasets.items()):
            if "ref_logps" in ds.column_names:
                continue
            values = self._cached_ref_logps(ds, datamodule, ref_model, split)
            datamodule.datasets[split] = ds.add_column("ref_logps", values)
        del ref_model

    def _cached_ref_logps(self, ds, datamodule, ref_model, split: str) -> list[list[float]]:
        key = hashlib.sha256(
            f"{ds._fingerprint}|{self.ref_model_name_or_path or self.model_name_or_path}|{self.hparams}".encode()
        ).hexdigest()[:24]
        path = cache_dir() / "ref_logps" / f"{key}.pt"
        if path.exists():
            rank_zero_info(f"Reference log-probs for {split} loaded from {path}")
            return torch.load(path)
        batch_size = self.precompute_ref_batch_size or datamodule.eval_batch_size
        rows: list[list[float]] = []
        for start in tqdm(range(0, len(ds), batch_size), desc=f"Reference log-probs [{split}]"):
            items = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
            batch = datamodule.transfer_batch_to_device(datamodule.collate(items), self.device, 0)
            logps = self.reference_sequence_logps(batch, ref_model).float().cpu()  # (k * E,) in j * E + i order
            rows.extend(logps.view(-1, len(items)).T.tolist())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(rows, tmp)
        os.replace(tmp, path)  # atomic: ranks writing the same entry never leave a torn file
        return rows
