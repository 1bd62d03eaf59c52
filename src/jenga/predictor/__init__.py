"""Pattern prediction: learned per-layer predictors that choose token blocks before attention runs."""

from .bundle import PredictorBundle, PredictorMismatchError
from .model import BlockPredictor

__all__ = ["BlockPredictor", "PredictorBundle", "PredictorMismatchError"]
