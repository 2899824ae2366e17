"""The reference's load/export options, its encodings files and checkpoints on mixprec's sim
(the rest of the API is in tests/test_aimet_api.py; docs/porting_from_aimet.md is the map)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mixprec import (
    UnsupportedArgumentError,
    load_checkpoint,
    save_checkpoint,
)
from tests.helpers import calibrated_small_cnn, precision_rows, small_cnn_sim

# ---------------------------------------------------------------------------- load / export options


def _document(sim):
    """A mixprec .encodings document without an ONNX export (the keys loading reads)."""
    from mixprec.export.encodings import Row, build_encodings

    rows = [Row(place, q, (sim.describe(place),)) for place, q in sim.quantizers()]
    rows += [Row(p, None, ()) for p in sim.places() if sim.quantizer_at(p) is None]
    return build_encodings(sim, rows)


def test_load_encodings_options():
    source, x = calibrated_small_cnn()
    source.model.fc.param_quantizers["weight"].bitwidth = 4
    doc = _document(source)
    sim, _ = small_cnn_sim()
    with pytest.raises(UnsupportedArgumentError, match="requires_grad=True.*training_range_learning"):
        sim.load_encodings(doc, requires_grad=True)
    assert not any(q.is_initialized() for _, q in sim.named_quantizers())  # nothing was loaded
    sim.load_encodings(doc, partial=True, allow_overwrite=False)
    assert precision_rows(sim)["fc"]["params"]["weight"] == "int4"
    torch.testing.assert_close(sim.model(x), source.model(x), rtol=0, atol=0)
    with pytest.raises(UnsupportedArgumentError, match="frozen .*allow_overwrite\\(True\\)"):
        sim.load_encodings(doc)


def test_load_encodings_strict_and_partial():
    source, _ = calibrated_small_cnn()
    doc = _document(source)
    doc["mixprec"]["quantizers"] = [
        {**item, "layer": "no_such_layer"} if item["layer"] == "fc" else item
        for item in doc["mixprec"]["quantizers"]
    ]
    sim, _ = small_cnn_sim()
    with pytest.raises(ValueError, match="no_such_layer"):
        sim.load_encodings(doc, strict=True)
    sim.load_encodings(doc, strict=False, partial=False)
    table = precision_rows(sim)
    assert table["fc"]["params"]["weight"] is None and table["fc"]["outputs"] == [None]  # dangling: removed
    assert sim.model.stem.param_quantizers["weight"].is_initialized()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"onnx_export_args": {"dynamic_axes": {"input": [0]}}}, "dynamic_axes.*deployment shape"),
        ({"onnx_export_args": {"opset_version": 21, "custom_opsets": {}}}, r"keys \['custom_opsets'\]"),
        ({"propagate_encodings": True}, "propagate_encodings=True"),
        ({"export_to_torchscript": True}, "exports ONNX only"),
        ({"export_model": False}, "export_model=False"),
        ({"onnx_opsett": 21}, r"unexpected keyword arguments \['onnx_opsett'\]"),
    ],
)
def test_export_refuses_reference_arguments_it_does_not_provide(tmp_path, kwargs, match):
    sim, x = calibrated_small_cnn()
    with pytest.raises(UnsupportedArgumentError, match=match):
        sim.export(str(tmp_path), "m", x, **kwargs)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_export_with_reference_arguments_shows_changed_bitwidths(tmp_path):
    import json

    sim, x = calibrated_small_cnn()
    sim.model.fc.param_quantizers["weight"].bitwidth = 4
    result = sim.export(
        str(tmp_path),
        "m",
        x,
        onnx_export_args={"opset_version": 21, "input_names": ["image"], "do_constant_folding": True},
        use_embedded_encodings=True,
        filename_prefix_encodings="m_torch",
    )
    assert result.by_precision["int4"] == 1 and result.covered == result.quantizers
    doc = json.loads(result.encodings_path.read_text())
    assert result.encodings_path.name == "m_torch.encodings"
    assert {e["bitwidth"] for e in doc["param_encodings"]["fc.weight"]} == {4}
    assert "image" in doc["activation_encodings"]


# ---------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_checkpoint_loads_in_another_process(tmp_path):
    sim, x = calibrated_small_cnn()
    sim.model.fc.param_quantizers["weight"].bitwidth = 4
    path = tmp_path / "sim.pth"
    save_checkpoint(sim, path)
    torch.save(x, tmp_path / "x.pt")
    torch.save(sim.model(x), tmp_path / "y.pt")
    assert torch.equal(load_checkpoint(path).model(x), sim.model(x))
    script = textwrap.dedent(f"""
        import torch, mixprec
        sim = mixprec.load_checkpoint({str(path)!r})
        x, y = torch.load({str(tmp_path / "x.pt")!r}), torch.load({str(tmp_path / "y.pt")!r})
        assert torch.equal(sim.model(x), y)
        assert sim.model.fc.param_quantizers["weight"].bitwidth == 4
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_load_checkpoint_refuses_other_objects(tmp_path):
    torch.save({"not": "a sim"}, tmp_path / "x.pth")
    with pytest.raises(Exception, match="not a QuantizationSimModel checkpoint"):
        load_checkpoint(tmp_path / "x.pth")


