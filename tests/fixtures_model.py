"""Session-wide tiny models, built offline once per test run (see `worker.tiny_model`).

Shared through `pytest_plugins = ["tests.fixtures_model"]` in the root conftest, or by
importing the fixtures into a test module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.settings import Settings
from worker.tiny_model import build_tiny_model

TINY_CONTEXT = 256


def load_raw(model_dir: Path) -> Any:
    """The model alone, in eval mode, as transformers loads it (no ChatModel around it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()


def model_settings(model_dir: Path, **overrides: Any) -> Settings:
    """Settings for a tiny model on the CPU, greedy, 8 new tokens, without any `.env`."""
    values: dict[str, Any] = {
        "model_name": str(model_dir),
        "device": "cpu",
        "do_sample": False,
        "max_new_tokens": 8,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DialoGPT-style model: no chat template, turns separated by EOS."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), context=TINY_CONTEXT)


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model with a chat template, for the system-prompt code path."""
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-chat-model"), context=TINY_CONTEXT, chat_template=True
    )
