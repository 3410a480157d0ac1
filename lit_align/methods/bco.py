"""Binary Classifier Optimization (TRL's removed ``BCOTrainer``, docs/methods.md §12).

Unpaired feedback as binary classification of the implicit reward ``r = beta (log pi - log pi_ref)``
shifted by ``delta``, the running mean of all rewards seen (global over devices, kept in the
checkpoint): ``L_d = -log sigmoid(r - delta)``, ``L_u = -log sigmoid(-(r - delta))``.
Optional underlying-distribution matching (UDM): a balanced logistic regression on prompt
embeddings (``embedding_model_name_or_path``) estimates p(desirable | prompt); each undesirable
row's loss is weighted by the clamped density ratio p / (1 - p).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lit_align.losses.bco import (
    DensityClassifier,
    RunningMoments,
    bco_loss,
    bco_rewards,
    density_ratio_weights,
    fit_density_classifier,
)
from lit_align.methods.metrics import check_unpaired_labels, unpaired_metrics
from lit_align.methods.reference import ReferenceModule
from lit_align.models.loading import load_causal_lm
from lit_align.ops.heads import mean_pooled
from lit_align.ops.packing import SequenceBatch, collate_examples


class BCO(ReferenceModule):
    """BCO on unpaired feedback (``UnpairedPreferenceDataModule``)."""

    default_lr = 5e-7

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        embedding_model_name_or_path: str | None = None,
        prompt_sample_size: int = 1024,
        min_density_ratio: float = 0.5,
        max_density_ratio: float = 10.0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            beta: Scale of the implicit reward.
            embedding_model_name_or_path: Turns on UDM: the model whose mean-pooled final hidden states
                embed the prompts (any causal LM directory or Hub id, or ``builtin:tiny``); None: off.
            prompt_sample_size: Prompts of each class drawn (with replacement) to fit the UDM classifier.
            min_density_ratio: Lower clamp of the UDM weight.
            max_density_ratio: Upper clamp of the UDM weight.
        """
        super().__init__(*args, **kwargs)
        self.beta = beta
        self.embedding_model_name_or_path = embedding_model_name_or_path
        self.prompt_sample_size = prompt_sample_size
        self.min_density_ratio = min_density_ratio
        self.max_density_ratio = max_density_ratio
        self.running = RunningMoments()
        self.embedder: torch.nn.Module | None = None
        self.classifier: DensityClassifier | None = None

    # -- UDM ---------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        check_unpaired_labels(self.trainer.datamodule, type(self).__name__)
        super().on_fit_start()
        if self.embedding_model_name_or_path is not None and self.classifier is None:
            self.classifier = self.fit_udm(self.trainer.datamodule)

    def prompt_embeddings(self, batch: SequenceBatch) -> Tensor:
        if self.embedder is None:
            self.embedder = load_causal_lm(self.embedding_model_name_or_path).requires_grad_(False).eval()
        self.embedder.to(self.device)
        with torch.no_grad():
            return mean_pooled(self.embedder, batch, ~batch.completion_mask).float()

    def fit_udm(self, datamodule) -> DensityClassifier:
        ds = datamodule.datasets["train"]
        labels = ds["label"]
        rng = random.Random(datamodule.seed)
        embeddings = {}
        for kind in (True, False):
            rows = [i for i, y in enumerate(labels) if y == kind]
            picked = [rng.choice(rows) for _ in range(self.prompt_sample_size)]
            chunks = []
            for start in range(0, len(picked), datamodule.eval_batch_size):
                items = [ds[i] for i in picked[start : start + datamodule.eval_batch_size]]
                batch = collate_examples(items, datamodule.pad_token_id, "padded", None)
                batch = datamodule.transfer_batch_to_device(batch, self.device, 0)
                chunks.append(self.prompt_embeddings(batch)[: len(items)])  # main sequences only
            embeddings[kind] = torch.cat(chunks)
        rank_zero_info(f"BCO: fitting the UDM classifier on {self.prompt_sample_size} prompts of each class")
        return fit_density_classifier(embeddings[True], embeddings[False])

    # -- step --------------------------------------------------------------------------------
    def shared_step(self, batch: SequenceBatch, stage: str) -> Tensor:
        e = batch.num_examples
        policy = self.sequence_logps(self.model, batch, with_extras=True)
        ref = self.reference_sequence_logps(batch)[:e]
        logps = policy.logps[:e]
        if stage == "train":  # delta: the running mean after this step's rewards, over all devices
            rewards = bco_rewards(logps.detach(), ref, self.beta)
            total, total_sq, count = self.global_sum(torch.stack([rewards.sum(), (rewards**2).sum(), rewards.new_tensor(e)]))
            self.running.update_from_sums(total, total_sq, count)
        udm = None
        if self.classifier is not None:
            udm = density_ratio_weights(
                self.classifier(self.prompt_embeddings(batch)[:e]), self.min_density_ratio, self.max_density_ratio
            )
        delta = torch.tensor(self.running.mean, device=logps.device, dtype=torch.float32)
        loss, sums = bco_loss(logps, ref, batch.labels, delta, beta=self.beta, udm_weights=udm)
        metrics = unpaired_metrics(self, policy, batch, sums, loss, stage)
        metrics["delta"] = delta
        self.log_metrics(metrics, stage, e)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["bco_running"] = self.running.state_dict()
        if self.classifier is not None:
            checkpoint["bco_udm"] = self.classifier.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.running.load_state_dict(checkpoint.get("bco_running", RunningMoments().state_dict()))
        if "bco_udm" in checkpoint:
            self.classifier = DensityClassifier.from_state_dict(checkpoint["bco_udm"])
