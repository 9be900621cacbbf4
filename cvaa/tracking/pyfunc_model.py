"""The registered generator as an MLflow models-from-code pyfunc: no pickle anywhere.

:func:`cvaa.tracking.log_generator` logs *this file* as the model definition, with two
artifacts: ``config`` (the resolved config as JSON) and ``weights`` (the generator's
``state_dict``, read back with ``torch.load(..., weights_only=True)``). MLflow runs this
file as a fresh module at load time, so it is never imported from ``cvaa``: it ends with
``set_model``. Loading works with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``::

    model = mlflow.pyfunc.load_model("models:/cvaa-gan@candidate")
    ct = model.predict(xrays)                          # (N, 2, P, P) -> (N, 1, S, S, S)
    out = model.predict(xrays, params={"reliability": True})   # + uncertainty, score, verdict
    generator = model.unwrap_python_model().generator  # the nn.Module, eval mode, CPU
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.models import set_model

from cvaa import scoring
from cvaa.config import Config
from cvaa.models import build_generator

# Cases per forward pass: bounds memory for any batch size a caller sends.
CHUNK = 4


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """Biplanar X-rays -> CT volume with the generator rebuilt from its logged config."""

    def load_context(self, context) -> None:
        """Rebuild the generator from ``config`` and load ``weights`` (eval mode, CPU)."""
        config_path = Path(context.artifacts["config"])
        self.config = json.loads(config_path.read_text())
        cfg = Config.from_dict(self.config, source=str(config_path))
        self.generator = build_generator(cfg.model.generator, cfg)
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.generator.load_state_dict(state)
        self.generator.eval()
        self.cfg = cfg
        # The version's reliability calibration (cvaa.tracking.attach_calibration) lies next
        # to MLmodel; the artifacts are in ``artifacts/`` below it.
        calibration = config_path.parents[1] / "reliability_calibration.json"
        self.calibration_json = calibration.read_text() if calibration.is_file() else None

    # The np.ndarray hint is one MLflow validates nothing against (the signature does), so
    # it neither wraps predict nor warns that type hints are missing.
    def predict(self, context, model_input: np.ndarray, params=None):
        """``(N, 2, P, P)`` float32 X-rays (channel 0 PA, 1 lateral) -> ``(N, 1, S, S, S)``
        float32 volumes in [0, 1], ``CHUNK`` cases per forward pass.

        With ``params={"reliability": True}`` (and optionally ``"k"``, default the
        calibration's), a dict instead: ``ct`` as above, ``uncertainty`` ``(N, 1, S, S, S)``
        (per-voxel standard deviation, normalised units), and per case ``score``
        (predicted PSNR, dB), ``psnr_low``, ``psnr_high``, ``ood_distance`` (NaN without a
        calibration) and ``verdict`` (``uncalibrated`` without one); see
        :mod:`cvaa.reliability`.

        Args:
            model_input: the array, or ``{"xrays": array}``: MLflow's signature enforcement
                hands the array over under the signature's input name.
        """
        xrays = model_input["xrays"] if isinstance(model_input, dict) else model_input
        xrays = np.asarray(xrays, dtype=np.float32)
        if xrays.ndim != 4 or xrays.shape[0] == 0:
            raise ValueError(f"xrays must be a non-empty (N, 2, P, P) batch, got shape "
                             f"{xrays.shape}")
        if params and params.get("reliability"):
            return self._with_reliability(xrays, int(params.get("k") or 0))
        volumes = scoring.predict(self.generator, torch.from_numpy(xrays), batch_size=CHUNK)
        return volumes.clamp(0, 1).numpy()   # (N, 1, S, S, S)

    def _with_reliability(self, xrays: np.ndarray, k: int) -> dict[str, np.ndarray]:
        from cvaa import reliability

        calibration = None
        if self.calibration_json is not None:
            calibration = reliability.ReliabilityCalibration.from_json(self.calibration_json)
        k = k or (calibration.k if calibration is not None else 8)
        cases = [reliability.assess(self.generator, x, self.cfg, calibration, k=k)
                 for x in xrays]
        out = {"ct": np.stack([c.estimate for c in cases])[:, None],
               "uncertainty": np.stack([c.uncertainty for c in cases])[:, None]}
        for key in ("score", "psnr_low", "psnr_high", "ood_distance"):
            out[key] = np.array([getattr(c.assessment, key) for c in cases], np.float32)
        out["verdict"] = np.array([c.assessment.verdict for c in cases])
        return out


set_model(GeneratorModel())
