"""A tree member scored by its own library when that library is installed: the fast path beside the torch walk.

Why: ``TreeModel``'s torch walk (``emm.models.trees``) is what lets a fused model with tree members score, export
to ONNX and serve with torch alone; but it walks every tree one level per tensor step, several times slower than
LightGBM's or XGBoost's own C++ predictor on the same rows. Every stage that scores a tree member in bulk (the
fuse stage's epochs, evaluate, compress's soft targets, ``emm predict``, REST) runs where the library is
usually installed, so there the member's margins come from the library, reading the same native file whose
sha256 the pool and the fused model pin. The walk stays the definition the library is checked against
(``check_tree``), what torch.fx sees (ONNX export writes each member as a TreeEnsemble node built from the same
tensors, ``emm.models.tree_onnx``), and the fallback wherever the library is absent.

The two agree to float32 rounding of the margin (the library sums leaf values in double; the walk sums them in
float64 too, then both are cast to the batch's dtype), which ``tests/unit/test_tree_native.py`` checks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


class NativeScorer:
    """The library's booster for one native tree file, built on first use from the file's text.

    Not module state: it is derived from the file (pinned by sha256 wherever EMM records one), so it never
    enters a state dict or a saved model; a copied module (``copy.deepcopy``, pickling for a worker process)
    carries the text and builds its own booster."""

    def __init__(self, text: str, fmt: str, features: list[str] | None) -> None:
        self.text, self.format, self.features = text, fmt, features
        self._booster: Any = None
        self._available: bool | None = None

    @classmethod
    def from_file(cls, path: Path, fmt: str, features: list[str] | None) -> NativeScorer:
        return cls(Path(path).read_text(encoding="utf-8"), fmt, features)

    def __getstate__(self) -> dict[str, Any]:
        return {"text": self.text, "format": self.format, "features": self.features}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["text"], state["format"], state["features"])

    def __deepcopy__(self, memo: dict[int, Any]) -> NativeScorer:
        return NativeScorer(self.text, self.format, self.features)

    @property
    def available(self) -> bool:
        """Whether the library imports here (asked once; a bundle served without it uses the walk)."""
        if self._available is None:
            try:
                self._booster = self._build()
                self._available = True
            except ImportError:
                self._available = False
        return self._available

    def _build(self) -> Any:
        if self.format == "lightgbm":
            import lightgbm as lgb

            return lgb.Booster(model_str=self.text)
        import xgboost as xgb

        booster = xgb.Booster()
        booster.load_model(bytearray(self.text, "utf-8"))
        return booster

    def margins(self, x: np.ndarray) -> np.ndarray:
        """The library's raw scores (margins before any sigmoid scaling) of ``x``, the booster's columns."""
        if self.format == "lightgbm":
            return self._booster.predict(x, raw_score=True)
        return self._booster.inplace_predict(x, predict_type="margin", missing=np.nan)


def traced(*tensors: torch.Tensor) -> bool:
    """Whether this forward is being traced or exported (torch.fx, TorchScript tracing, ONNX export, torch.compile):
    there the walk must run, since a call into the library is not a graph the tracer can record."""
    if any(isinstance(t, torch.fx.Proxy) for t in tensors):
        return True
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
                or exporting())


def native_logits(scorer: NativeScorer | None, x: torch.Tensor, scale: float, base_dtype: torch.dtype,
                  *inputs: torch.Tensor) -> torch.Tensor | None:
    """The member's logits ``[B, 1]`` from its library (``scale`` x margin), or None where the walk must run: no
    scorer attached, the library not installed, or a trace/export in progress."""
    if scorer is None or traced(x, *inputs) or not scorer.available:
        return None
    rows = x.detach().to("cpu", torch.float64).numpy()
    raw = np.asarray(scorer.margins(rows), dtype=np.float64).reshape(-1) * scale
    return torch.from_numpy(raw).to(device=x.device, dtype=base_dtype).unsqueeze(1)
