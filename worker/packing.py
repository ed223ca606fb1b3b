"""float32 linear layers with weights laid out once for oneDNN, for generation on CPU.

`nn.Linear` on CPU hands every product to a general matrix routine that reads the weight
in its stored layout each time. Decoding multiplies a few rows by the same weights
hundreds of times per reply, and oneDNN can lay each weight out once, in the blocked
format its kernels read: a decoding step's products then ran 2-4x faster on 2 cores
(bench/HISTORY.md, section 3). torch's own compiler does the same when it freezes a model
for CPU (`torch.ops.mkldnn._linear_pointwise` on weights from
`torch.ops.mkldnn._reorder_linear_weight`); here it is done without compiling, so nothing
is recompiled when batch sizes or prompt lengths change.

Those two operators are internal to torch (2.13, pinned in requirements.txt); a torch
without them, or without oneDNN, stops the worker at start-up with a clear line. Results
differ from `nn.Linear`'s by rounding (about 1e-6 in the logits). The packed weights are
private to each process, where unpacked ones are file pages that prefork children share,
and the output layer's packed weight repeats the input embeddings' matrix: RSS grows by
~160 MB for DialoGPT-small (bench/HISTORY.md, section 3), which is why
`MODEL_PACKED_LINEAR` is opt-in.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from worker.quantization import require_cpu

# The batch the layout is chosen for; any number of rows works with it.
LAYOUT_ROWS_HINT = 16


def packing_unavailable() -> str | None:
    """Why this torch cannot pack linear layers, or None when it can."""
    if not torch.backends.mkldnn.is_available():
        return "this torch has no oneDNN (mkldnn)"
    for name in ("_reorder_linear_weight", "_linear_pointwise"):
        if not hasattr(torch.ops.mkldnn, name):
            return f"this torch has no torch.ops.mkldnn.{name}"
    return None


class PackedLinear(nn.Module):
    """`inputs @ weight.T + bias`, with `weight` (out by in) laid out for oneDNN once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), LAYOUT_ROWS_HINT)
        self.register_buffer("packed_weight", packed, persistent=False)
        # The bias may still view the weights file: pack_linear_layers copies it out later.
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    @classmethod
    def replacing(cls, layer: nn.Module) -> PackedLinear | None:
        """The packed twin of a float32 `nn.Linear` or GPT-2 `Conv1D`, else None."""
        if isinstance(layer, nn.Linear) and layer.weight.dtype == torch.float32:
            return cls(layer.weight, layer.bias)
        if isinstance(layer, Conv1D) and layer.weight.dtype == torch.float32:
            return cls(layer.weight.t().contiguous(), layer.bias)  # Conv1D stores in by out
        return None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(
            inputs, self.packed_weight, self.bias, "none", [], ""
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN"


def pack_linear_layers(model: nn.Module, device: str) -> int:
    """Replace every float32 linear layer (GPT-2's `Conv1D` too) in place; how many.

    The output layer too: it shares its weight with the input embeddings, so packing it
    keeps a second copy of that matrix (154 MB for DialoGPT-small), the price of the
    largest product of every decoding step running ~4x faster.
    """
    require_cpu("MODEL_PACKED_LINEAR=true", device)
    missing = packing_unavailable()
    if missing is not None:
        raise RuntimeError(f"MODEL_PACKED_LINEAR=true cannot run: {missing}")
    packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            twin = PackedLinear.replacing(child)
            if twin is not None:
                setattr(parent, name, twin)  # one layer at a time: the old weight goes now
                packed += 1
    copy_out_of_the_weights_file(model)
    return packed


def copy_out_of_the_weights_file(model: nn.Module) -> None:
    """Give the tensors packing left (embeddings, norms, biases) memory of their own.

    transformers reads safetensors through a memory map and the tensors view it, so the
    whole file stays resident while any of them is alive. Copied out, the few left take
    their own ~160 MB (DialoGPT-small) and the file is unmapped: RSS 1363 -> 1031 MB
    against 878 unpacked (bench/HISTORY.md, section 3).
    """
    with torch.no_grad():
        for module in model.modules():
            for parameter in module.parameters(recurse=False):
                parameter.data = parameter.data.clone()
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None and not buffer.is_mkldnn:
                    setattr(module, name, buffer.clone())
