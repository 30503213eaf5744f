"""Running trained pipelines: the Predictor."""

from medvision.infer.predictor import Predictor

__all__ = ["Predictor"]
