"""Tiny models shared by the tests, each with an example input (``model.example_input()``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Sequential):
    """Conv + BatchNorm + ReLU: a supergroup head (conv), a folded BN and the group's output (relu)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class SmallCNN(nn.Module):
    """stem conv -> two ConvBlocks -> avgpool -> flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = ConvBlock(8, 8)
        self.block2 = ConvBlock(8, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(self.pool(x), 1))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(2, 3, 8, 8)


class ThreeReaders(nn.Module):
    """One tensor (the stem's output) read by three convs, summed."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x)
        return self.a(t) + self.b(t) + self.c(t)

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(1, 3, 4, 4)


class ReshapeChain(nn.Module):
    """linear -> reshape -> permute -> flatten -> linear: the second reads through data movement."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x).reshape(-1, 3, 4).permute(0, 2, 1)
        return self.fc2(torch.flatten(y, 1))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(2, 12)


class MultiIO(nn.Module):
    """Two inputs, three outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fx = nn.Linear(6, 6)
        self.fy = nn.Linear(6, 6)
        self.head = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.fx(x)
        b = self.fy(y)
        return a, self.head(a * b), b

    @staticmethod
    def example_input() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(2, 6), torch.randn(2, 6)


class OutputBehindView(nn.Module):
    """The model output is a view of a linear's output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).view(-1, 2, 4)

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(3, 8)


class Functional(nn.Module):
    """Functional calls only between two linears: add, cat, relu, matmul, softmax, mean."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.q(x), self.k(x)
        s = torch.matmul(q, k.transpose(-1, -2))
        p = F.softmax(s, dim=-1)
        h = F.relu(torch.add(q, k)) + x
        return torch.cat([p.mean(dim=-1, keepdim=True), h], dim=-1)

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(2, 5, 8)


class ReusedRelu(nn.Module):
    """One ReLU module called twice: two layers, each with its own output quantizer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.fc2(self.relu(self.fc1(x))))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(2, 4)


class TiedEmbedding(nn.Module):
    """Embedding and output projection share one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(self.embed(ids))))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randint(0, 16, (2, 5))


class AddRelu(nn.Module):
    """A residual Add followed by ReLU (an Add+Relu supergroup): the add has no output quantizer."""

    def __init__(self) -> None:
        super().__init__()
        self.fa = nn.Linear(6, 6)
        self.fb = nn.Linear(6, 6)
        self.relu = nn.ReLU()
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.relu(self.fa(x) + self.fb(x)))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(2, 6)


TINY_MODELS = {
    "small_cnn": SmallCNN,
    "three_readers": ThreeReaders,
    "reshape_chain": ReshapeChain,
    "multi_io": MultiIO,
    "output_behind_view": OutputBehindView,
    "functional": Functional,
    "reused_relu": ReusedRelu,
    "tied_embedding": TiedEmbedding,
    "add_relu": AddRelu,
}


def build(name: str) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    cls = TINY_MODELS[name]
    return cls().eval(), cls.example_input()


def tiny_llama(attention: str = "sdpa", layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation=attention,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 8))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 128, (2, 8))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg).eval(), None


# one encoder and one decoder layer of width 32: the sizes the tiny encoder-decoders share
TINY_SEQ2SEQ = dict(
    vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
)  # fmt: skip


def tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(
        **TINY_SEQ2SEQ, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2,
    )  # fmt: skip
    return BartForConditionalGeneration(cfg).eval(), None


def tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(
        **TINY_SEQ2SEQ, num_mel_bins=8, max_source_positions=16, max_target_positions=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    return WhisperForConditionalGeneration(cfg).eval()


class LinearStack(nn.Module):
    """A non-leaf block of three Linears with nothing fused between them, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6))
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(2, 6)


TINY_MODELS["linear_stack"] = LinearStack


class Branchy(nn.Module):
    """Takes ``a`` on positive sums and ``b`` otherwise: one of them is off the dummy input's path."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x) if x.sum() > 0 else torch.sigmoid(self.b(x))
        return self.head(h)

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(2, 6).abs()


class Looped(nn.Module):
    """One Linear applied ``n`` times with a residual add: each iteration is a call site of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, n: int = 3) -> torch.Tensor:
        for _ in range(n):
            x = x + torch.tanh(self.fc(x))
        return x

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(2, 6)


TINY_MODELS["branchy"] = Branchy
TINY_MODELS["looped"] = Looped


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 8))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}


def sharpen_attention(model: nn.Module, factor: float) -> None:
    """Multiply every q/k projection weight by ``factor``: peakier softmax, larger scores."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(factor)


class CastingForward(nn.Module):
    """Top-level ``.to``/``.float``/``.type``/``.half``/``.size`` calls: layer names that are
    ``nn.Module`` attribute names."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).float().type(torch.float32).half().float()
        return self.fc(x * x.size(-1)).double().float()

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(2, 4)


class HistcRouting(nn.Module):
    """Counts from ``torch.histc`` of router scores turned into int32 offsets that pick rows: the
    counts must stay exact (Mixtral's expert grouping, in small)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(4, 1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.sigmoid(self.router(x)).flatten()
        counts = torch.histc(scores, bins=3, min=0, max=1)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        weight = offsets.float() / counts.sum()
        return self.fc(x) * weight[1]

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(13, 4)


class EmptyBranch(nn.Module):
    """A branch that gets rows above a threshold no example input reaches: an empty tensor
    (Faster R-CNN's box decoding when nothing is detected)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.fc(x)
        picked = y[y.abs().sum(-1) > 1e6]
        return y, torch.sigmoid(picked * 2.0)

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(3, 4)


class TinyValues(nn.Module):
    """An output of rms ~1e-14, below the smallest range a quantizer represents."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * 1e-14

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(3, 4)


class KeywordOnly(nn.Module):
    """Inputs that must be passed by keyword (as transformers models take ``input_ids``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, *, x: torch.Tensor | None = None, y: torch.Tensor | None = None, scale: float = 1.0):
        if x is None or y is None:
            raise ValueError("You must specify x and y")
        return self.fc(x) * y * scale

    @staticmethod
    def example_input() -> dict:
        return {"x": torch.randn(2, 4), "y": torch.randn(2, 4), "scale": 2.0}


# ----------------------------------------------------------------------------- planted fragile layers
# Sensitivity tests (tests/test_sensitivity.py) need models where the answer is known.


def plant_outlier_weight(module: nn.Module, factor: float = 60.0) -> None:
    """One weight ``factor`` times the largest: a per-tensor int4 grid keeps it and rounds the rest to 0."""
    with torch.no_grad():
        w = module.weight
        w.view(-1)[0] = factor * w.abs().max()


class WideActivation(nn.Module):
    """stem -> (x rescale) -> conv_a -> conv_b -> conv_c -> head, where the stem's output spans ~1e4.

    The stem's channel 0 is scaled up 1e4 times and scaled back down right after (a constant
    buffer), so the float function is that of an ordinary net, but the stem's output tensor spans
    1e4: an 8-bit per-tensor grid over it rounds every other channel to 0 (16 bits keep them).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_c = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)
        rescale = torch.ones(1, 8, 1, 1)
        rescale[0, 0] = 1e-4
        self.register_buffer("rescale", rescale)
        with torch.no_grad():
            self.stem.weight[0] *= 1e4
            self.stem.bias[0] *= 1e4
            for layer in (self.conv_a, self.conv_b, self.conv_c, self.head):
                layer.bias.zero_()  # the output follows the activations, not the biases

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_a(self.stem(x) * self.rescale)
        x = self.conv_c(torch.relu(self.conv_b(torch.relu(x))))
        return self.head(x.mean(dim=(2, 3)))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(2, 3, 8, 8)


class StatefulBranch(nn.Module):
    """A forward whose torch calls depend on Python state that changes every call, so a recorded
    forward does not match the next one: sweeps must notice and run such forwards in full."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = self.a(x)
        if self.calls % 2:
            x.size()  # one more torch call on odd forwards only
        return self.head(torch.relu(self.b(x)))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(2, 6)


TINY_MODELS["wide_activation"] = WideActivation
TINY_MODELS["stateful_branch"] = StatefulBranch


class Block(nn.Module):
    """A non-leaf module with functional calls of its own (tanh, mul, add)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x)) * 2 + x


class WithBlock(nn.Module):
    """``block`` is what an encoder is to an encoder-decoder: a submodule one may call on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))
