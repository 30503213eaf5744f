"""Running trained pipelines: the Predictor."""

from medvision.infer.predictor import LazyPredictor, Predictor

__all__ = ["LazyPredictor", "Predictor"]
