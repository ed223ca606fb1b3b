"""The model wrapper on a tiny random GPT-2: loading, generation flags, fallback, singleton."""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import worker.model as model_module
from common.settings import Settings, get_settings
from tests.fixtures_model import (  # noqa: F401
    TINY_CONTEXT,
    model_settings,
    tiny_chat_model_dir,
    tiny_model_dir,
)
from worker.context import Turn
from worker.model import (
    ChatModel,
    GeneratedReply,
    context_size,
    get_model,
    resolve_device,
    stop_token_ids,
)
from worker.ngrams import NoRepeatNGramsAfterPadding
from worker.sampling import SampleAmongTopK
from worker.tiny_model import build_tiny_model
from worker.tiny_model import main as tiny_model_main

TURNS = [
    Turn("user", "Hola, ¿cómo estás?"),
    Turn("assistant", "Muy bien, gracias."),
    Turn("user", "Where is my order?"),
]


@pytest.fixture(scope="module")
def greedy_model(tiny_model_dir: Path) -> ChatModel:  # noqa: F811
    return ChatModel.load(model_settings(tiny_model_dir))


class GenerateSpy:
    """Records the keyword arguments of `generate` and still runs the real one."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.kwargs: dict[str, Any] = {}

    def __call__(self, inputs: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.kwargs = kwargs
        return self.real(inputs, **kwargs)


# --- helpers -------------------------------------------------------------------------------


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"


@pytest.mark.parametrize(
    ("config", "tokenizer_limit", "expected"),
    [
        (SimpleNamespace(n_positions=1024), 1024, 1024),
        (SimpleNamespace(n_positions=1024), 512, 512),
        (SimpleNamespace(n_positions=1024), int(1e30), 1024),
        (SimpleNamespace(max_position_embeddings=4096), 2048, 2048),
        (SimpleNamespace(max_position_embeddings=4096), None, 4096),
        (SimpleNamespace(), 300, 300),
    ],
)
def test_context_size(config: Any, tokenizer_limit: int | None, expected: int) -> None:
    tokenizer = SimpleNamespace(model_max_length=tokenizer_limit)
    assert context_size(config, tokenizer) == expected


# --- ChatModel -----------------------------------------------------------------------------


def test_load_reads_a_local_directory(greedy_model: ChatModel, tiny_model_dir: Path) -> None:  # noqa: F811
    assert greedy_model.name == str(tiny_model_dir)
    assert greedy_model.device == "cpu"
    assert greedy_model.max_context_tokens == TINY_CONTEXT
    assert not greedy_model.model.training
    assert next(greedy_model.model.parameters()).device.type == "cpu"


def test_reply_returns_generated_text(greedy_model: ChatModel) -> None:
    reply = greedy_model.reply(TURNS)

    assert isinstance(reply, GeneratedReply)
    assert 0 < reply.new_tokens <= greedy_model.settings.max_new_tokens
    assert reply.text == reply.text.strip()
    assert reply.text
    if not reply.used_fallback:
        assert reply.text != greedy_model.settings.fallback_reply


def test_greedy_replies_are_deterministic(greedy_model: ChatModel) -> None:
    assert greedy_model.reply(TURNS) == greedy_model.reply(TURNS)


def test_min_new_tokens_forces_the_length(tiny_model_dir: Path) -> None:  # noqa: F811
    chat = ChatModel.load(model_settings(tiny_model_dir, max_new_tokens=8, min_new_tokens=8))
    assert chat.reply(TURNS).new_tokens == 8


def test_greedy_generation_passes_no_sampling_flags(
    greedy_model: ChatModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = GenerateSpy(greedy_model.model.generate)
    monkeypatch.setattr(greedy_model.model, "generate", spy)

    greedy_model.reply(TURNS)

    assert spy.kwargs["do_sample"] is False
    assert spy.kwargs["max_new_tokens"] == 8
    assert spy.kwargs["eos_token_id"] == [greedy_model.tokenizer.eos_token_id]
    assert spy.kwargs["pad_token_id"] == greedy_model.tokenizer.eos_token_id
    # Repeated n-grams are banned by our processor, which skips batch padding.
    [ngrams] = spy.kwargs["logits_processor"]
    assert isinstance(ngrams, NoRepeatNGramsAfterPadding)
    assert ngrams.ngram_size == greedy_model.settings.no_repeat_ngram_size
    assert "no_repeat_ngram_size" not in spy.kwargs
    assert torch.equal(spy.kwargs["attention_mask"], torch.ones_like(spy.kwargs["attention_mask"]))
    for flag in ("temperature", "top_k", "top_p", "min_new_tokens"):
        assert flag not in spy.kwargs


@pytest.mark.parametrize(
    ("configured", "expected"),
    [(None, [7]), (7, [7]), ([7, 106], [7, 106]), ([106, 7], [7, 106]), ((1, 2), [7, 1, 2])],
)
def test_stop_tokens_are_the_tokenizers_eos_and_the_models_own(
    configured: object, expected: list[int]
) -> None:
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=configured))
    assert stop_token_ids(model, SimpleNamespace(eos_token_id=7)) == expected


def test_a_reply_stops_at_an_end_of_turn_token_the_model_lists(
    tiny_model_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Chat models (Gemma's <end_of_turn>) name their own stop token in generation_config."""
    from transformers import GenerationConfig

    # No token twice (n-grams of 1): the tiny model would repeat one token all along.
    settings = {"max_new_tokens": 8, "min_new_tokens": 4, "no_repeat_ngram_size": 1}
    plain = ChatModel.load(model_settings(tiny_model_dir, **settings))
    free = plain.generate_batch([plain.prompt_ids(TURNS)])[0]
    eos = plain.tokenizer.eos_token_id
    # A token first said after the minimum length plays the model's end-of-turn token
    # (before it, the minimum length holds back every stop token).
    later = [i for i in range(4, len(free)) if free[i] != eos and free[i] not in free[:i]]
    assert later, f"the tiny model's reply has no fresh token to stop at: {free}"
    stop_at = later[0]

    listing = tmp_path / "model"
    shutil.copytree(tiny_model_dir, listing)
    config = GenerationConfig.from_pretrained(listing)
    config.eos_token_id = [eos, free[stop_at]]
    config.save_pretrained(listing)
    chat = ChatModel.load(model_settings(listing, **settings))

    assert chat.generate_batch([chat.prompt_ids(TURNS)])[0] == free[: stop_at + 1]


