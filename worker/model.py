"""The causal language model, loaded once per worker process and asked for replies.

Loading takes seconds and hundreds of megabytes, so each process keeps one `ChatModel`
for its whole life (`get_model`). Only the worker imports this module: torch and
transformers stay out of the webhook.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from common.settings import Settings, get_settings
from worker.context import Turn, build_input_ids

logger = logging.getLogger(__name__)

# Tokenizers without a known limit report a huge sentinel (about 1e30) as model_max_length.
SANE_MAX_LENGTH = 1_000_000
DEFAULT_CONTEXT_TOKENS = 1024


@dataclass(frozen=True)
class GeneratedReply:
    """What the model said, and whether the canned fallback stood in for it."""

    text: str
    new_tokens: int
    used_fallback: bool


def resolve_device(device: str) -> str:
    """`auto` lets one configuration serve both GPU and CPU hosts."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def context_size(config: Any, tokenizer: Any) -> int:
    """The longest prompt plus reply the model can attend to.

    The model config knows the position embeddings; a tokenizer may declare a smaller
    limit (DialoGPT's says 1024 too), and the smaller of the two wins.
    """
    size = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < SANE_MAX_LENGTH:
        size = min(size, tokenizer_limit) if size else tokenizer_limit
    return int(size or DEFAULT_CONTEXT_TOKENS)


class ChatModel:
    """A tokenizer and model pair with the generation settings of this deployment."""

    def __init__(self, model: Any, tokenizer: Any, settings: Settings, device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.name = settings.model_name
        self.device = device
        self.max_context_tokens = context_size(model.config, tokenizer)

    @classmethod
    def load(cls, settings: Settings) -> ChatModel:
        """Load from a hub name or a local directory (see `worker.tiny_model`)."""
        device = resolve_device(settings.device)
        hf_logging.disable_progress_bar()  # progress bars in worker logs are noise
        tokenizer = AutoTokenizer.from_pretrained(settings.model_name)
        model = AutoModelForCausalLM.from_pretrained(settings.model_name)
        model.eval()
        model.to(device)
        return cls(model, tokenizer, settings, device)

    def reply(self, turns: Sequence[Turn]) -> GeneratedReply:
        """Continue the conversation as the assistant; never returns an empty text."""
        settings = self.settings
        input_ids = build_input_ids(
            self.tokenizer,
            turns,
            max_context_tokens=self.max_context_tokens,
            max_new_tokens=settings.max_new_tokens,
            system_prompt=settings.system_prompt,
        )
        inputs = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            output = self.model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                **self._generation_kwargs(),
            )
        new_ids = output[0, inputs.shape[1] :].tolist()
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        if not text:
            return GeneratedReply(settings.fallback_reply, len(new_ids), used_fallback=True)
        return GeneratedReply(text, len(new_ids), used_fallback=False)

    def _generation_kwargs(self) -> dict[str, Any]:
        """Only the flags that apply, so transformers has no unused option to warn about."""
        settings = self.settings
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
            "repetition_penalty": settings.repetition_penalty,
            "pad_token_id": pad if pad is not None else eos,
            "eos_token_id": eos,
        }
        if settings.min_new_tokens > 0:
            kwargs["min_new_tokens"] = settings.min_new_tokens
        if settings.no_repeat_ngram_size > 0:
            kwargs["no_repeat_ngram_size"] = settings.no_repeat_ngram_size
        if settings.do_sample:
            kwargs["temperature"] = settings.temperature
            kwargs["top_k"] = settings.top_k
            kwargs["top_p"] = settings.top_p
        return kwargs


_model: ChatModel | None = None
_model_lock = threading.Lock()


def get_model() -> ChatModel:
    """The process's model, loaded on first use.

    Loaded lazily rather than at import so that a forked worker child loads its own copy
    after the fork, and guarded by a lock so concurrent threads cannot load it twice.
    """
    global _model
    if _model is not None:
        return _model
    with _model_lock:
        if _model is None:
            started = time.perf_counter()
            loaded = ChatModel.load(get_settings())
            logger.info(
                "model loaded name=%s device=%s pid=%d seconds=%.2f",
                loaded.name,
                loaded.device,
                os.getpid(),
                time.perf_counter() - started,
            )
            _model = loaded
        return _model
