"""Hypothesis strategies: random traceable models and random sequences of precision requests.

A model is a small random *program* (:class:`ModelSpec`): a list of ops over a growing list
of values, interpreted by :class:`ProgramModel`'s forward. Every value is a ``(1, C, 4, 4)``
float tensor (``C`` in 4, 8, 12, 16), so convs, linears (on the last dim), element-wise ops,
concats and reshape/permute chains compose freely and the forward stays eager-traceable.
Module ops live in non-leaf containers (``groups.0.inner.op3``), and some ops are non-leaf
modules themselves (``nn.Sequential(Conv, BN, ReLU)``, an ``AddRelu`` module whose forward
makes a functional ``add``), so leaf, non-leaf, type, function and name targets all exist.

Requests (:class:`RequestSpec`) are plain data with a readable repr, drawn against a built sim
(``request_sequences(sim)``) and issued with :meth:`RequestSpec.issue`.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from mixprec.capture.op_types import function_name

PRECISIONS = ("int4", "int8", "int16", "fp16", "bf16", "fp32")
HW = 4  # every value is (1, C, HW, HW); nn.Linear acts on the last dim
CHANNELS = (4, 8, 12, 16)
VOCAB = 10

# op kind -> number of value operands
UNARY = ("conv", "linear", "conv_relu", "conv_bn_relu", "conv_bn", "linear_relu", "relu_mod", "residual",
         "relu_f", "softmax", "sub_mean", "const", "scalar", "dm", "identity_mod")  # fmt: skip
BINARY = ("add", "add_t", "mul", "matmul", "cat", "add_relu_f", "add_relu_mod")
DM_CHAINS = (
    "permute",  # x.permute(0, 1, 3, 2)
    "reshape",  # x.reshape(1, C, 16).reshape(1, C, 4, 4)
    "flatten_view",  # torch.flatten(x, 2).view(1, C, 4, 4)
    "transpose_contiguous",  # x.transpose(2, 3).contiguous()
    "unsqueeze_squeeze",  # x.unsqueeze(0).squeeze(0)
)


@dataclass(frozen=True)
class Op:
    """One program step: ``kind`` over value indices ``args``; ``extra`` holds kind-specific choices."""

    kind: str
    args: tuple[int, ...] = ()
    extra: tuple = ()
    group: int = 0  # container of the op's module: groups[group] (or groups[group].inner)
    inner: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """A random model: float inputs, an optional int ids input (-> Embedding), ops and outputs.

    Values are numbered: float inputs first, then one value per op (``embed`` included).
    ``outputs`` is a nested structure of value indices (``"ids"`` for the int input).
    """

    n_inputs: int
    with_ids: bool
    ops: tuple[Op, ...]
    outputs: Any
    n_groups: int
    seed: int = 0
    keywords: bool = False  # dummy_input is a dict of keyword inputs x0, x1, ..., ids

    def input_names(self) -> list[str]:
        return [f"x{i}" for i in range(self.n_inputs)] + (["ids"] if self.with_ids else [])

    def example_input(self) -> tuple[torch.Tensor, ...] | dict[str, torch.Tensor]:
        """A tuple of positional inputs, or a dict of keyword inputs (``keywords``)."""
        g = torch.Generator().manual_seed(self.seed + 1)
        xs = [torch.randn(1, 4, HW, HW, generator=g) for _ in range(self.n_inputs)]
        if self.with_ids:
            xs.append(torch.randint(0, VOCAB, (1, 4, HW), generator=g))
        return dict(zip(self.input_names(), xs, strict=True)) if self.keywords else tuple(xs)

    def build(self) -> ProgramModel:
        torch.manual_seed(self.seed)
        return ProgramModel(self).eval()


class Container(nn.Module):
    """A non-leaf module that only holds children (its forward is never called)."""


class AddRelu(nn.Module):
    """A non-leaf module whose forward makes a functional add (Add+Relu supergroup with its ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.relu(a + b)


class Residual(nn.Module):
    """conv(x) + x, then ReLU: a functional add inside a container, reading x twice over."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x) + x)


def _make_module(op: Op, channels: list[int]) -> nn.Module | None:
    k = op.kind
    c = channels[op.args[0]] if op.args else 4
    if k == "conv":
        cout, ksize, bias = op.extra
        return nn.Conv2d(c, cout, ksize, padding=ksize // 2, bias=bias)
    if k == "linear":
        return nn.Linear(HW, HW, bias=op.extra[0])
    if k == "conv_relu":
        return nn.Sequential(nn.Conv2d(c, op.extra[0], 1), nn.ReLU())
    if k == "conv_bn_relu":
        return nn.Sequential(nn.Conv2d(c, op.extra[0], 3, padding=1), nn.BatchNorm2d(op.extra[0]), nn.ReLU())
    if k == "conv_bn":
        return nn.Sequential(nn.Conv2d(c, op.extra[0], 1), nn.BatchNorm2d(op.extra[0]))
    if k == "linear_relu":
        return nn.Sequential(nn.Linear(HW, HW), nn.ReLU())
    if k == "relu_mod":
        return nn.ReLU()
    if k == "identity_mod":
        return nn.Identity()
    if k == "residual":
        return Residual(c)
    if k == "add_relu_mod":
        return AddRelu()
    if k == "embed":
        return nn.Embedding(VOCAB, HW)
    return None


def out_channels(op: Op, channels: list[int]) -> int:
    """Channel count of the value an op produces."""
    k = op.kind
    if k == "embed":
        return 4
    if k == "reuse":
        return channels[op.args[0]] if op.extra[1] != "conv" else op.extra[2]
    if k in ("conv", "conv_relu", "conv_bn_relu", "conv_bn"):
        return op.extra[0]
    if k == "cat":
        return channels[op.args[0]] + channels[op.args[1]]
    if k == "chunk":
        return channels[op.args[0]] // 2
    return channels[op.args[0]]


class ProgramModel(nn.Module):
    """Interprets a :class:`ModelSpec`; every functional call sits on its own line (one call site)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.groups = nn.ModuleList(Container() for _ in range(spec.n_groups))
        for g in self.groups:
            g.inner = Container()
        self.register_buffer("const", torch.linspace(-1.0, 1.0, HW))
        self.paths: dict[int, str] = {}
        channels = [4] * spec.n_inputs
        for i, op in enumerate(spec.ops):
            module = _make_module(op, channels)
            if module is not None:
                holder = self.groups[op.group].inner if op.inner else self.groups[op.group]
                holder.add_module(f"op{i}", module)
                prefix = f"groups.{op.group}.inner" if op.inner else f"groups.{op.group}"
                self.paths[i] = f"{prefix}.op{i}"
            channels.append(out_channels(op, channels))

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        spec = self.spec
        inputs = args or tuple(kwargs[k] for k in spec.input_names())
        values: list[torch.Tensor] = list(inputs[: spec.n_inputs])
        ids = inputs[spec.n_inputs] if spec.with_ids else None
        for i, op in enumerate(spec.ops):
            values.append(self._step(i, op, values, ids))
        return _structure(spec.outputs, values, ids)

    def _module(self, i: int) -> nn.Module:
        return self.get_submodule(self.paths[i])

    def _step(self, i: int, op: Op, v: list[torch.Tensor], ids: torch.Tensor | None) -> torch.Tensor:
        k, a = op.kind, op.args
        if k == "embed":
            return self._module(i)(ids)
        if k in ("conv", "linear", "conv_relu", "conv_bn_relu", "conv_bn", "linear_relu", "relu_mod",
                 "identity_mod", "residual"):  # fmt: skip
            return self._module(i)(v[a[0]])
        if k == "add_relu_mod":
            return self._module(i)(v[a[0]], v[a[1]])
        if k == "reuse":
            return self._module(op.extra[0])(v[a[0]])
        if k == "add":
            return v[a[0]] + v[a[1]]
        if k == "add_t":
            return torch.add(v[a[0]], v[a[1]])
        if k == "mul":
            return v[a[0]] * v[a[1]]
        if k == "matmul":
            return torch.matmul(v[a[0]], v[a[1]]) / HW
        if k == "cat":
            return torch.cat([v[a[0]], v[a[1]]], dim=1)
        if k == "add_relu_f":
            return F.relu(v[a[0]] + v[a[1]])
        if k == "relu_f":
            return F.relu(v[a[0]])
        if k == "softmax":
            return F.softmax(v[a[0]], dim=-1)
        if k == "sub_mean":
            x = v[a[0]]
            return x - x.mean(dim=-1, keepdim=True)
        if k == "const":
            return v[a[0]] + self.const
        if k == "scalar":
            return v[a[0]] * 0.5
        if k == "chunk":
            return torch.chunk(v[a[0]], 2, dim=1)[op.extra[0]]
        if k == "dm":
            return _chain(op.extra[0], v[a[0]])
        raise AssertionError(f"unknown op {k}")


def _chain(name: str, x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    if name == "permute":
        return x.permute(0, 1, 3, 2)
    if name == "reshape":
        return x.reshape(1, c, HW * HW).reshape(1, c, HW, HW)
    if name == "flatten_view":
        return torch.flatten(x, 2).view(1, c, HW, HW)
    if name == "transpose_contiguous":
        return x.transpose(2, 3).contiguous()
    return x.unsqueeze(0).squeeze(0)


def _structure(outputs: Any, values: list[torch.Tensor], ids: torch.Tensor | None) -> Any:
    if isinstance(outputs, dict):
        return {k: _structure(o, values, ids) for k, o in outputs.items()}
    if isinstance(outputs, tuple):
        return tuple(_structure(o, values, ids) for o in outputs)
    if isinstance(outputs, list):
        return [_structure(o, values, ids) for o in outputs]
    return ids if outputs == "ids" else values[outputs]


# -- model strategy ---------------------------------------------------------------------------------


@st.composite
def model_specs(draw: st.DrawFn, max_ops: int = 9) -> ModelSpec:
    """A random :class:`ModelSpec` (see the module docstring)."""
    n_inputs = draw(st.integers(1, 3))
    with_ids = draw(st.booleans())
    n_groups = draw(st.integers(1, 3))
    channels = [4] * n_inputs
    consumed: set[int] = set()
    ops: list[Op] = []

    def value(pool: list[int] | None = None) -> int:
        pool = list(range(len(channels))) if pool is None else pool
        # prefer recent values (deep chains) but reach back sometimes (shared tensors)
        return draw(st.sampled_from(pool[::-1]))

    def place() -> dict[str, Any]:
        return {"group": draw(st.integers(0, n_groups - 1)), "inner": draw(st.booleans())}

    if with_ids:
        ops.append(Op("embed", (), (), **place()))
        channels.append(4)
    for _ in range(draw(st.integers(1, max_ops))):
        kinds = list(UNARY + BINARY)
        if any(c in (8, 16) for c in channels):
            kinds.append("chunk")
        reusable = [i for i, o in enumerate(ops) if o.kind in ("conv", "linear", "relu_mod")]
        if reusable:
            kinds.append("reuse")
        kind = draw(st.sampled_from(kinds))
        if kind in UNARY:
            a = value()
            extra: tuple = ()
            if kind == "conv":
                extra = (draw(st.sampled_from((4, 8))), draw(st.sampled_from((1, 3))), draw(st.booleans()))
            elif kind in ("conv_relu", "conv_bn_relu", "conv_bn"):
                extra = (draw(st.sampled_from((4, 8))),)
            elif kind == "linear":
                extra = (draw(st.booleans()),)
            elif kind == "dm":
                extra = (draw(st.sampled_from(DM_CHAINS)),)
            op = Op(kind, (a,), extra, **place())
        elif kind in BINARY:
            a = value()
            if kind == "cat":
                pool = [j for j, c in enumerate(channels) if c + channels[a] <= max(CHANNELS)]
            else:
                pool = [j for j, c in enumerate(channels) if c == channels[a]]
            if not pool:
                pool = [a] if kind != "cat" else []
            if not pool:
                op = Op("relu_f", (a,))
            else:
                op = Op(kind, (a, value(pool)), (), **place())
        elif kind == "chunk":
            a = value([j for j, c in enumerate(channels) if c in (8, 16)])
            op = Op("chunk", (a,), (draw(st.integers(0, 1)),))
        else:  # reuse an earlier module at a new call site (tied weights for convs/linears)
            target = draw(st.sampled_from(reusable))
            t = ops[target]
            target_value = n_inputs + target
            if t.kind == "conv":
                cin = channels[t.args[0]]
                pool = [j for j, c in enumerate(channels) if c == cin and j != target_value]
                if not pool:
                    pool = [t.args[0]]
                op = Op("reuse", (value(pool),), (target, "conv", t.extra[0]))
            else:
                op = Op("reuse", (value(),), (target, t.kind, None))
        ops.append(op)
        consumed.update(op.args)
        channels.append(out_channels(op, channels))
    if all(o.kind in ("dm", "identity_mod", "chunk") for o in ops):
        ops.append(Op("relu_f", (len(channels) - 1,)))  # capture needs one compute layer
        consumed.add(len(channels) - 1)
        channels.append(channels[-1])
    n_values = len(channels)
    sinks = [j for j in range(n_inputs, n_values) if j not in consumed]
    if with_ids:
        sinks = [j for j in sinks if ops[j - n_inputs].kind != "embed"] or sinks
    extra_outputs = draw(st.lists(st.integers(0, n_values - 1), max_size=2, unique=True))
    leaves: list[Any] = sinks[-3:] + [j for j in extra_outputs if j not in sinks[-3:]]
    if not leaves:
        leaves = [n_values - 1]
    if with_ids and draw(st.integers(0, 4)) == 0:
        leaves.append("ids")  # a non-float model output
    shape = draw(st.sampled_from(("flat", "single", "nested", "dict")))
    if len(leaves) == 1 and shape == "single":
        outputs: Any = leaves[0]
    elif len(leaves) >= 3 and shape == "nested":
        outputs = (leaves[0], list(leaves[1:]))  # nested: (a, [b, c])
    elif len(leaves) >= 2 and shape == "dict":
        outputs = {"first": leaves[0], "rest": tuple(leaves[1:])}
    else:
        outputs = tuple(leaves)
    seed = draw(st.integers(0, 3))
    keywords = draw(st.integers(0, 3)) == 0
    return ModelSpec(n_inputs, with_ids, tuple(ops), outputs, n_groups, seed, keywords)


# -- sim configs ---------------------------------------------------------------------------------------

CONFIGS = ("default", "per_channel", "edge_strict", "input_quantized", "softmax_unquantized")


def sim_config(name: str) -> Any:
    """A preset name, or a dict variant of the default preset exercising other placements."""
    if name in ("default", "per_channel", "edge_strict"):
        return name
    from mixprec.config.rules import load_config

    data = load_config("default").to_dict()
    op_type = dict(data.get("op_type", {}))
    if name == "input_quantized":  # own input quantizers on element-wise ops and concat
        for t in ("Add", "Mul", "Concat"):
            op_type[t] = {**op_type.get(t, {}), "is_input_quantized": "True"}
    else:  # an op whose output is unquantized by config and may have several readers
        op_type["Softmax"] = {**op_type.get("Softmax", {}), "is_output_quantized": "False"}
    data["op_type"] = op_type
    return data


# -- requests ------------------------------------------------------------------------------------------

TYPES: dict[str, type] = {
    "Conv2d": nn.Conv2d,
    "Linear": nn.Linear,
    "ReLU": nn.ReLU,
    "BatchNorm2d": nn.BatchNorm2d,
    "Embedding": nn.Embedding,
    "AvgPool2d": nn.AvgPool2d,  # matches nothing: not an error, reported as unmatched
}
FUNCTIONS: dict[str, Any] = {
    "torch.add": torch.add,
    "torch.matmul": torch.matmul,
    "torch.cat": torch.cat,
    "F.relu": F.relu,
    "F.softmax": F.softmax,
    "torch.mul": torch.mul,
    "torch.sigmoid": torch.sigmoid,  # matches nothing
}


@dataclass(frozen=True)
class RequestSpec:
    """One ``set_*`` call, as plain data.

    ``kind``: leaf / module (a module path of sim.model, "" = the root) / type / function /
    name / glob / regex / input / output.
    """

    kind: str
    target: str = ""
    activation: Any = None
    param: tuple[tuple[str, str], ...] | None = None

    def issue(self, mp: Any) -> None:
        sim = mp.sim
        if self.kind == "input":
            mp.set_model_input_precision(self.activation)
            return
        if self.kind == "output":
            mp.set_model_output_precision(self.activation)
            return
        if self.kind in ("leaf", "module"):
            target: Any = sim.model.get_submodule(self.target)
        elif self.kind == "type":
            target = TYPES[self.target]
        elif self.kind == "function":
            target = FUNCTIONS[self.target]
        else:
            target = self.target
        mp.set_precision(
            target, activation=self.activation, param=None if self.param is None else dict(self.param)
        )

    @property
    def direct(self) -> bool:
        """Whether the request names its layers directly (leaf module, exact layer name, model I/O)."""
        return self.kind in ("leaf", "name", "input", "output")


def quantizable_layers(sim: Any) -> list[Any]:
    """Layers a request can target: compute layers with a quantizer place or a param (docs/rules.md)."""
    names = {row["name"] for row in sim.precision_table()}
    return [layer for layer in sim.graph.layers if layer.name in names]


def expected_layers(sim: Any, spec: RequestSpec) -> tuple[int, ...]:
    """The layers a request targets, per docs/rules.md ("Requests"), computed independently of mixprec's matcher."""
    layers = quantizable_layers(sim)
    names = [layer.name for layer in layers]
    if spec.kind in ("leaf", "module") or (spec.kind == "name" and sim.named_module(spec.target) is not None):
        m = spec.target
        if m in sim.leaf_module_names:
            return tuple(lay.index for lay in layers if lay.is_module and lay.module_name == m)
        return tuple(
            lay.index
            for lay in layers
            if m == "" or lay.module_name == m or lay.module_name.startswith(m + ".")
        )
    if spec.kind == "type":
        cls = TYPES[spec.target]
        return tuple(lay.index for lay in layers if lay.is_module and issubclass(lay.op, cls))
    if spec.kind == "function":
        canonical = function_name(FUNCTIONS[spec.target])
        return tuple(lay.index for lay in layers if not lay.is_module and lay.type_name == canonical)
    if spec.kind == "name":
        return tuple(lay.index for lay in layers if lay.name == spec.target)
    if spec.kind == "glob":
        return tuple(
            lay.index for lay, n in zip(layers, names, strict=True) if fnmatch.fnmatchcase(n, spec.target)
        )
    if spec.kind == "regex":
        pattern = re.compile(spec.target[3:])
        return tuple(lay.index for lay, n in zip(layers, names, strict=True) if pattern.fullmatch(n))
    return ()


def _io_value(draw: st.DrawFn, skeleton: Any, ios: list[Any]) -> Any:
    """A precision spec shaped like ``skeleton``: a precision or None per float tensor, None elsewhere."""
    if isinstance(skeleton, int):
        if not ios[skeleton].is_float:
            return None
        return draw(st.one_of(st.none(), st.sampled_from(PRECISIONS)))
    if skeleton is None:
        return None
    if isinstance(skeleton, list):
        return [_io_value(draw, s, ios) for s in skeleton]
    return {k: _io_value(draw, s, ios) for k, s in skeleton.items()}


@st.composite
def request_specs(draw: st.DrawFn, sim: Any) -> RequestSpec:
    """One random request against ``sim`` (almost always valid; a few are meant to be refused)."""
    layers = quantizable_layers(sim)
    graph = sim.graph
    kinds = ["module", "type", "function", "name", "glob", "regex", "input", "output"]
    if any(lay.is_module for lay in layers):
        kinds.insert(0, "leaf")
    kind = draw(st.sampled_from(kinds))
    precision = st.sampled_from(PRECISIONS)
    if kind == "input":
        if draw(st.booleans()):
            return RequestSpec("input", activation=draw(precision))
        return RequestSpec("input", activation=_io_value(draw, sim.input_skeleton, graph.inputs))
    if kind == "output":
        if isinstance(sim.output_skeleton, int) or draw(st.booleans()):
            return RequestSpec("output", activation=draw(precision))
        return RequestSpec("output", activation=_io_value(draw, sim.output_skeleton, graph.outputs))
    if kind == "leaf":
        target = draw(st.sampled_from(sorted({lay.module_name for lay in layers if lay.is_module})))
    elif kind == "module":
        modules = {""}
        for lay in layers:
            parts = lay.module_name.split(".") if lay.module_name else []
            modules.update(".".join(parts[:n]) for n in range(1, len(parts)))
            if not lay.is_module and lay.module_name:
                modules.add(lay.module_name)
        target = draw(st.sampled_from(sorted(m for m in modules if m not in sim.leaf_module_names)))
    elif kind == "type":
        target = draw(st.sampled_from(sorted(TYPES)))
    elif kind == "function":
        target = draw(st.sampled_from(sorted(FUNCTIONS)))
    else:
        name = draw(st.sampled_from(sorted(lay.name for lay in layers)))
        if kind == "name":
            target = name
        elif kind == "glob":
            parts = name.split(".")
            i = draw(st.integers(0, len(parts) - 1))
            target = ".".join(parts[:i] + ["*"] + parts[i + 1 :])
        else:
            parts = [re.escape(p) for p in name.split(".")]
            i = draw(st.integers(0, len(parts) - 1))
            target = "re:" + r"\.".join(parts[:i] + [".*"] + parts[i + 1 :])
    probe = RequestSpec(kind, target)
    targeted = [graph.layers[i] for i in expected_layers(sim, probe)]
    form = draw(st.sampled_from(("one", "one", "list", "none")))
    activation: Any
    if form == "one" or not targeted:
        activation = draw(precision)
    elif form == "list":
        n = len(draw(st.sampled_from(targeted)).inputs)
        activation = draw(st.lists(st.one_of(st.none(), precision), min_size=n, max_size=n))
    else:
        activation = None
    available = sorted({p for lay in targeted for p in lay.params})
    param = None
    if available and draw(st.booleans()):
        names = draw(st.lists(st.sampled_from(available), min_size=1, max_size=2, unique=True))
        param = tuple(
            (n, draw(st.sampled_from(PRECISIONS + ("int32",) if n == "bias" else PRECISIONS))) for n in names
        )
    if activation is None and param is None:
        activation = draw(precision)
    return RequestSpec(kind, target, activation, param)


def request_sequences(sim: Any, max_size: int = 5) -> st.SearchStrategy[list[RequestSpec]]:
    """Lists of 1..max_size random requests against ``sim``."""
    return st.lists(request_specs(sim), min_size=1, max_size=max_size)
