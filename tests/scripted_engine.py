"""A deterministic generation engine for tests: completions are a function of the prompt text.

Completion ``j`` of the ``c``-th call answers ``solve(prompt) + ((j + c - 1) % 2)`` (so half of
each group is right and rewards have spread, and successive single samples alternate between
right and wrong) followed by ``j % 3`` spaces (so lengths differ within and across ranks), then EOS. Prompts on different ranks get different lengths, and two processes see
exactly the completions one process sees.
"""

from __future__ import annotations

from lit_align.data.arithmetic import solve
from lit_align.rollout.engines import Generations, completion_mask, eos_ids, right_pad


class ScriptedEngine:
    samples_any_model = True  # its completions answer the prompt, whichever model is asked

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer
        self.calls = 0

    def connect(self, tokenizer) -> None:
        if self.tokenizer is None:
            self.tokenizer = tokenizer

    def generate(self, model, prompt_ids, prompt_mask, sampling) -> Generations:
        self.calls += 1
        tok = self.tokenizer
        rows = []
        for p, m in zip(prompt_ids.tolist(), prompt_mask.tolist()):
            answer = solve(tok.decode([t for t, k in zip(p, m) if k], skip_special_tokens=True))
            for j in range(sampling.num_generations):
                text = f"Answer: {answer + (j + self.calls - 1) % 2}" + " " * (j % 3)
                rows.append((tok(text)["input_ids"] + [tok.eos_token_id])[: sampling.max_completion_length])
        ids = right_pad(rows, tok.pad_token_id, device=prompt_ids.device)
        mask, truncated = completion_mask(ids, eos_ids(tok))
        n = sampling.num_generations
        return Generations(prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0), ids, mask, truncated)

    def sync_weights(self, model) -> None:
        pass
