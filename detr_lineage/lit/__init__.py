"""LightningModules, one per variant; YAMLs name them as ``class_path: detr_lineage.lit.DETR``."""

from .base import DetectionModule, load_detector
from .detr import DETR
from .dn_detr import DNDETR
from .rtdetr_v2 import RTDETRv2

__all__ = ["DETR", "DNDETR", "DetectionModule", "RTDETRv2", "load_detector"]
