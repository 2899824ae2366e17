"""The zoo's models: random weights, tiny transformers configs, small inputs (no network).

Each builder returns ``(model in eval mode, dummy input, another input of other shapes)``.
Inputs are a tensor, a tuple of positional inputs, or a dict of keyword inputs, as
``QuantizationSimModel`` takes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Built = tuple[nn.Module, Any, Any]


def _image(size: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def _reestimate_batchnorm(model: nn.Module, inputs: list[Any]) -> None:
    """Reset BatchNorm statistics and re-estimate them on random data.

    Random weights with default statistics (mean 0, var 1) let activations shrink layer by layer
    to denormals, which makes float CPU math slow and the quantizers' ranges meaningless.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
        bn.train()
    with torch.no_grad():
        for x in inputs:
            _call(model, x)
    model.eval()


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


def _vision(name: str, size: int, other: int, **kwargs: Any) -> Callable[[], Built]:
    def build() -> Built:
        import torchvision

        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
        _reestimate_batchnorm(model, [_image(size, 4) for _ in range(2)])
        return model, _image(size), _image(other, 2)

    return build


def _torchvision(module: str, name: str, x: Callable[[int], Any], **kwargs: Any) -> Callable[[], Built]:
    def build() -> Built:
        import importlib

        torch.manual_seed(0)
        backbone = {} if module == "video" else {"weights_backbone": None}
        model = getattr(importlib.import_module(f"torchvision.models.{module}"), name)(
            weights=None, **backbone, **kwargs
        ).eval()
        _reestimate_batchnorm(model, [x(2), x(2)])
        return model, x(1), x(2)

    return build


def _raft() -> Built:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.optical_flow.raft_small(weights=None).eval()

    def pair(size: int) -> dict:
        return {"image1": _image(size), "image2": _image(size), "num_flow_updates": 3}

    _reestimate_batchnorm(model, [pair(128)])
    return model, pair(128), pair(160)


def _ids(vocab: int = 128, batch: int = 1, seq: int = 8) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _hf(
    config_name: str, model_name: str, extra_inputs: dict | None = None, other_seq: int = 12, **config: Any
):
    def build() -> Built:
        import transformers

        torch.manual_seed(0)
        cfg = getattr(transformers, config_name)(**config)
        model = getattr(transformers, model_name)(cfg).eval()
        extra = extra_inputs or {}
        return model, {**_ids(), **extra}, {**_ids(batch=2, seq=other_seq), **extra}

    return build


_DECODER = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip
_NO_CACHE = {"use_cache": False}


def _seq2seq(config_name: str, model_name: str, **config: Any) -> Callable[[], Built]:
    def build() -> Built:
        import transformers

        torch.manual_seed(0)
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config)).eval()

        def inputs(batch: int, seq: int) -> dict:
            return {
                **_ids(batch=batch, seq=seq),
                "decoder_input_ids": torch.randint(0, 128, (batch, 5)),
                **_NO_CACHE,
            }

        return model, inputs(1, 8), inputs(2, 12)

    return build


def _vit() -> Built:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=10,
    )  # fmt: skip
    model = transformers.ViTForImageClassification(cfg).eval()
    return model, {"pixel_values": _image(32)}, {"pixel_values": _image(32, 3)}


def _whisper() -> Built:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(
        vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
        max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    model = transformers.WhisperForConditionalGeneration(cfg).eval()

    def inputs(batch: int, seq: int) -> dict:
        return {
            "input_features": torch.randn(batch, 16, 32),
            "decoder_input_ids": torch.randint(0, 128, (batch, seq)),
            **_NO_CACHE,
        }

    return model, inputs(1, 4), inputs(2, 6)


def _clip() -> Built:
    import transformers

    torch.manual_seed(0)
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32)  # fmt: skip
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)  # fmt: skip
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    model = transformers.CLIPModel(cfg).eval()
    return (
        model,
        {**_ids(), "pixel_values": _image(32)},
        {**_ids(batch=2, seq=6), "pixel_values": _image(32, 2)},
    )