# ---------------------------------------------------------------------------- the reference's files


def _reference_document(sim):
    """The reference's torch-keyed 0.6.1 document of ``sim`` (what its load_encodings reads)."""
    from mixprec.export.encodings import encoding_entries

    params, activations = {}, {}
    for name, q in sim.named_quantizers():
        owner, _, rest = name.partition(".param_quantizers.")
        if rest:
            params[f"{owner}.{rest}"] = encoding_entries(q)
            continue
        if name.startswith("mixprec_"):
            continue  # model inputs and functional calls: no module of the reference holds these
        module, side, slot = name.rsplit(".", 2)
        side = side.removesuffix("_quantizers")
        activations.setdefault(module, {}).setdefault(side, {})[slot] = encoding_entries(q)[0]
    return {"version": "0.6.1", "activation_encodings": activations, "param_encodings": params}


def test_load_the_references_torch_keyed_encodings():
    source, x = calibrated_small_cnn(config_file="per_channel")
    source.model.fc.param_quantizers["weight"].bitwidth = 4
    doc = _reference_document(source)
    assert len(doc["param_encodings"]["stem.weight"]) == 8  # one entry per output channel
    sim, _ = small_cnn_sim(config_file="per_channel")
    sim.load_encodings(doc)
    for name, q in source.named_quantizers():
        if not name.startswith("mixprec_"):
            assert torch.equal(dict(sim.named_quantizers())[name].get_scale(), q.get_scale()), name
    assert precision_rows(sim)["fc"]["params"]["weight"] == "int4"
    with pytest.raises(ValueError, match=r"'nope.weight': this sim has no such quantizer place"):
        sim.load_encodings({"param_encodings": {"nope.weight": doc["param_encodings"]["fc.weight"]}})
    sim.load_encodings({"param_encodings": {"nope.weight": []}}, strict=False)  # skipped


def test_set_and_freeze_adaround_style_param_encodings(tmp_path):
    import json

    source, x = calibrated_small_cnn()
    source.model.fc.param_quantizers["weight"].bitwidth = 4
    path = tmp_path / "adaround.encodings"
    path.write_text(json.dumps(_reference_document(source)["param_encodings"]))  # the older top-level form
    sim, _ = small_cnn_sim()
    sim.set_and_freeze_param_encodings(str(path))
    sim.compute_encodings(lambda m: m(x))
    weight = sim.model.fc.param_quantizers["weight"]
    assert weight.bitwidth == 4 and not weight.is_overwrite_allowed()
    assert torch.equal(weight.get_scale(), source.model.fc.param_quantizers["weight"].get_scale())
    with pytest.raises(ValueError, match=r"'stem.weight': 3 entries for 8 channels"):
        bad = {
            "param_encodings": {
                "stem.weight": _reference_document(source)["param_encodings"]["stem.weight"] * 3
            }
        }
        small_cnn_sim()[0].load_encodings(bad)
