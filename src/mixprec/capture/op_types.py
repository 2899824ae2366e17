"""How torch modules and functions map to the sim config's ONNX-style op types, and which only move data."""

from __future__ import annotations

import operator
from collections.abc import Callable

from torch import nn

# Dunder/in-place spellings that mean the same function as their plain name.
_CANONICAL = {
    "__add__": "add",
    "__radd__": "add",
    "__iadd__": "add",
    "__sub__": "sub",
    "__rsub__": "sub",
    "__isub__": "sub",
    "rsub": "sub",
    "__mul__": "mul",
    "__rmul__": "mul",
    "__imul__": "mul",
    "multiply": "mul",
    "__truediv__": "div",
    "__rtruediv__": "div",
    "__itruediv__": "div",
    "divide": "div",
    "true_divide": "div",
    "__matmul__": "matmul",
    "__rmatmul__": "matmul",
    "__neg__": "neg",
    "__pow__": "pow",
    "__rpow__": "pow",
    "__getitem__": "getitem",
    "__setitem__": "setitem",
    "concat": "cat",
    "concatenate": "cat",
    "truediv": "div",
}

_IN_PLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__"}

_FUNCTION_OP_TYPES = {
    "add": "Add",
    "sub": "Sub",
    "mul": "Mul",
    "div": "Div",
    "matmul": "MatMul",
    "bmm": "MatMul",
    "mm": "MatMul",
    "baddbmm": "MatMul",
    "einsum": "Einsum",
    "linear": "Gemm",
    "conv2d": "Conv",
    "conv1d": "Conv",
    "cat": "Concat",
    "stack": "Concat",
    "relu": "Relu",
    "relu6": "Clip",
    "hardtanh": "Clip",
    "clamp": "Clip",
    "softmax": "Softmax",
    "log_softmax": "LogSoftmax",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
    "gelu": "Gelu",
    "silu": "Silu",
    "exp": "Exp",
    "neg": "Neg",
    "pow": "Pow",
    "sqrt": "Sqrt",
    "rsqrt": "Rsqrt",
    "mean": "ReduceMean",
    "sum": "ReduceSum",
    "layer_norm": "LayerNormalization",
    "scaled_dot_product_attention": "ScaledDotProductAttention",
    "adaptive_avg_pool2d": "GlobalAveragePool",
    "avg_pool2d": "AveragePool",
    "max_pool2d": "MaxPool",
    "embedding": "Gather",
    "interpolate": "Resize",
    "reshape": "Reshape",
    "view": "Reshape",
    "flatten": "Flatten",
    "permute": "Transpose",
    "transpose": "Transpose",
    "squeeze": "Squeeze",
    "unsqueeze": "Unsqueeze",
    "getitem": "Slice",
    "split": "Split",
    "chunk": "Split",
    "expand": "Expand",
    "contiguous": "Identity",
}

DATA_MOVEMENT_FUNCTIONS = frozenset(
    {
        "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose",
        "t", "swapaxes", "swapdims", "movedim", "moveaxis", "squeeze", "unsqueeze", "getitem",
        "split", "split_with_sizes", "chunk", "unbind", "tensor_split", "contiguous", "expand",
        "expand_as", "repeat", "repeat_interleave", "tile", "narrow", "select", "index_select",
        "gather", "roll", "flip", "clone", "detach", "to", "float", "type_as", "type", "cpu",
        "cuda", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "broadcast_to", "dropout",
        "__get__", "attention_mask",
    }
)  # fmt: skip

