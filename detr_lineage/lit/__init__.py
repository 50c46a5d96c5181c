"""LightningModules, one per variant; YAMLs name them as ``class_path: detr_lineage.lit.DETR``."""

from .base import DetectionModule
from .detr import DETR

__all__ = ["DETR", "DetectionModule"]
