"""Batch analysis: studies in, one folder of results per study out (the main job)."""

from medvision.analyze.batch import StudyResult, analyze
from medvision.analyze.runner import AnalyzeOptions
from medvision.analyze.studies import Study, collect_studies

__all__ = ["AnalyzeOptions", "Study", "StudyResult", "analyze", "collect_studies"]
