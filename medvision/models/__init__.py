"""Networks from config (MONAI, through an explicit registry), safetensors checkpoints, and
the model bundle (weights, calibration, OOD guard, model card) that train writes and infer
reads."""

from medvision.models.bundle import ModelBundle
from medvision.models.checkpoint import load_weights, save_weights, weights_sha256
from medvision.models.registry import NETWORKS, build_model, patch_forward

__all__ = ["NETWORKS", "ModelBundle", "build_model", "load_weights", "patch_forward",
           "save_weights", "weights_sha256"]
