"""DetectionModule: the training/evaluation logic every variant shares.

A subclass only builds ``self.net`` (images, masks[, targets] -> outputs), ``self.criterion``
and ``self.postprocess`` from its typed hyper-parameters. Steps, validation of the targets,
optimiser groups, schedule, mAP and the logged names live here, once.
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision

from ..boxes import cxcywh_to_xyxy
from ..criterion import SetCriterion
from ..metrics import NearMissCounter
from ..postprocess import PostProcess

MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
# Sizes a variant may take (whichever of them its __init__ has); checked at construction.
POSITIVE_SIZES = (
    "num_queries",
    "num_select",
    "d_model",
    "hidden_dim",
    "encoder_dim",
    "nhead",
    "num_decoder_layers",
    "dim_feedforward",
    "encoder_dim_feedforward",
)
NON_NEGATIVE_SIZES = ("num_encoder_layers", "warmup_steps")


def check_sizes(hparams: dict) -> None:
    """Reject impossible model sizes when the module is built, naming the parameter (a
    ``num_queries=0`` used to surface only as a non-finite loss)."""
    for name in POSITIVE_SIZES:
        if hparams.get(name) is not None and hparams[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {hparams[name]}")
    for name in NON_NEGATIVE_SIZES:
        if hparams.get(name) is not None and hparams[name] < 0:
            raise ValueError(f"{name} must be >= 0, got {hparams[name]}")
    for width in ("d_model", "hidden_dim", "encoder_dim"):
        if hparams.get(width) and hparams.get("nhead") and hparams[width] % hparams["nhead"]:
            raise ValueError(
                f"{width}={hparams[width]} must be divisible by nhead={hparams['nhead']}"
            )
    dropout = hparams.get("dropout")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    for name in ("lr", "lr_backbone", "weight_decay", "lr_linear_proj_mult"):
        if hparams.get(name) is not None and hparams[name] < 0:
            raise ValueError(f"{name} must be >= 0, got {hparams[name]}")


def check_targets(targets: list[dict], num_classes: int) -> None:
    """Fail loudly, naming the image, on labels or boxes that would silently train wrong.

    One vectorised check over the whole batch; the per-image search runs only on failure.
    """
    for t in targets:
        boxes, labels = t["boxes"], t["labels"]
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or len(boxes) != len(labels):
            raise ValueError(
                f"image {t.get('image_id', '?')}: boxes must be [n,4] with one label each, "
                f"got boxes {tuple(boxes.shape)} and labels {tuple(labels.shape)}"
            )
    if not targets:
        return
    labels = torch.cat([t["labels"] for t in targets])
    if len(labels) == 0:
        return
    boxes = torch.cat([t["boxes"] for t in targets])
    xyxy = cxcywh_to_xyxy(boxes)
    bad_box = ((xyxy < -1e-4) | (xyxy > 1 + 1e-4)).any(1) | (boxes[:, 2:] <= 0).any(1)
    bad_label = (labels < 0) | (labels >= num_classes)
    if not bool((bad_box | bad_label).any()):
        return
    image_of = torch.cat([torch.full((len(t["labels"]),), i) for i, t in enumerate(targets)])
    first = int(torch.nonzero(bad_box | bad_label)[0])
    image = targets[int(image_of[first])].get("image_id", "?")
    if bad_label[first]:
        raise ValueError(
            f"image {image}: label {int(labels[first])} is outside [0, {num_classes}); "
            f"is num_classes={num_classes} smaller than the dataset's number of classes?"
        )
    raise ValueError(
        f"image {image}: target box {boxes[first].tolist()} (cxcywh) is outside [0, 1] or "
        "has no area; boxes must be normalised cxcywh"
    )


def gather_unique(items: list[dict]) -> list[dict]:
    """Every process's per-image entries (dicts with ``image_id``), each image once, in image-id
    order, on every process: what one process evaluating all images would have."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, items)
        items = [item for part in gathered for item in part]
    unique = {item["image_id"]: item for item in items}  # a repeated image counts once
    return [unique[i] for i in sorted(unique)]


