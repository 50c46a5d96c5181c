"""Read runs, compare them, run ablations, look inside trained detectors.

- ``runs``: CSV logs (and W&B) -> ``Run`` with a tidy metrics frame; grouping by seed.
- ``summary``: best/final mAP and steps/epochs/time to a threshold, per group (pure).
- ``plots``: mean ± band curves against steps, epochs and wall time.
- ``compare``: ``detr-lineage compare`` (the above, written to PNGs + Markdown/CSV).
- ``ablate``: ``detr-lineage ablate`` (grid of ``fit`` runs; skip finished, resume killed).
- ``resume``: the frequent, atomic checkpoint an interrupted run resumes from.
- ``predictions``: predicted vs ground-truth boxes, per-query box centres (notebooks).
- ``demo``: runs for the notebooks (``$DETR_LINEAGE_RUNS`` or a tiny ablation).

Submodules are imported on use, so ``detr-lineage compare`` does not load torch.
"""