MODELS: dict[str, Callable[[], Built]] = {
    # torchvision classification (small inputs: the sweep checks numerics, not accuracy)
    "resnet18": _vision("resnet18", 64, 96),
    "resnet50": _vision("resnet50", 64, 96),
    "mobilenet_v2": _vision("mobilenet_v2", 64, 96),
    "mobilenet_v3_large": _vision("mobilenet_v3_large", 64, 96),
    "efficientnet_b0": _vision("efficientnet_b0", 64, 96),
    "regnet_y_400mf": _vision("regnet_y_400mf", 64, 96),
    "inception_v3": _vision("inception_v3", 96, 128, aux_logits=False, init_weights=False),
    "googlenet": _vision("googlenet", 64, 96, aux_logits=False, init_weights=False),
    "densenet121": _vision("densenet121", 64, 96),
    "squeezenet1_1": _vision("squeezenet1_1", 64, 96),
    "shufflenet_v2_x1_0": _vision("shufflenet_v2_x1_0", 64, 96),
    "mnasnet1_0": _vision("mnasnet1_0", 64, 96),
    "convnext_tiny": _vision("convnext_tiny", 64, 96),
    "swin_t": _vision("swin_t", 64, 96),
    "maxvit_t": _vision("maxvit_t", 224, 224),
    "vit_b_16": _vision("vit_b_16", 224, 224),
    # detection, segmentation, video, optical flow
    "fasterrcnn_mobilenet_v3_large_320_fpn": _torchvision(
        "detection",
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        lambda b: ([torch.rand(3, 128, 128) for _ in range(b)],),
        box_score_thresh=0.0,  # random weights detect nothing otherwise: the box stages would not run
    ),
    "deeplabv3_mobilenet_v3_large": _torchvision(
        "segmentation", "deeplabv3_mobilenet_v3_large", lambda b: _image(64, b), aux_loss=False
    ),
    "lraspp_mobilenet_v3_large": _torchvision(
        "segmentation", "lraspp_mobilenet_v3_large", lambda b: _image(64, b)
    ),
    "r3d_18": _torchvision("video", "r3d_18", lambda b: torch.randn(b, 3, 4, 32, 32)),
    "raft_small": _raft,
    # transformers, tiny configs
    "bert": _hf(
        "BertConfig",
        "BertModel",
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    ),  # fmt: skip
    "roberta": _hf(
        "RobertaConfig",
        "RobertaModel",
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    ),  # fmt: skip
    "distilbert": _hf(
        "DistilBertConfig", "DistilBertModel", vocab_size=128, dim=64, n_layers=2, n_heads=4, hidden_dim=128
    ),  # fmt: skip
    "gpt2": _hf(
        "GPT2Config",
        "GPT2LMHeadModel",
        _NO_CACHE,
        vocab_size=128,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
    ),  # fmt: skip
    "llama": _hf("LlamaConfig", "LlamaForCausalLM", _NO_CACHE, **_DECODER),
    "llama_eager": _hf("LlamaConfig", "LlamaForCausalLM", _NO_CACHE, attn_implementation="eager", **_DECODER),
    "mistral": _hf("MistralConfig", "MistralForCausalLM", _NO_CACHE, **_DECODER),
    "qwen2": _hf("Qwen2Config", "Qwen2ForCausalLM", _NO_CACHE, **_DECODER),
    "gemma": _hf("GemmaConfig", "GemmaForCausalLM", _NO_CACHE, head_dim=16, **_DECODER),
    "gemma2": _hf("Gemma2Config", "Gemma2ForCausalLM", _NO_CACHE, head_dim=16, **_DECODER),
    "phi": _hf("PhiConfig", "PhiForCausalLM", _NO_CACHE, **_DECODER),
    "mixtral": _hf("MixtralConfig", "MixtralForCausalLM", _NO_CACHE, num_local_experts=4, **_DECODER),
    # Mamba's reference scan (no mamba_ssm on CPU) is a Python loop over positions: every position
    # is a call site of its own, and an export (static shapes) holds only those of its input. Its
    # other shapes are therefore shorter (batch 2, length 6) than the export input (length 8).
    "mamba": _hf(
        "MambaConfig",
        "MambaForCausalLM",
        _NO_CACHE,
        other_seq=6,
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        state_size=8,
    ),  # fmt: skip
    "t5": _seq2seq(
        "T5Config",
        "T5ForConditionalGeneration",
        vocab_size=128,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
    ),  # fmt: skip
    "bart": _seq2seq(
        "BartConfig",
        "BartForConditionalGeneration",
        vocab_size=128,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=64,
    ),  # fmt: skip
    "vit": _vit,
    "whisper": _whisper,
    "clip": _clip,
}
