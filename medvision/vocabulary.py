"""Closed vocabularies shared by configuration, library and command line.

Kept in a module with no imports, so the command line can offer them as choices without
loading the stages that implement them.
"""

from __future__ import annotations

__all__ = ["EXPLANATION_METHODS", "STUDY_STATUSES"]

#: Captum attribution methods a pipeline or ``analyze --explain`` can name.
EXPLANATION_METHODS = ("gradcam", "integrated_gradients", "saliency", "occlusion")

#: What a study's report can say about it (``report.json`` ``status``).
STUDY_STATUSES = ("ok", "flagged", "rejected", "failed")
