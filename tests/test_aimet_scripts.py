# ruff: noqa: B007, I001  (the scripts keep their unused loop variables and import blocks)
"""aimet-torch 2.x scripts, ported line by line: only the imports changed (each block says from
what), so these tests fail when a ported script would. The user-side parts the scripts assume
(a model, a data loader, an evaluate function) are the tiny ones of ``_user_setup``.

Sources of the idioms: aimet's quantsim and QAT examples (``pass_calibration_data(sim_model,
use_cuda)``, ``compute_encodings(forward_pass_callback=..., forward_pass_callback_args=...)``,
``sim.export(path=..., filename_prefix=..., dummy_input=...)``), the 2.x API reference
(``compute_encodings(forward_pass)``, ``named_quantizers``, ``load_encodings(..., strict=,
partial=, requires_grad=, allow_overwrite=)``) and the manual mixed precision snippet
(``apply_mmp.py``). After each script, the test checks the outcome with mixprec's own API.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers import precision_rows
from tests.models import SmallCNN

# ---- was: from aimet_common.defs import QuantScheme, QuantizationDataType
from mixprec import QuantizationDataType, QuantScheme

# ---- was: from aimet_torch.quantsim import QuantizationSimModel, save_checkpoint, load_checkpoint
from mixprec import QuantizationSimModel, load_checkpoint, save_checkpoint

# ---- was: from aimet_torch.v2.mixed_precision import MixedPrecisionConfigurator
from mixprec import MixedPrecisionConfigurator

# ---- was: from aimet_torch.common.quantsim_config.utils import get_path_for_per_channel_config
from mixprec import get_path_for_per_channel_config


def _user_setup(batches: int = 3):
    """What the scripts take from the user: a float model, a data loader, an evaluation."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    data_loader = [(torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2,))) for _ in range(batches)]

    def evaluate(model: torch.nn.Module, use_cuda: bool) -> float:
        with torch.no_grad():
            hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in data_loader)
        return hits / (2 * len(data_loader))

    return model, data_loader, evaluate


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One PTQ script run with export (the load scripts read its files)."""
    path = str(tmp_path_factory.mktemp("export"))
    model, data_loader, evaluate = _user_setup()
    use_cuda = False
    dummy_input = torch.rand(1, 3, 8, 8)

    # ---------------------------------------------------------------- script: PTQ + export
    sim = QuantizationSimModel(
        model=model,
        quant_scheme=QuantScheme.post_training_tf_enhanced,
        dummy_input=dummy_input,
        rounding_mode="nearest",
        default_output_bw=8,
        default_param_bw=8,
        in_place=False,
    )

    def pass_calibration_data(sim_model, use_cuda):
        if use_cuda:
            device = torch.device("cuda")
        else:
            device = torch.device("cpu")

        sim_model.eval()
        with torch.no_grad():
            for input_data, target_data in data_loader:
                inputs_batch = input_data.to(device)
                sim_model(inputs_batch)

    sim.compute_encodings(forward_pass_callback=pass_calibration_data, forward_pass_callback_args=use_cuda)
    accuracy = evaluate(sim.model, use_cuda)
    sim.export(path=path, filename_prefix="small_cnn", dummy_input=dummy_input)
    # ---------------------------------------------------------------- end of script
    return path, sim, accuracy, dummy_input


@pytest.mark.slow
def test_ptq_calibrate_evaluate_export(exported):
    path, sim, accuracy, _ = exported
    assert 0.0 <= accuracy <= 1.0
    assert sorted(os.listdir(path)) == ["small_cnn.encodings", "small_cnn.onnx", "small_cnn_qdq.onnx"]
    doc = json.loads(open(os.path.join(path, "small_cnn.encodings")).read())
    assert doc["quantizer_args"]["quant_scheme"] == "tf_enhanced"
    assert all(q.is_initialized() for _, q in sim.named_quantizers())


def test_v2_forward_pass_callback_with_model_only():
    model, data_loader, _ = _user_setup()
    dummy_input = torch.randn(1, 3, 8, 8)

    # ---------------------------------------------------------------- script (2.x API reference)
    sim = QuantizationSimModel(
        model,
        dummy_input,
        QuantScheme.min_max,
        8,
        4,
        False,
        get_path_for_per_channel_config(),
        QuantizationDataType.int,
    )

    def run_forward_pass(quantized_model: torch.nn.Module):
        for input, _ in data_loader:
            with torch.no_grad():
                _ = quantized_model(input)

    sim.compute_encodings(run_forward_pass)
    _ = sim.model(dummy_input)  # Now runs successfully!
    # ---------------------------------------------------------------- end of script
    weight = sim.model.stem.param_quantizers["weight"]
    assert weight.bitwidth == 4 and weight.granularity.__class__.__name__ == "PerChannel"
    assert sim.quant_scheme is QuantScheme.TF
    assert all(q.is_initialized() for q in sim.model.modules() if hasattr(q, "get_scale"))


def test_per_layer_edits_with_named_quantizers_and_bitwidth():
    model, data_loader, _ = _user_setup()
    dummy_input = torch.randn(1, 3, 8, 8)

    # ---------------------------------------------------------------- script
    sim = QuantizationSimModel(model, dummy_input, quant_scheme=QuantScheme.post_training_tf)

    for name, qtzr in sim.named_quantizers():
        if name.endswith("param_quantizers.weight"):
            qtzr.bitwidth = 4

    sim.model.fc.output_quantizers[0].bitwidth = 16
    for name, qmodule in sim.named_qmodules():
        if isinstance(qmodule, torch.nn.Conv2d) and qmodule.output_quantizers[0] is not None:
            qmodule.output_quantizers[0].bitwidth = 16

    sim.compute_encodings(lambda model, _: [model(x) for x, _ in data_loader], None)
    # ---------------------------------------------------------------- end of script
    table = precision_rows(sim)
    assert table["stem"]["params"]["weight"] == "int4" and table["fc"]["params"]["weight"] == "int4"
    assert table["fc"]["outputs"] == ["int16"] and table["stem"]["outputs"] == ["int16"]
    q = sim.model.stem.output_quantizers[0]
    levels = q(torch.linspace(q.get_min().item(), q.get_max().item(), 20000)).unique().numel()
    assert q.precision.name == "int16" and levels > 2**8  # the grid really has 16 bits
    weight = sim.model.stem.param_quantizers["weight"]
    assert weight(sim.model.stem.weight.detach()).unique().numel() <= 2**4
    assert weight.get_offset().item() == 0 and weight.signed  # the reference's signed symmetric offset


def test_percentile_scheme_with_set_percentile_value():
    model, data_loader, _ = _user_setup()
    dummy_input = torch.randn(1, 3, 8, 8)

    def calibrate(percentile):
        # ------------------------------------------------------------ script
        sim = QuantizationSimModel(model, dummy_input, quant_scheme=QuantScheme.post_training_percentile)
        sim.set_percentile_value(percentile)
        sim.compute_encodings(lambda m, _: [m(x) for x, _ in data_loader], None)
        # ------------------------------------------------------------ end of script
        return sim.model.stem.output_quantizers[0].get_max().item()

    assert calibrate(99.0) < calibrate(100.0)  # a lower percentile clips more


def test_exclude_layers_and_bias_from_quantization():
    model, data_loader, _ = _user_setup()
    dummy_input = torch.randn(1, 3, 8, 8)

    # ---------------------------------------------------------------- script
    sim = QuantizationSimModel(model, dummy_input)
    sim.exclude_param_from_quantization("bias")
    sim.exclude_layers_from_quantization([sim.model.fc])
    sim.compute_encodings(lambda m, _: [m(x) for x, _ in data_loader], None)
    # ---------------------------------------------------------------- end of script
    table = precision_rows(sim)
    assert table["fc"]["params"] == {"weight": None, "bias": None} and table["fc"]["outputs"] == [None]
    assert all(p is None for row in table.values() for name, p in row["params"].items() if name == "bias")
    assert table["stem"]["params"]["weight"] == "int8"


def test_manual_mixed_precision_workflow():
    # ---------------------------------------------------------------- script (aimet's MMP test workflow)
    model = SmallCNN()
    input_shape = (1, 3, 8, 8)

    torch.manual_seed(0)
    input_tensor = torch.randn(*input_shape)

    # 1. Create QuantSim object
    sim = QuantizationSimModel(model, input_tensor)

    # 2. Create the MixedPrecisionConfigurator object by passing in the QuantSim object
    mp_configurator = MixedPrecisionConfigurator(sim)

    # 3. Make set_precision/set_model_input_precision/set_model_output_precision calls
    mp_configurator.set_precision(sim.model.stem, "Int16", {"weight": "Int16"})
    mp_configurator.set_precision(torch.nn.Linear, "Int8", {"weight": "Int8"})
    mp_configurator.set_model_input_precision(activation="int16")

    # 4. Call apply() method by passing in the config file and strict flag
    mp_configurator.apply()
    assert mp_configurator

    # 5. compute encodings and export
    sim.compute_encodings(lambda m, _: m(input_tensor), None)
    # ---------------------------------------------------------------- end of script
    table = precision_rows(sim)
    assert table["stem"]["params"]["weight"] == "int16"  # its output is lowered: block1.0 reads int8
    assert table["fc"]["params"]["weight"] == "int8"
    assert sim.model.mixprec_input_quantizers[0].bitwidth == 16


@pytest.mark.slow
def test_load_encodings_into_a_fresh_sim(exported):
    path, reference, _, dummy_input = exported
    model, data_loader, _ = _user_setup()

    # ---------------------------------------------------------------- script
    sim = QuantizationSimModel(model, dummy_input, quant_scheme=QuantScheme.post_training_tf_enhanced)
    sim.load_encodings(
        os.path.join(path, "small_cnn.encodings"),
        strict=True,
        partial=False,
        requires_grad=None,
        allow_overwrite=False,
    )
    sim.compute_encodings(lambda m, _: [m(x) for x, _ in data_loader], None)  # frozen: kept
    # ---------------------------------------------------------------- end of script
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(sim.model(x), reference.model(x))
    assert not any(q.is_overwrite_allowed() for _, q in sim.named_quantizers())


@pytest.mark.slow
def test_set_and_freeze_param_encodings_then_calibrate_activations(exported):
    path, reference, _, dummy_input = exported
    model, data_loader, _ = _user_setup()
    with torch.no_grad():  # other weights than the exported sim's: frozen encodings must win
        model.stem.weight.mul_(3.0)

    # ---------------------------------------------------------------- script (AdaRound flow)
    sim = QuantizationSimModel(model, dummy_input, quant_scheme=QuantScheme.post_training_tf_enhanced)
    sim.set_and_freeze_param_encodings(encoding_path=os.path.join(path, "small_cnn.encodings"))
    sim.compute_encodings(
        forward_pass_callback=lambda m, _: [m(x) for x, _ in data_loader], forward_pass_callback_args=None
    )
    # ---------------------------------------------------------------- end of script
    loaded = sim.model.stem.param_quantizers["weight"]
    assert torch.equal(loaded.get_scale(), reference.model.stem.param_quantizers["weight"].get_scale())
    assert not loaded.is_overwrite_allowed()
    assert sim.model.stem.output_quantizers[0].is_overwrite_allowed()  # activations calibrated


def test_qat_with_frozen_encodings_and_checkpoints(tmp_path):
    model, data_loader, _ = _user_setup(batches=4)
    dummy_input = torch.randn(1, 3, 8, 8)
    ckpt_file_path = str(tmp_path / "best_qat.pth")

    # ---------------------------------------------------------------- script (QAT example)
    sim = QuantizationSimModel(
        model=model,
        dummy_input=dummy_input,
        quant_scheme=QuantScheme.post_training_tf_enhanced,
        default_output_bw=8,
        default_param_bw=8,
    )

    def pass_calibration_data(sim_model, data_loader):
        sim_model.eval()
        with torch.no_grad():
            for i, (images, _) in enumerate(data_loader):
                sim_model(images)

    sim.compute_encodings(forward_pass_callback=pass_calibration_data, forward_pass_callback_args=data_loader)

    sim.model.train()
    optimizer = torch.optim.SGD(sim.model.parameters(), lr=1e-2, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()
    losses = []
    for epoch in range(3):
        total_loss = 0.0
        for images, labels in data_loader:
            optimizer.zero_grad()
            outputs = sim.model(images)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
        losses.append(total_loss)
        save_checkpoint(sim, ckpt_file_path)
    sim = load_checkpoint(ckpt_file_path)
    # ---------------------------------------------------------------- end of script
    assert losses[-1] < losses[0]
    sim.model.eval()
    images = data_loader[0][0]
    assert torch.isfinite(sim.model(images)).all()
    assert sim.model.stem.param_quantizers["weight"].is_initialized()


@pytest.mark.slow
def test_mmp_snippet_on_mobilenet_v2():
    torchvision = pytest.importorskip("torchvision")
    mobilenet_v2 = torchvision.models.mobilenet_v2
    # ---------------------------------------------------------------- script: apply_mmp.py
    # changed besides imports: no pretrained download (weights=None), .cuda() -> .to(device)
    input_shape = (1, 3, 224, 224)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    dummy_input = torch.randn(input_shape).to(device)

    model = mobilenet_v2(weights=None).eval().to(device)

    # create the sim object. Feel free to change the default settings as you wish
    quant_sim = QuantizationSimModel(
        model,
        dummy_input=dummy_input,
        default_param_bw=8,
        default_output_bw=8,
        config_file=get_path_for_per_channel_config(),
    )

    # create the MMP configurator object
    mp_configurator = MixedPrecisionConfigurator(quant_sim)
    mp_configurator.set_precision(
        quant_sim.model.features[1].conv[0][0], activation="int16", param={"weight": "int16"}
    )
    mp_configurator.set_precision(
        quant_sim.model.features[3].conv[1], activation="int16", param={"weight": "int16"}
    )
    mp_configurator.set_precision(torch.nn.AvgPool2d, activation="int16")
    mp_configurator.set_model_input_precision(activation="int16")
    mp_configurator.set_model_output_precision(activation="int16")
    mp_configurator.apply()
    # ---------------------------------------------------------------- end of script
    table = precision_rows(quant_sim)
    assert table["features.1.conv.0.0"]["params"]["weight"] == "int16"
    assert table["features.3.conv.1.0"]["params"]["weight"] == "int16"  # the non-leaf's conv
    assert table["classifier.1"]["outputs"] == ["int16"]
