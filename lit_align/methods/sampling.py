"""The one way a module samples: its own engine, and :meth:`Sampling.sample`, which checks that the
engine can sample the model asked for. Used by the online methods and by GKD."""

from __future__ import annotations

from torch import Tensor, nn

from lit_align.data.formats import PromptBatch
from lit_align.rollout.engines import GenerationEngine, Generations, HFEngine, SamplingParams


class Sampling:
    """A module's generation engine (made on first use by ``make_engine``, or handed over by a
    ``RolloutCallback(engine=...)``), ``sample`` and ``check_prompt_budget``. Reads the module's
    ``model``, ``tokenizer``, ``max_completion_length`` and ``sampling`` (its
    :class:`~lit_align.rollout.engines.SamplingParams`)."""

    _engine: GenerationEngine | None = None
    sampling: SamplingParams

    @property
    def engine(self) -> GenerationEngine:
        """The engine this module samples with."""
        if self._engine is None:
            self.engine = self.make_engine()
        return self._engine

    @engine.setter
    def engine(self, engine: GenerationEngine) -> None:
        engine.connect(self.tokenizer)  # an engine declared in YAML learns the tokenizer here
        self._engine = engine

    def make_engine(self) -> GenerationEngine:
        return HFEngine(self.tokenizer)

    def sample(
        self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, policy: bool = True,
        sampling: SamplingParams | None = None, vision_rows: list | None = None,
    ) -> Generations:
        """Completions of ``model`` for left-padded prompts through the module's engine
        (``sampling.num_generations`` per prompt, consecutive). ``policy=False`` when ``model`` is
        not the trained policy (NashMD's mixture, XPO's reference or GKD's teacher, also when that
        is the policy's weights with its adapters off)."""
        if (not policy or model is not self.model) and not self.engine.samples_any_model:
            raise ValueError(
                f"{type(self).__name__} samples {type(model).__name__}, a model other than the policy, but "
                f"its engine {type(self.engine).__name__} samples the policy only; use an engine that samples "
                "any model (HFEngine, use_vllm=False)"
            )
        if vision_rows is None:
            return self.engine.generate(model, prompt_ids, prompt_mask, sampling or self.sampling)
        if not getattr(self.engine, "samples_images", False):
            raise ValueError(f"the prompts have images, which {type(self.engine).__name__} does not take; sample a "
                             "vision-language model with HFEngine (use_vllm=False)")
        return self.engine.generate(model, prompt_ids, prompt_mask, sampling or self.sampling, vision_rows=vision_rows)

    def check_prompt_budget(self, batch: PromptBatch) -> None:
        """A prompt and ``max_completion_length`` new tokens must fit the model's context."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        longest = int(batch.prompt_mask.sum(dim=1).max())
        if limit is not None and longest + self.max_completion_length > limit:
            i = int(batch.prompt_mask.sum(dim=1).argmax())
            raise ValueError(
                f"prompt {str(batch.prompts[i])[:80]!r} has {longest} tokens; with max_completion_length="
                f"{self.max_completion_length} it exceeds the model's context of {limit} tokens. Drop long prompts "
                f"with the DataModule's max_length (for example {limit - self.max_completion_length}) or lower "
                "max_completion_length"
            )
