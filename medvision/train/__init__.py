"""Training and evaluation from pipeline files."""

from medvision.train.data import DataSplit, discover_items, pipeline_split, split_items
from medvision.train.loop import TrainResult, train

__all__ = ["DataSplit", "TrainResult", "discover_items", "pipeline_split", "split_items",
           "train"]
