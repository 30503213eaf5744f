"""Networks from config (MONAI, through an explicit registry) and safetensors checkpoints."""

from medvision.models.checkpoint import load_weights, save_weights, weights_sha256
from medvision.models.registry import NETWORKS, build_model

__all__ = ["NETWORKS", "build_model", "load_weights", "save_weights", "weights_sha256"]
