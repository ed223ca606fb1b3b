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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList
from transformers.utils import logging as hf_logging

from common.settings import Settings, get_settings
from worker.batching import MicroBatcher
from worker.context import Turn, build_input_ids
from worker.metrics import GENERATION_BATCH_SIZE
from worker.ngrams import NoRepeatNGramsAfterPadding
from worker.packing import pack_linear_layers
from worker.quantization import quantize_int8
from worker.sampling import SampleAmongTopK

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


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto`: half precision where it is fast and safe (CUDA), full precision on CPU."""
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


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


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a reply: the tokenizer's EOS and the model's own list.

    Chat models often end a turn with a token of their own (Gemma's `<end_of_turn>`,
    Llama 3's `<|eot_id|>`) that only their `generation_config.json` names; passing the
    tokenizer's EOS alone to `generate` would override that list and let the reply run on
    into invented turns. The tokenizer's EOS comes first: it is also the padding of
    tokenizers that have none.
    """
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = configured if isinstance(configured, (list, tuple)) else [configured]
    ids: list[int] = []
    for token in [tokenizer.eos_token_id, *listed]:
        if token is not None and int(token) not in ids:
            ids.append(int(token))
    return ids


def configure_torch_threads(settings: Settings) -> None:
    """Apply TORCH_THREADS; 0 keeps torch's choice, or OMP_NUM_THREADS when the worker set it.

    Torch starts one thread per core in every process. Two prefork children on two cores
    would then run four threads that spin against each other, so the worker divides the
    cores among its children (worker.app) and each child applies its share here.
    """
    threads = settings.torch_threads or int(os.environ.get("OMP_NUM_THREADS") or 0)
    if threads > 0:
        torch.set_num_threads(threads)


def new_torch_thread() -> ThreadPoolExecutor:
    """A thread to run all of one model's torch work on (see `ChatModel`)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")


class ChatModel:
    """A tokenizer and model pair with the generation settings of this deployment.

    Safe to share between threads: tokenizer calls are serialised by a lock (fast
    tokenizers refuse concurrent use), and generation goes through one `MicroBatcher`, so
    concurrent callers are answered by batched `generate` calls.

    Every piece of torch work, loading included, runs on one thread, `torch_thread`.
    torch's OpenMP pool belongs to the thread that runs a parallel operation, and each
    further thread that does gets a pool of its own; once there are more pool threads
    than cores, GNU OpenMP stops spinning between operations and sleeps instead, and a
    decoding step is hundreds of short operations. Generating on a second thread after
    loading on the first ran at half speed (int8) or 15% slower (float32) on 2 cores
    (bench/HISTORY.md, section 3).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        settings: Settings,
        device: str,
        torch_thread: ThreadPoolExecutor | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.name = settings.model_name
        self.device = device
        self.max_context_tokens = context_size(model.config, tokenizer)
        self._tokenizer_lock = threading.Lock()
        self._stop_ids = stop_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self._pad_id: int = pad if pad is not None else (self._stop_ids or [0])[0]
        self._sampler = (
            SampleAmongTopK(settings.temperature, settings.top_k, settings.top_p)
            if settings.do_sample and settings.top_k > 0
            else None
        )
        self._generation_kwargs = self._build_generation_kwargs()
        self.torch_thread = torch_thread or new_torch_thread()
        self._batcher: MicroBatcher[list[int], list[int]] = MicroBatcher(
            self._generate_on_torch_thread,
            max_batch_size=settings.generation_batch_size,
            max_wait_seconds=settings.generation_batch_wait_ms / 1000,
            name="generation-batcher",
        )

    @classmethod
    def load(cls, settings: Settings) -> ChatModel:
        """Load from a hub name or a local directory (see `worker.tiny_model`), on the
        thread that will also generate."""
        torch_thread = new_torch_thread()
        try:
            return torch_thread.submit(cls._load_here, settings, torch_thread).result()
        except BaseException:
            torch_thread.shutdown(wait=False)  # no model, nothing for the thread to run
            raise

    @classmethod
    def _load_here(cls, settings: Settings, torch_thread: ThreadPoolExecutor) -> ChatModel:
        device = resolve_device(settings.device)
        configure_torch_threads(settings)
        hf_logging.disable_progress_bar()  # progress bars in worker logs are noise
        tokenizer = AutoTokenizer.from_pretrained(settings.model_name)
        model = AutoModelForCausalLM.from_pretrained(
            settings.model_name, dtype=resolve_dtype(settings.model_dtype, device)
        )
        model.eval()
        model.to(device)
        if settings.model_quantization == "int8":
            layers = quantize_int8(model, device)
            logger.info("model quantised: %d linear layers to int8 (dynamic)", layers)
        if settings.model_packed_linear:
            layers = pack_linear_layers(model, device)
            logger.info("model packed: %d linear layers laid out for oneDNN", layers)
        return cls(model, tokenizer, settings, device, torch_thread)

    def reply(self, turns: Sequence[Turn]) -> GeneratedReply:
        """Continue the conversation as the assistant; never returns an empty text.

        Blocks until the reply is ready; concurrent calls share batches.
        """
        new_ids = self._batcher.submit(self.prompt_ids(turns))
        return self.finish(new_ids)

    def prompt_ids(self, turns: Sequence[Turn]) -> list[int]:
        """The token ids the model continues (newest turns that fit, see worker.context)."""
        with self._tokenizer_lock:
            return build_input_ids(
                self.tokenizer,
                turns,
                max_context_tokens=self.max_context_tokens,
                max_new_tokens=self.settings.max_new_tokens,
                system_prompt=self.settings.system_prompt,
            )

    def finish(self, new_ids: Sequence[int]) -> GeneratedReply:
        """Decode generated ids; an empty or blank generation becomes the fallback text."""
        with self._tokenizer_lock:
            text = self.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        if not text:
            return GeneratedReply(self.settings.fallback_reply, len(new_ids), used_fallback=True)
        return GeneratedReply(text, len(new_ids), used_fallback=False)

    def _generate_on_torch_thread(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        return self.torch_thread.submit(self.generate_batch, prompts).result()

    def generate_batch(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """New token ids for each prompt, from one `generate` call over the whole batch.

        Prompts are padded on the left with an attention mask, so every row ends where its
        reply starts; transformers derives position ids from the mask, which keeps a
        padded row's greedy reply identical to the same prompt generated alone. A row
        that finished early is cut after its EOS, as a lone `generate` would have stopped.
        Repeated n-grams are counted from each row's first real token (worker.ngrams).
        """
        GENERATION_BATCH_SIZE.observe(len(prompts))
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        with torch.inference_mode():
            output = self.model.generate(
                input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                **self._generation_kwargs,
                logits_processor=self._logits_processors([width - len(p) for p in prompts]),
            )
        return [self._until_eos(row) for row in output[:, width:].tolist()]

    def _logits_processors(self, first_real: Sequence[int]) -> LogitsProcessorList:
        """This call's own processors; transformers runs them after its built-in ones, in
        this order, and the sampler must come last."""
        processors = LogitsProcessorList()
        if self.settings.no_repeat_ngram_size > 0:
            processors.append(
                NoRepeatNGramsAfterPadding(self.settings.no_repeat_ngram_size, first_real)
            )
        if self._sampler is not None:
            processors.append(self._sampler)
        return processors

    def _until_eos(self, ids: list[int]) -> list[int]:
        """The reply up to and including its first stop token."""
        for position, token in enumerate(ids):
            if token in self._stop_ids:
                return ids[: position + 1]
        return ids

    def _build_generation_kwargs(self) -> dict[str, Any]:
        """Only the flags that apply, so transformers has no unused option to warn about."""
        settings = self.settings
        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
            "repetition_penalty": settings.repetition_penalty,
            "pad_token_id": self._pad_id,
            "eos_token_id": self._stop_ids or None,
        }
        if settings.min_new_tokens > 0:
            kwargs["min_new_tokens"] = settings.min_new_tokens
        # No repeated n-grams: a processor per call (`_logits_processors`), not
        # `no_repeat_ngram_size`, which counts the padding of batched prompts.
        if self._sampler is not None:
            # The same draw among the top-k only; generate's argmax takes it (worker.sampling).
            kwargs["do_sample"] = False
        elif settings.do_sample:  # no top-k: every token may be drawn, transformers does it
            kwargs["temperature"] = settings.temperature
            kwargs["top_p"] = settings.top_p
            kwargs["top_k"] = 0
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