class DetectionModule(L.LightningModule):
    """Shared steps; subclasses set ``net``, ``criterion``, ``postprocess``.

    Hyper-parameters are declared once: the network's in one dataclass per variant
    (``models/<variant>.py``, e.g. ``DETRConfig``, the class attribute ``net_config``), taken
    whole as the ``net`` argument (``self.hparams.net``; the built network is ``self.net``);
    the subclass adds only its matcher, loss and post-processing arguments, this class the
    optimiser's.

    Optimiser: AdamW with the backbone at ``lr_backbone``; the parameters whose name contains
    one of ``lr_linear_proj_names`` at ``lr`` x ``lr_linear_proj_mult`` (Deformable DETR: 0.1
    for the sampling offsets and reference points; 1: no such group); optionally no weight
    decay on norm layers (RT-DETR) and on the encoder/decoder biases (``no_decay_on_bias``,
    RT-DETRv2-M*).
    Schedule, stepped every batch: linear warm-up over
    ``warmup_steps``, then x``lr_gamma`` at each epoch in ``lr_drop_epochs`` (DETR's StepLR).
    """

    net: nn.Module
    criterion: SetCriterion
    postprocess: PostProcess
    net_config: ClassVar[type]

    def __init__(
        self,
        net: Any,
        lr: float = 1e-4,
        lr_backbone: float = 1e-5,
        weight_decay: float = 1e-4,
        lr_drop_epochs: list[int] | None = None,
        lr_gamma: float = 0.1,
        warmup_steps: int = 0,
        no_decay_on_norm: bool = False,
        no_decay_on_bias: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_linear_proj_names: tuple[str, ...] = ("reference_points", "sampling_offsets"),
        lr_linear_proj_mult: float = 1.0,
    ) -> None:
        super().__init__()
        if isinstance(lr_linear_proj_names, str):
            raise ValueError(
                f"lr_linear_proj_names must be a list of name parts, got {lr_linear_proj_names!r}"
            )
        self.save_hyperparameters()  # collects the subclass's arguments too
        num_classes = net.num_classes
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        check_sizes({**vars(net), **self.hparams})
        self.num_classes = num_classes
        # Synced by ``gather_unique`` (each image once), not by torchmetrics (which needs as
        # many images on every process and would count a sampler's repeated image twice).
        self.map_metric = MeanAveragePrecision(
            box_format="xyxy", backend="faster_coco_eval", sync_on_compute=False
        )
        self._eval_images: list[dict] = []  # toy data: detections and ground truth per image
        self._eval_losses: dict[str, float] = {}  # loss term -> sum over images (this process)
        self._eval_losses_images = 0
        self.near_miss = NearMissCounter()  # val|test/near_miss, /duplicates (metrics.py)
        self._coco_detections: list[dict] = []
        self._t0: float | None = None
        self._elapsed_before = 0.0  # wall time of earlier sessions when resuming

    # -- checks ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer else None
        data_classes = getattr(dm, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"model.net.num_classes={self.num_classes} but the data has {data_classes} "
                "classes (labels are contiguous from 0): pass "
                f"--model.init_args.net.num_classes={data_classes}"
            )
        max_objects = getattr(dm, "max_objects", None)
        num_queries = getattr(self.net, "num_queries", None)
        if max_objects and num_queries and max_objects > num_queries:
            warnings.warn(
                f"the data has up to {max_objects} objects per image but the model has only "
                f"{num_queries} queries: the extra objects can never be matched",
                stacklevel=2,
            )

    # -- steps -----------------------------------------------------------------------------
    def forward(self, images: Tensor, masks: Tensor, targets: list[dict] | None = None) -> dict:
        return self.net(images, masks, targets)

    def _loss(self, batch: dict, stage: str) -> tuple[dict, dict]:
        targets = batch["targets"]
        check_targets(targets, self.num_classes)
        outputs = self.net(batch["images"], batch["masks"], targets if stage == "train" else None)
        losses = self.criterion(outputs, targets, across_processes=stage == "train")
        if not torch.isfinite(losses["loss"]):
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            raise FloatingPointError(
                f"non-finite {stage} loss at step {self.global_step} in {bad}; the last "
                "checkpoint is intact: lower the lr, or check the data"
            )
        if stage != "train":  # logged at epoch end, over every process's images
            bs = len(targets)
            for k, v in losses.items():
                total = self._eval_losses.get(k, 0.0)
                self._eval_losses[k] = total + float(v.detach()) * bs
            self._eval_losses_images += bs
            return outputs, losses
        if not self._step_logs_written():
            return outputs, losses
        log = {"on_step": True, "on_epoch": False, "batch_size": len(targets)}
        self.log("train/loss", losses["loss"].detach(), prog_bar=True, **log)
        terms = {f"train/{k}": v.detach() for k, v in losses.items() if k != "loss"}
        self.log_dict(terms, **log)
        return outputs, losses

    def _log_eval_losses(self, stage: str) -> None:
        """``<stage>/loss*``: the mean over every image of every process, each batch's loss
        weighted by its number of images (Lightning's own sync of a mean divides integer image
        counts, wrong when processes ran different numbers of batches)."""
        sums, images = self._eval_losses, self._eval_losses_images
        self._eval_losses, self._eval_losses_images = {}, 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (sums, images))
            sums = {k: sum(part[0].get(k, 0.0) for part in gathered) for k in gathered[0][0]}
            images = sum(part[1] for part in gathered)
        for k, total in sums.items():
            self.log(f"{stage}/{k}", total / max(images, 1), prog_bar=k == "loss", sync_dist=False)

    def _step_logs_written(self) -> bool:
        """Whether values logged in this training step reach the loggers.

        Lightning writes step values only every ``log_every_n_steps``, but each ``self.log``
        call costs ~1-2 ms on the CPU (measured), ~5% of a toy step with ~12 loss terms: skip
        the calls whose values would be overwritten unseen.
        """
        if self._trainer is None:
            return True
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        _, losses = self._loss(batch, "train")
        if self._step_logs_written():
            self.log("time/wall_s", self._elapsed_before + time.perf_counter() - self._t0)
        return losses["loss"]

    def detections(self, outputs: dict, targets: list[dict]) -> list[dict]:
        """Scored detections in original-image pixels (xyxy)."""
        sizes = torch.stack([t["orig_size"] for t in targets]).to(outputs["pred_boxes"].device)
        return self.postprocess(outputs["pred_logits"], outputs["pred_boxes"], sizes)

    @staticmethod
    def ground_truth(targets: list[dict]) -> list[dict]:
        gts = []
        for t in targets:
            h, w = t["orig_size"].tolist()
            scale = t["boxes"].new_tensor([w, h, w, h])
            gts.append({"boxes": cxcywh_to_xyxy(t["boxes"]) * scale, "labels": t["labels"]})
        return gts

    def coco_datamodule(self):
        """The datamodule when it carries COCO ground truth (``coco_gt``), else None."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer else None
        return dm if hasattr(dm, "coco_gt") and hasattr(dm, "label_to_category_id") else None

    def _eval_step(self, batch: dict, stage: str) -> None:
        outputs, _ = self._loss(batch, stage)
        dets = self.detections(outputs, batch["targets"])
        gts = self.ground_truth(batch["targets"])
        self.near_miss.update(dets, gts)
        if self.coco_datamodule() is None:
            for d, g, t in zip(dets, gts, batch["targets"]):
                cpu = {k: v.cpu() for k, v in d.items()}
                gt = {k: v.cpu() for k, v in g.items()}
                self._eval_images.append({"image_id": int(t["image_id"]), "det": cpu, "gt": gt})
            return
        for d, t in zip(dets, batch["targets"]):
            self._coco_detections.append(
                {"image_id": int(t["image_id"]), **{k: v.cpu() for k, v in d.items()}}
            )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_map(self, stage: str) -> None:
        """COCO numbers of the epoch: the official evaluator on COCO-format data (original ids,
        crowd regions respected), torchmetrics' (same algorithm) on toy data."""
        self._log_eval_losses(stage)
        dm = self.coco_datamodule()
        if dm is None:
            images, self._eval_images = gather_unique(self._eval_images), []
            self.map_metric.update([i["det"] for i in images], [i["gt"] for i in images])
            result = self.map_metric.compute()
            self.map_metric.reset()
            values = {k: float(result[k]) for k in MAP_KEYS}
        else:
            values = self._coco_evaluate(dm, stage)
        values.update(self.near_miss.compute())
        for name, value in values.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "map_50", sync_dist=False)

    def _coco_evaluate(self, dm, stage: str) -> dict[str, float]:
        from ..data.coco_eval import evaluate_coco, to_coco_results, write_coco_results

        detections, self._coco_detections = gather_unique(self._coco_detections), []
        results = to_coco_results(detections, dm.label_to_category_id)
        image_ids = sorted({d["image_id"] for d in detections})
        stats = evaluate_coco(dm.coco_gt(stage), results, image_ids=image_ids)
        if stage == "test" and self.trainer.is_global_zero:
            print(stats.summary)
            out_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            path = write_coco_results(out_dir / "coco_results.json", results)
            print(f"COCO results written to {path}")
        return dict(stats)

    def on_validation_epoch_end(self) -> None:
        self._log_map("val")

    def on_test_epoch_end(self) -> None:
        self._log_map("test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        outputs = self.net(batch["images"], batch["masks"])
        dets = self.detections(outputs, batch["targets"])
        for d, t in zip(dets, batch["targets"]):
            d["image_id"] = t["image_id"]
        return dets

    # -- resume: keep the wall-time axis continuous ---------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        elapsed = 0.0 if self._t0 is None else time.perf_counter() - self._t0
        checkpoint["wall_time_s"] = self._elapsed_before + elapsed
        checkpoint["model_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        dm = getattr(self.trainer, "datamodule", None) if self._trainer else None
        for key in ("label_to_category_id", "class_names"):
            if getattr(dm, key, None) is not None:
                checkpoint[key] = list(getattr(dm, key))  # write results back in dataset ids
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._elapsed_before = float(checkpoint.get("wall_time_s", 0.0))
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        """A resumed run draws the random numbers (denoising noise, ...) the interrupted one
        would have drawn next: restored here, after the data loader has been set up."""
        if getattr(self, "_rng_to_restore", None) is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):  # type: ignore[override]
        """Lightning's, after moving a checkpoint's flat network hyper-parameters (written
        before ``net`` existed) into ``net`` (``nest_net_hparams``)."""
        source = checkpoint_path
        if isinstance(checkpoint_path, str | Path):
            checkpoint = torch.load(
                checkpoint_path, map_location="cpu", weights_only=False, mmap=True
            )
            hparams = checkpoint.get("hyper_parameters")
            if hparams and "net" not in hparams:
                checkpoint["hyper_parameters"] = nest_net_hparams(
                    hparams, cls.net_config, str(checkpoint_path)
                )
                source = io.BytesIO()
                torch.save(checkpoint, source)
                source.seek(0)
        kwargs.setdefault("weights_only", False)  # hparams hold our dataclasses (as load_detector)
        return super().load_from_checkpoint(source, *args, **kwargs)

    # -- optimisation ----------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        """Backbone at ``lr_backbone``; the ``lr_linear_proj_names`` parameters (when
        ``lr_linear_proj_mult`` is not 1) in ``<group>_linear_proj`` groups at their group's lr x
        the multiplier; optionally norm parameters without weight decay."""
        hp = self.hparams
        groups: dict[tuple[bool, bool, bool], list] = {}
        norm_types = (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)
        no_decay = set()
        if hp.no_decay_on_norm:
            for module in self.net.modules():
                if isinstance(module, norm_types):
                    no_decay.update(module.parameters(recurse=False))
        if hp.get("no_decay_on_bias"):  # RT-DETRv2-M*: every encoder/decoder bias
            no_decay.update(
                p
                for n, p in self.net.named_parameters()
                if n.endswith(".bias") and ".backbone." not in f".{n}"
            )
        mult = hp.get("lr_linear_proj_mult", 1.0)
        names = hp.get("lr_linear_proj_names") or ()
        slow = set()
        if mult != 1.0:  # Deformable DETR's sampling offsets / reference points
            slow = {p for n, p in self.net.named_parameters() if any(k in n for k in names)}
            if not slow:
                raise ValueError(
                    f"lr_linear_proj_names {list(names)} match no parameter of "
                    f"{type(self.net).__name__}: give parts of its parameter names, or "
                    "lr_linear_proj_mult: 1"
                )
        for name, p in self.net.named_parameters():
            if not p.requires_grad:
                continue
            key = (".backbone." in f".{name}", p in no_decay, p in slow)
            groups.setdefault(key, []).append(p)
        return [
            {
                "name": ("backbone" if is_backbone else "detector")
                + ("_no_wd" if no_wd else "")
                + ("_linear_proj" if is_slow else ""),
                "params": params,
                "lr": (hp.lr_backbone if is_backbone else hp.lr) * (mult if is_slow else 1.0),
                "weight_decay": 0.0 if no_wd else hp.weight_decay,
            }
            for (is_backbone, no_wd, is_slow), params in groups.items()
        ]

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        groups = self.parameter_groups()
        # the fused kernel: 3-4x faster than the default per-tensor loop on the CPU (README, Speed)
        fused = {p.device.type for g in groups for p in g["params"]} <= {"cpu", "cuda"}
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), fused=fused)
        # A fused optimizer can also unscale a GradScaler's gradients itself; let the scaler do
        # it, as for any optimizer, so that Lightning allows gradient clipping with it.
        optimizer._step_supports_amp_scaling = False
        drops = sorted(hp.lr_drop_epochs or [])
        steps_per_epoch = 1
        if drops:
            max_epochs = self.trainer.max_epochs
            if max_epochs is None or max_epochs < 1:
                raise ValueError("lr_drop_epochs needs trainer.max_epochs to be set")
            steps_per_epoch = max(
                1, math.ceil(self.trainer.estimated_stepping_batches / max_epochs)
            )
        schedule = WarmupStepSchedule(
            hp.warmup_steps, [e * steps_per_epoch for e in drops], hp.lr_gamma
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def rng_states() -> dict:
    """The CPU random states (torch, numpy, python) as tensors and ints (``weights_only``-safe)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the global one)
    return {
        "torch": torch.get_rng_state(),
        "numpy": (torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    random.setstate(states["python"])


def nest_net_hparams(hparams: dict, net_config: type, source: str = "checkpoint") -> dict:
    """Hyper-parameters saved flat (before the ``net`` argument) -> ``{..., "net": net_config}``.

    The network's keys (the fields of ``net_config``) move into one ``net_config``; a None saved
    for a field that now has a non-None default (``backbone``, ``num_points``) meant that
    default. Unknown keys stay where they are (the module then names them). A checkpoint
    written by the CLI (``_instantiator``) gets ``net`` as a dict, as the CLI saves it.
    """
    fields = {f.name: f for f in dataclasses.fields(net_config)}
    net, rest = {}, {}
    for key, value in hparams.items():
        if key not in fields:
            rest[key] = value
        elif value is not None or fields[key].default is None:
            net[key] = value
    try:
        config = net_config(**net)
        # a CLI-built checkpoint (``_instantiator``) is re-parsed from plain values
        rest["net"] = dataclasses.asdict(config) if "_instantiator" in hparams else config
    except TypeError as err:
        raise ValueError(
            f"{source}: its flat hyper-parameters do not make a {net_config.__name__} ({err}); "
            "convert it by moving the network's keys under hyper_parameters['net'] "
            "(torch.load, edit, torch.save), or rebuild the model from its config"
        ) from err
    return rest


class WarmupStepSchedule:
    """LR factor at a step: linear warm-up, then ``gamma`` per passed milestone (in steps)."""

    def __init__(self, warmup_steps: int, milestones: list[int], gamma: float) -> None:
        self.warmup_steps, self.milestones, self.gamma = warmup_steps, milestones, gamma

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        return warm * self.gamma ** sum(step >= m for m in self.milestones)


def load_detector(ckpt_path: str, map_location: str = "cpu") -> DetectionModule:
    """Any variant's checkpoint -> its LightningModule in eval mode (class read from the file)."""
    import importlib

    checkpoint = torch.load(ckpt_path, map_location=map_location, weights_only=False)
    if "model_class" not in checkpoint:
        raise ValueError(f"{ckpt_path}: not a detr_lineage checkpoint (no 'model_class' entry)")
    module_name, _, class_name = checkpoint["model_class"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    model = cls.load_from_checkpoint(ckpt_path, map_location=map_location, weights_only=False)
    return model.eval()
