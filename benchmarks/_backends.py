"""The two libraries behind one small interface, so sections (a)-(c) run the same code on both.

Each backend imports its library lazily: the mixprec process never imports aimet_torch and
the AIMET worker (another venv) never imports mixprec.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ._timing import now


class MixprecBackend:
    """mixprec: ``QuantizationSimModel`` on the float model as it is (no preparation)."""

    name = "mixprec"

    def __init__(self) -> None:
        import mixprec

        self.lib = mixprec
        self.version = mixprec.__version__

    def build(self, model: nn.Module, dummy: Any, *, config: str | None, scheme: str) -> tuple[Any, dict]:
        start = now()
        sim = self.lib.QuantizationSimModel(model, dummy_input=dummy, quant_scheme=scheme, config_file=config)
        return sim, {"sim_s": now() - start, "layers": len(sim.graph.layers)}

    def model(self, sim: Any) -> nn.Module:
        return sim.model

    def int16(self, sim: Any, targets: list[nn.Module] | type) -> dict:
        """Apply activation int16 + weight int16 to ``targets`` (modules of sim.model, or a class)."""
        mp = self.lib.MixedPrecisionConfigurator(sim)
        for target in targets if isinstance(targets, list) else [targets]:
            mp.set_precision(target, activation="int16", param={"weight": "int16"})
        start = now()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mp.apply(log_file=None, strict=False)
        return {"apply_s": now() - start, "warnings": len(caught)}

    def calibrate(self, sim: Any, callback: Callable[[nn.Module, Any], Any]) -> None:
        sim.compute_encodings(callback, None)


class AimetBackend:
    """aimet-torch v2: ``prepare_model`` (falls back to the raw model if it fails), then the sim."""

    name = "aimet"

    def __init__(self) -> None:
        logging.disable(logging.WARNING)  # "used N times ... disabling quantizers" per reused module
        warnings.filterwarnings("ignore")
        import aimet_torch
        from aimet_torch.common.defs import QuantScheme
        from aimet_torch.model_preparer import prepare_model
        from aimet_torch.v2.mixed_precision import MixedPrecisionConfigurator
        from aimet_torch.v2.quantsim import QuantizationSimModel

        self.Sim, self.Configurator, self.prepare = (
            QuantizationSimModel,
            MixedPrecisionConfigurator,
            prepare_model,
        )
        self.schemes = {
            "tf": QuantScheme.post_training_tf,
            "tf_enhanced": QuantScheme.post_training_tf_enhanced,
        }
        configs = Path(aimet_torch.__file__).parent / "common" / "quantsim_config"
        self.configs = {None: None, "per_channel": str(configs / "default_config_per_channel.json")}
        self.version = getattr(aimet_torch, "__version__", "?")

    def build(self, model: nn.Module, dummy: Any, *, config: str | None, scheme: str) -> tuple[Any, dict]:
        info: dict = {}
        start = now()
        try:
            prepared = self.prepare(model)
        except Exception as exc:  # noqa: BLE001  (report and go on with the raw model)
            prepared, info["prepare_error"] = model, f"{type(exc).__name__}: {str(exc)[:160]}"
        info["prepare_s"] = now() - start
        start = now()
        sim = self.Sim(
            prepared,
            dummy_input=dummy,
            quant_scheme=self.schemes[scheme],
            default_output_bw=8,
            default_param_bw=8,
            config_file=self.configs[config],
        )
        info["sim_s"] = now() - start
        return sim, info

    def model(self, sim: Any) -> nn.Module:
        return sim.model

    def int16(self, sim: Any, targets: list[nn.Module] | type) -> dict:
        mp = self.Configurator(sim)
        for target in targets if isinstance(targets, list) else [targets]:
            mp.set_precision(target, activation="int16", param={"weight": "int16"})
        start = now()
        mp.apply(io.StringIO(), strict=False)  # apply(log_file=None) fails in aimet-torch 2.42
        return {"apply_s": now() - start}

    def calibrate(self, sim: Any, callback: Callable[[nn.Module, Any], Any]) -> None:
        sim.compute_encodings(callback, None)


def convs(model: nn.Module) -> list[nn.Module]:
    """The Conv2d modules of a (sim) model in module order (both libraries subclass nn.Conv2d)."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]
