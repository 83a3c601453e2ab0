"""The tabular family's serving codec: rows of features in the data's own units in, the predicted target out.

``POST /v1/predict`` takes ``{"inputs": [[f1, ..., fn], ...]}`` (or a float32 binary body), KServe v1 ``instances`` and
Open Inference Protocol tensors work as for any tensor model; features are standardised here with the training split's
statistics from the artifact, and predictions come back in the target's units."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from slimray.codec import TensorCodec
from slimray.families.tabular.model import load_artifact

FEATURE_LIMIT = 1e9  # raw feature values beyond this are refused (422): a unit error rather than data


class TabularCodec(TensorCodec):
    """Rows of features in (raw units: standardised here), predictions out (the target's units)."""

    kind = "tabular"
    v1_verb = "predict"
    v1_hint = '{"inputs": [[feature values], ...]}'
    output_names = ("predictions",)

    def __init__(self, options: Any, loader: Any = None):
        super().__init__(options)
        self.model, self.spec = (loader or load_artifact)(options.model_dir)
        s = self.spec.scaling
        self._x_mean = np.asarray(s.x_mean, dtype=np.float32)
        self._x_std = np.asarray(s.x_std, dtype=np.float32)

    def probe(self) -> np.ndarray:
        return self._x_mean[None, :].copy()

    def forward(self, items: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy((items - self._x_mean) / self._x_std)
        with torch.inference_mode():
            y = self.model(x).float().numpy()
        return {"predictions": (y * self.spec.scaling.y_std + self.spec.scaling.y_mean).astype(np.float32)}

    def _limits(self) -> dict[str, Any]:
        return dict(shape=[self.spec.in_dim], min_value=-FEATURE_LIMIT, max_value=FEATURE_LIMIT,
                    max_examples=self.options.max_batch_examples)

    def v1_answer(self, out: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"predictions": out["predictions"].tolist()}

    def predictions(self, out: dict[str, np.ndarray]) -> list[Any]:
        return out["predictions"].tolist()

    def v2_metadata(self) -> dict[str, list[dict[str, Any]]]:
        return {"inputs": [{"name": self.input_name, "datatype": "FP32", "shape": [-1, self.spec.in_dim]}],
                "outputs": [{"name": "predictions", "datatype": "FP32", "shape": [-1]}]}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "features": self.spec.features, "target": self.spec.target,
                "hidden": self.spec.hidden, "quantization": self.spec.quantization}