_MODULE_OP_TYPES: dict[type, str] = {
    nn.Conv1d: "Conv",
    nn.Conv2d: "Conv",
    nn.Conv3d: "Conv",
    nn.ConvTranspose1d: "ConvTranspose",
    nn.ConvTranspose2d: "ConvTranspose",
    nn.ConvTranspose3d: "ConvTranspose",
    nn.Linear: "Gemm",
    nn.BatchNorm1d: "BatchNormalization",
    nn.BatchNorm2d: "BatchNormalization",
    nn.BatchNorm3d: "BatchNormalization",
    nn.LayerNorm: "LayerNormalization",
    nn.GroupNorm: "GroupNormalization",
    nn.InstanceNorm1d: "InstanceNormalization",
    nn.InstanceNorm2d: "InstanceNormalization",
    nn.ReLU: "Relu",
    nn.ReLU6: "Clip",
    nn.Hardtanh: "Clip",
    nn.LeakyReLU: "LeakyRelu",
    nn.PReLU: "PRelu",
    nn.ELU: "Elu",
    nn.Sigmoid: "Sigmoid",
    nn.Tanh: "Tanh",
    nn.GELU: "Gelu",
    nn.SiLU: "Silu",
    nn.Hardswish: "HardSwish",
    nn.Hardsigmoid: "HardSigmoid",
    nn.Softmax: "Softmax",
    nn.LogSoftmax: "LogSoftmax",
    nn.MaxPool1d: "MaxPool",
    nn.MaxPool2d: "MaxPool",
    nn.MaxPool3d: "MaxPool",
    nn.AvgPool1d: "AveragePool",
    nn.AvgPool2d: "AveragePool",
    nn.AvgPool3d: "AveragePool",
    nn.AdaptiveAvgPool1d: "GlobalAveragePool",
    nn.AdaptiveAvgPool2d: "GlobalAveragePool",
    nn.AdaptiveMaxPool2d: "GlobalMaxPool",
    nn.Embedding: "Gather",
    nn.Upsample: "Resize",
    nn.Flatten: "Flatten",
    nn.Unflatten: "Reshape",
    nn.Identity: "Identity",
    nn.Dropout: "Dropout",
    nn.Dropout1d: "Dropout",
    nn.Dropout2d: "Dropout",
    nn.Dropout3d: "Dropout",
    nn.AlphaDropout: "Dropout",
    nn.MultiheadAttention: "MultiheadAttention",
}

DATA_MOVEMENT_MODULES: tuple[type, ...] = (
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ChannelShuffle,
)

# Modules with children whose forward does not call those children (it reads their
# parameters directly), so they are quantized as one layer.
ATOMIC_MODULES: tuple[type, ...] = (nn.MultiheadAttention,)

WEIGHTED_OP_TYPES = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def function_name(func: Callable) -> str:
    """Canonical name of a torch function or Tensor method: ``Tensor.__iadd__`` and ``torch.add`` are ``add``."""
    if func is operator.getitem:
        return "getitem"
    name = getattr(func, "__name__", None) or type(func).__name__
    if name in _CANONICAL:
        return _CANONICAL[name]
    if name.endswith("_") and not name.endswith("__") and len(name) > 1:
        name = name[:-1]
    return _CANONICAL.get(name, name)


def known_function_names() -> frozenset[str]:
    """Canonical names of the functions with an op type of their own in the sim config."""
    return frozenset(_FUNCTION_OP_TYPES)


def is_in_place(func: Callable) -> bool:
    """True for ``Tensor.add_``-style methods and ``+=``-style dunders."""
    name = getattr(func, "__name__", "")
    if name in _IN_PLACE_DUNDERS or name == "__setitem__":
        return True
    return name.endswith("_") and not name.endswith("__")


def function_op_type(canonical: str) -> str:
    return _FUNCTION_OP_TYPES.get(canonical) or "".join(part.capitalize() for part in canonical.split("_"))


def module_op_type(module: nn.Module) -> str:
    for cls in type(module).__mro__:
        if cls in _MODULE_OP_TYPES:
            return _MODULE_OP_TYPES[cls]
    name = type(module).__name__
    if name.endswith("RMSNorm"):
        return "RMSNormalization"
    if name == "Conv1D":  # transformers' GPT-2 projection: a Linear with a transposed weight
        return "Gemm"
    return name


def is_linear_like(cls: type) -> bool:
    """Classes that compute ``x @ W + b`` like ``nn.Linear`` without subclassing it: transformers'
    ``Conv1D`` (GPT-2, GPT-J-style projections, weight stored transposed). ``set_precision(nn.Linear)``
    matches them too (docs/rules.md, "Type targets")."""
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_data_movement_module(module: nn.Module) -> bool:
    return isinstance(module, DATA_MOVEMENT_MODULES)


def weight_channel_axis(module: nn.Module | None, param_attr: str) -> int:
    """The output-channel axis of a weight, for per-channel quantization."""
    if module is None:
        return 0
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return 1
    if type(module).__name__ == "Conv1D":
        return 1
    return 0


def is_torch_internal_module(module_name: str) -> bool:
    """Frames of these modules implement torch functions; call sites are looked for above them."""
    return module_name in _TORCH_INTERNAL or module_name.startswith("torch._")


_TORCH_INTERNAL = frozenset(
    {
        "torch",
        "torch.overrides",
        "torch.functional",
        "torch.nn.functional",
        "torch._tensor",
        "torch._jit_internal",
        "torch.autograd.grad_mode",
        "torch.utils._contextlib",
    }
)
