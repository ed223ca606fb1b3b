"""Dynamic int8 quantisation of a loaded model, for CPU workers (`MODEL_QUANTIZATION=int8`).

Weights are stored as int8 and each matrix product quantises its input on the fly, so the
products run on the CPU's integer kernels (fbgemm on x86), faster than float32 on 2
cores (bench/HISTORY.md, section 3). It costs memory rather than saving it: the int8 copies
are private to each process (+142 MiB for the DialoGPT-small shape), while the float32
file stays mapped for the embeddings. Like bfloat16 it changes the model's arithmetic,
so replies can change: it is opt-in, to be checked on your model's replies first.

torch's `quantize_dynamic` only replaces `nn.Linear` layers. GPT-2 and with it DialoGPT
build attention and MLP from transformers' `Conv1D` (a linear layer with its weight
transposed), so those are rewritten as `nn.Linear` first: the same arithmetic, checked by
`tests/test_quantization.py`. `torch.ao.quantization` is deprecated in favour of
torchao, but torchao 0.18's dynamic int8 path, without `torch.compile`, generated 9
tokens/s here where float32 made 105 (DialoGPT-small shape, batch 16). So the torch API
stays, its deprecation warnings silenced, while torch ships it (2.13, pinned in
requirements.txt); a torch without it stops the worker at start-up with a clear line.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def require_cpu(option: str, device: str) -> None:
    """Refuse a CPU-only weight transform for a model on another device, left untouched.

    The settings refuse `DEVICE=cuda*` up front; this catches `DEVICE=auto` finding CUDA.
    """
    if device != "cpu":
        raise ValueError(
            f"{option} runs on the CPU only, and the model is on {device}: "
            f"set DEVICE=cpu, or leave {option} out (CUDA uses float16 by itself)"
        )


def conv1d_as_linear(layer: Conv1D) -> nn.Linear:
    """The `nn.Linear` computing what `layer` computes: `x @ W + b`, W stored in by out."""
    inputs, outputs = layer.weight.shape
    linear = nn.Linear(inputs, outputs, dtype=layer.weight.dtype, device=layer.weight.device)
    with torch.no_grad():
        linear.weight.copy_(layer.weight.t())
        linear.bias.copy_(layer.bias)
    return linear


def replace_conv1d(model: nn.Module) -> int:
    """Swap every `Conv1D` for its `nn.Linear`, in place; how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                setattr(parent, name, conv1d_as_linear(child))
                swapped += 1
    return swapped


def quantize_int8(model: nn.Module, device: str) -> int:
    """Quantise `model`'s linear layers to int8 in place; the number of layers quantised.

    CPU only: torch has no dynamic int8 kernels for CUDA.
    """
    require_cpu("MODEL_QUANTIZATION=int8", device)
    replace_conv1d(model)
    linear_layers = sum(isinstance(m, nn.Linear) for m in model.modules())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions")
        torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return linear_layers
