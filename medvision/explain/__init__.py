"""Captum attributions mapped back onto the input's geometry, and checks that they mean something."""

from medvision.explain.faithfulness import deletion_curve
from medvision.explain.saliency import METHODS, SaliencyMap, explain

__all__ = ["METHODS", "SaliencyMap", "deletion_curve", "explain"]
