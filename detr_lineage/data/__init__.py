"""Datasets, data modules and batch collation (see docs/architecture.md for the data contract)."""

from detr_lineage.data.collate import collate_detection
from detr_lineage.data.toy_shapes import (
    CLASS_NAMES,
    PRESETS,
    ToyShapesConfig,
    ToyShapesDataModule,
    ToyShapesDataset,
    get_preset,
    render_scene,
)

__all__ = [
    "CLASS_NAMES",
    "PRESETS",
    "ToyShapesConfig",
    "ToyShapesDataModule",
    "ToyShapesDataset",
    "collate_detection",
    "get_preset",
    "render_scene",
]