def test_sampling_passes_its_flags(
    tiny_model_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chat = ChatModel.load(
        model_settings(
            tiny_model_dir,
            do_sample=True,
            temperature=0.9,
            top_k=20,
            top_p=0.8,
            min_new_tokens=2,
            no_repeat_ngram_size=0,
        )
    )
    spy = GenerateSpy(chat.model.generate)
    monkeypatch.setattr(chat.model, "generate", spy)

    reply = chat.reply(TURNS)

    assert 2 <= reply.new_tokens <= 8
    # worker.sampling draws the token among the top-k; generate's argmax then takes it.
    assert spy.kwargs["do_sample"] is False
    [sampler] = spy.kwargs["logits_processor"]
    assert isinstance(sampler, SampleAmongTopK)
    assert (sampler.temperature, sampler.top_k, sampler.top_p) == (0.9, 20, 0.8)
    for flag in ("temperature", "top_k", "top_p", "no_repeat_ngram_size"):
        assert flag not in spy.kwargs
    assert spy.kwargs["min_new_tokens"] == 2


def test_sampling_without_top_k_is_left_to_transformers(
    tiny_model_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chat = ChatModel.load(
        model_settings(tiny_model_dir, do_sample=True, temperature=0.9, top_k=0, top_p=0.8)
    )
    spy = GenerateSpy(chat.model.generate)
    monkeypatch.setattr(chat.model, "generate", spy)

    chat.reply(TURNS)

    assert spy.kwargs["do_sample"] is True
    assert (spy.kwargs["temperature"], spy.kwargs["top_k"], spy.kwargs["top_p"]) == (0.9, 0, 0.8)
    # Only the n-gram ban: transformers' own warpers sample, after it.
    assert [type(p) for p in spy.kwargs["logits_processor"]] == [NoRepeatNGramsAfterPadding]


def test_sampled_replies_vary(tiny_model_dir: Path) -> None:  # noqa: F811
    chat = ChatModel.load(
        model_settings(tiny_model_dir, do_sample=True, temperature=1.0, top_k=50, top_p=0.95)
    )
    torch.manual_seed(11)
    replies = {chat.reply(TURNS).text for _ in range(6)}
    assert len(replies) > 1, "sampling on, yet every reply was the same"


@pytest.mark.parametrize("batch_size", [1, 4])
def test_loading_and_every_generation_run_on_one_thread(
    tiny_model_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    batch_size: int,
) -> None:
    """A second thread running torch would get an OpenMP pool of its own (ChatModel)."""
    threads: dict[str, set[int]] = {"load": set(), "generate": set()}
    real_load = model_module.AutoModelForCausalLM.from_pretrained

    def loading(*args: Any, **kwargs: Any) -> Any:
        threads["load"].add(threading.get_ident())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(model_module.AutoModelForCausalLM, "from_pretrained", loading)
    chat = ChatModel.load(model_settings(tiny_model_dir, generation_batch_size=batch_size))
    real_generate = chat.model.generate

    def generating(*args: Any, **kwargs: Any) -> Any:
        threads["generate"].add(threading.get_ident())
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(chat.model, "generate", generating)
    callers = [threading.Thread(target=chat.reply, args=(TURNS,)) for _ in range(3)]
    for caller in callers:
        caller.start()
    chat.reply(TURNS)
    for caller in callers:
        caller.join()

    torch_thread = chat.torch_thread.submit(threading.get_ident).result()
    assert threads == {"load": {torch_thread}, "generate": {torch_thread}}
    assert torch_thread != threading.get_ident()


def test_a_failed_load_leaves_no_torch_thread(tmp_path: Path) -> None:
    def torch_threads() -> int:
        return sum(t.name.startswith("torch") for t in threading.enumerate())

    before = torch_threads()
    # Held, as a caller that logs or re-raises it would: its traceback keeps the loader's
    # frame, and with it the executor, from being collected.
    with pytest.raises(OSError) as failure:
        ChatModel.load(model_settings(tmp_path / "no-model-here"))

    deadline = time.monotonic() + 5
    while torch_threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert torch_threads() == before
    assert failure.value is not None


def test_only_eos_falls_back_to_the_canned_reply(
    greedy_model: ChatModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    eos = greedy_model.tokenizer.eos_token_id

    def only_eos(inputs: torch.Tensor, **_: Any) -> torch.Tensor:
        return torch.cat([inputs, torch.tensor([[eos]], device=inputs.device)], dim=1)

    monkeypatch.setattr(greedy_model.model, "generate", only_eos)

    reply = greedy_model.reply(TURNS)

    assert reply == GeneratedReply(
        greedy_model.settings.fallback_reply, new_tokens=1, used_fallback=True
    )


def test_whitespace_only_falls_back(
    greedy_model: ChatModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    spaces = greedy_model.tokenizer.encode("   \n ", add_special_tokens=False)

    def blank(inputs: torch.Tensor, **_: Any) -> torch.Tensor:
        return torch.cat([inputs, torch.tensor([spaces], device=inputs.device)], dim=1)

    monkeypatch.setattr(greedy_model.model, "generate", blank)

    reply = greedy_model.reply(TURNS)

    assert reply.used_fallback
    assert reply.text == greedy_model.settings.fallback_reply
    assert reply.new_tokens == len(spaces)


def test_chat_template_model_replies(tiny_chat_model_dir: Path) -> None:  # noqa: F811
    chat = ChatModel.load(model_settings(tiny_chat_model_dir, system_prompt="Be brief."))
    reply = chat.reply(TURNS)
    assert reply.text
    assert 0 < reply.new_tokens <= 8


def test_a_long_history_still_leaves_room_for_the_reply(greedy_model: ChatModel) -> None:
    reply = greedy_model.reply(TURNS * 60)
    assert 0 < reply.new_tokens <= 8


# --- get_model -----------------------------------------------------------------------------


@pytest.fixture
def env_settings(
    tiny_model_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[None]:
    monkeypatch.setenv("MODEL_NAME", str(tiny_model_dir))
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("MAX_NEW_TOKENS", "8")
    monkeypatch.setattr(model_module, "_model", None)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.usefixtures("env_settings")
def test_get_model_loads_once_per_process(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tiny_model_dir: Path,  # noqa: F811
) -> None:
    real_load = ChatModel.load
    loads: list[Settings] = []

    def counting_load(settings: Settings) -> ChatModel:
        loads.append(settings)
        time.sleep(0.05)  # widen the race window for the threads below
        return real_load(settings)

    monkeypatch.setattr(ChatModel, "load", counting_load)
    caplog.set_level(logging.INFO, logger="worker.model")

    barrier = threading.Barrier(4)
    results: list[ChatModel] = []

    def call() -> None:
        barrier.wait()
        results.append(get_model())

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first = get_model()
    second = get_model()

    assert len(loads) == 1
    assert loads[0].model_name == str(tiny_model_dir)
    assert len(results) == 4
    assert all(result is first for result in [*results, second])
    lines = [r.getMessage() for r in caplog.records if "model loaded" in r.getMessage()]
    assert len(lines) == 1
    assert re.fullmatch(
        rf"model loaded name={re.escape(str(tiny_model_dir))} device=cpu pid=\d+ seconds=\d+\.\d\d",
        lines[0],
    )
    assert first.reply(TURNS).new_tokens <= 8


# --- tiny model builder --------------------------------------------------------------------


def test_tiny_model_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a", seed=3)
    second = build_tiny_model(tmp_path / "b", seed=3)
    other = build_tiny_model(tmp_path / "c", seed=4)

    for name in ("model.safetensors", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_tiny_model_cli_prints_the_model_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "cli"
    assert (
        tiny_model_main([str(target), "--layers", "1", "--context", "64", "--chat-template"]) == 0
    )

    assert f"MODEL_NAME={target.resolve()}" in capsys.readouterr().out.splitlines()
    chat = ChatModel.load(model_settings(target, max_new_tokens=4))
    assert chat.max_context_tokens == 64
    assert chat.model.config.n_layer == 1
    assert chat.tokenizer.chat_template
    assert chat.reply(TURNS).new_tokens <= 4
