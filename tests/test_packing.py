"""MODEL_PACKED_LINEAR: linear layers with oneDNN-laid-out weights compute what the
originals do, to rounding, through the production loading path."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import worker.packing
from common.settings import Settings
from tests.fixtures_model import load_raw, model_settings, tiny_model_dir  # noqa: F401
from worker.context import Turn
from worker.model import ChatModel
from worker.packing import PackedLinear, pack_linear_layers, packing_unavailable

pytestmark = pytest.mark.skipif(
    packing_unavailable() is not None, reason=f"{packing_unavailable()}"
)

CONVERSATIONS = [
    [Turn("user", "hi")],
    [Turn("user", "Hola"), Turn("assistant", "¿En qué te ayudo?"), Turn("user", "mi pedido")],
    [Turn("user", "Can I change the delivery address after paying?")],
]


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_packed_linear_computes_what_linear_and_conv1d_compute(rows: int) -> None:
    torch.manual_seed(4)
    linear, conv = nn.Linear(32, 48), Conv1D(48, 32)
    nn.init.normal_(conv.bias)
    inputs = torch.randn(2, rows, 32)

    with torch.inference_mode():
        for layer in (linear, conv):
            packed = PackedLinear.replacing(layer)
            assert packed is not None
            assert (packed.in_features, packed.out_features) == (32, 48)
            torch.testing.assert_close(packed(inputs), layer(inputs), atol=1e-5, rtol=1e-5)


def test_only_float32_linear_layers_are_packed() -> None:
    assert PackedLinear.replacing(nn.Linear(4, 4, dtype=torch.bfloat16)) is None
    assert PackedLinear.replacing(nn.LayerNorm(4)) is None


def test_packing_keeps_the_models_logits_to_rounding(tiny_model_dir: Path) -> None:  # noqa: F811
    reference, packed = load_raw(tiny_model_dir), load_raw(tiny_model_dir)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(5))

    count = pack_linear_layers(packed, "cpu")

    assert count == 4 * reference.config.n_layer + 1  # four per block, and the output layer
    assert not any(isinstance(m, nn.Linear | Conv1D) for m in packed.modules())
    with torch.inference_mode():
        expected, got = reference(ids).logits, packed(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_packing_leaves_no_tensor_viewing_the_loaded_weights(tiny_model_dir: Path) -> None:  # noqa: F811
    """What is left after packing owns its memory, so the weights file can be unmapped."""
    model = load_raw(tiny_model_dir)
    loaded = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}

    pack_linear_layers(model, "cpu")

    left = [t for t in model.state_dict().values() if not t.is_mkldnn]
    assert left, "embeddings, norms and biases stay ordinary tensors"
    assert not {t.untyped_storage().data_ptr() for t in left} & loaded


def test_packed_model_loads_and_batched_replies_equal_unbatched(
    tiny_model_dir: Path,  # noqa: F811
) -> None:
    chat = ChatModel.load(
        model_settings(
            tiny_model_dir, min_new_tokens=8, model_packed_linear=True, generation_batch_size=8
        )
    )
    plain = ChatModel.load(model_settings(tiny_model_dir, min_new_tokens=8))
    assert any(isinstance(m, PackedLinear) for m in chat.model.modules())
    prompts = [chat.prompt_ids(turns) for turns in CONVERSATIONS]

    alone = [chat.generate_batch([prompt])[0] for prompt in prompts]
    together = chat.generate_batch(prompts)

    assert together == alone
    assert alone == [plain.generate_batch([prompt])[0] for prompt in prompts]
    assert len({tuple(ids) for ids in alone}) > 1, "replies must differ to catch a row mix-up"


def test_a_torch_without_the_operators_stops_the_load_with_a_clear_error(
    tiny_model_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker.packing, "packing_unavailable", lambda: "no oneDNN here")

    with pytest.raises(RuntimeError, match="MODEL_PACKED_LINEAR=true cannot run: no oneDNN"):
        ChatModel.load(model_settings(tiny_model_dir, model_packed_linear=True))


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"model_dtype": "bfloat16"}, "MODEL_DTYPE"),
        ({"device": "cuda"}, "DEVICE"),
        ({"model_quantization": "int8"}, "choose one"),
    ],
)
def test_settings_refuse_packing_with_what_it_cannot_run_on(
    overrides: dict[str, str], named: str
) -> None:
    with pytest.raises(pydantic.ValidationError, match=named):
        Settings(_env_file=None, model_packed_linear=True, **overrides)


def test_settings_take_packing_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).model_packed_linear is False
    monkeypatch.setenv("MODEL_PACKED_LINEAR", "true")
    assert Settings(_env_file=None).model_packed_linear is True
