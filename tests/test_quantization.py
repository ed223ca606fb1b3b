"""MODEL_QUANTIZATION=int8: GPT-2's Conv1D layers become nn.Linear with the same
arithmetic, then every linear layer is int8, loaded through the production path. Also the
CUDA refusal that int8 shares with MODEL_PACKED_LINEAR."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydantic
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from common.settings import Settings
from tests.fixtures_model import load_raw, model_settings, tiny_model_dir  # noqa: F401
from worker.context import Turn
from worker.model import ChatModel
from worker.packing import pack_linear_layers
from worker.quantization import conv1d_as_linear, quantize_int8, replace_conv1d

QuantizedLinear = torch.ao.nn.quantized.dynamic.Linear
TURNS = [Turn("user", "Hola, ¿abren el domingo?")]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


def test_conv1d_as_linear_computes_the_same() -> None:
    torch.manual_seed(1)
    layer = Conv1D(48, 32)  # 32 inputs, 48 outputs
    nn.init.normal_(layer.bias)
    inputs = torch.randn(3, 5, 32)

    linear = conv1d_as_linear(layer)

    assert (linear.in_features, linear.out_features) == (32, 48)
    torch.testing.assert_close(linear(inputs), layer(inputs))


def test_replacing_conv1d_keeps_the_models_logits(tiny_model_dir: Path) -> None:  # noqa: F811
    reference, converted = load_raw(tiny_model_dir), load_raw(tiny_model_dir)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(2))

    swapped = replace_conv1d(converted)

    layers = reference.config.n_layer
    assert swapped == 4 * layers  # attention in/out and MLP in/out of each block
    assert not any(isinstance(m, Conv1D) for m in converted.modules())
    torch.testing.assert_close(logits(converted, ids), logits(reference, ids))


def test_int8_logits_stay_close_to_float32(tiny_model_dir: Path) -> None:  # noqa: F811
    reference, quantized = load_raw(tiny_model_dir), load_raw(tiny_model_dir)
    ids = torch.randint(0, 200, (3, 16), generator=torch.Generator().manual_seed(3))

    quantize_int8(quantized, "cpu")

    expected, got = logits(reference, ids), logits(quantized, ids)
    assert not torch.equal(got, expected)  # the arithmetic did change...
    similarity = nn.functional.cosine_similarity(got.flatten(1), expected.flatten(1), dim=1)
    assert similarity.min() > 0.99, similarity  # ...but only by rounding


def test_int8_model_loads_and_replies(tiny_model_dir: Path) -> None:  # noqa: F811
    chat = ChatModel.load(
        model_settings(tiny_model_dir, min_new_tokens=8, model_quantization="int8")
    )

    modules = list(chat.model.modules())
    layers = chat.model.config.n_layer
    assert sum(isinstance(m, QuantizedLinear) for m in modules) == 4 * layers + 1  # + lm_head
    assert not any(isinstance(m, nn.Linear | Conv1D) for m in modules)
    reply = chat.reply(TURNS)
    assert reply.new_tokens == 8
    assert reply.text


@pytest.mark.parametrize(
    ("transform", "option"),
    [(quantize_int8, "MODEL_QUANTIZATION=int8"), (pack_linear_layers, "MODEL_PACKED_LINEAR")],
)
def test_cpu_weight_transforms_refuse_cuda_and_leave_the_model(
    transform: Callable[[nn.Module, str], int],
    option: str,
    tiny_model_dir: Path,  # noqa: F811
) -> None:
    model = load_raw(tiny_model_dir)

    with pytest.raises(ValueError, match=f"{option}.*DEVICE=cpu"):
        transform(model, "cuda:0")

    assert any(isinstance(m, Conv1D) for m in model.modules())  # left as it was


@pytest.mark.parametrize(
    ("overrides", "named"),
    [({"model_dtype": "bfloat16"}, "MODEL_DTYPE"), ({"device": "cuda"}, "DEVICE")],
)
def test_settings_refuse_int8_with_what_it_cannot_run_on(
    overrides: dict[str, str], named: str
) -> None:
    with pytest.raises(pydantic.ValidationError, match=named):
        Settings(_env_file=None, model_quantization="int8", **overrides)


def test_settings_take_int8_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_QUANTIZATION", "int8")
    assert Settings(_env_file=None).model_quantization == "int8"
    monkeypatch.setenv("MODEL_QUANTIZATION", "int4")
    with pytest.raises(pydantic.ValidationError, match="model_quantization"):
        Settings(_env_file=None)
