"""A reward model as a reward function: scores (prompt, completion) pairs with a Hugging Face
sequence-classification directory, such as one written by ``lit_align.RewardModel``."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from lit_align.data.tokenize import add_eos, is_conversational
from lit_align.ops.packing import collate_examples


class RewardModelScorer:
    """``scorer(prompts, completions) -> list[float]``, TRL's reward-function signature.

    Rows are tokenized as the reward model was trained (``RewardModel`` on a
    ``PreferenceDataModule``): the chat template over prompt + completion for conversations,
    ``prompt + completion + EOS`` for text; the reward is the head on the last token.

    The weights load on first use or ``load()`` (an online module calls it in ``configure_model``,
    with its other models, and moves the scorer to its own device when it scores).

    Args:
        name_or_path: A sequence-classification model directory (or ``builtin:tiny`` for tests).
        batch_size: Rows per forward.
        device: Where to run it (default: CUDA if available).
        dtype: Weights dtype.
    """

    def __init__(self, name_or_path: str, batch_size: int = 16, device: str | None = None, dtype: str = "float32"):
        self.__name__ = name_or_path.rstrip("/").split("/")[-1]  # as TRL names a reward model in metrics
        self.name_or_path = name_or_path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.batch_size = batch_size
        self.model = self.tokenizer = None

    def load(self, **init_kwargs: Any) -> RewardModelScorer:
        """Read the weights (``init_kwargs``: ``from_pretrained``'s, as an online module's
        ``model_init_kwargs``, which TRL also applies to reward models)."""
        from lit_align.models.heads import load_classifier
        from lit_align.models.loading import TOKENIZER_KWARGS, load_tokenizer

        if self.model is None:
            self.model = load_classifier(self.name_or_path, "sequence", 1, self.dtype, **init_kwargs).to(self.device).eval()
            self.tokenizer = load_tokenizer(self.name_or_path, **{k: v for k, v in init_kwargs.items() if k in TOKENIZER_KWARGS})
        return self

    def to(self, device: torch.device | str) -> RewardModelScorer:
        self.device = torch.device(device)
        if self.model is not None:
            self.model.to(self.device)
        return self

    def tokenize(self, prompt, completion) -> list[int]:
        if is_conversational(prompt):
            return list(self.tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"])
        return list(self.tokenizer(prompt + add_eos(completion, self.tokenizer))["input_ids"])

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        from lit_align.ops.heads import sequence_scores

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        self.load()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            items = []
            for p, c in zip(prompts[start : start + self.batch_size], completions[start : start + self.batch_size]):
                ids = self.tokenize(p, c)
                items.append({"input_ids": [ids], "completion_mask": [[1] * len(ids)]})
            batch = move_data_to_device(collate_examples(items, pad, "padded", None), self.device)
            scores += sequence_scores(self.model, batch)[:, 0].float().cpu().tolist()
        return scores
