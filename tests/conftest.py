import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from lit_align.models.builtin import builtin_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return builtin_tokenizer()
