"""LightningModules, one per variant; YAMLs name them as ``class_path: detr_lineage.lit.DETR``."""

from .base import DetectionModule, load_detector
from .conditional_detr import ConditionalDETR
from .deformable_detr import DeformableDETR
from .detr import DETR
from .dino import DINO
from .dn_detr import DNDETR
from .rtdetr_v2 import RTDETRv2

__all__ = [
    "DETR",
    "DINO",
    "DNDETR",
    "ConditionalDETR",
    "DeformableDETR",
    "DetectionModule",
    "RTDETRv2",
    "load_detector",
]
