"""Scoring a trained pipeline on labelled data (an orchestrator over infer and metrics)."""

from medvision.evaluate.run import evaluate

__all__ = ["evaluate"]
