"""Our models against Hugging Face transformers' at identical shapes (a measurement, not a test).

    pip install -e '.[bench]'
    python benchmarks/bench_vs_hf.py                      # every case, 1 and 2 threads
    python benchmarks/bench_vs_hf.py --cases toy_detr toy_rtdetr --threads 1 --rounds 5
    python benchmarks/bench_vs_hf.py --bf16               # both sides under bf16 autocast
    python benchmarks/bench_vs_hf.py --official-detr ~/src/detr --cases toy_detr detr_r50

Both sides are built at random init (nothing is downloaded: ``use_pretrained_backbone=False``,
the ResNet built locally by timm / transformers' RT-DETR ResNet), with the same widths, depths,
query counts, denoising budget and frozen layers; the script asserts that the parameter counts
(total and trainable) are equal. Per case, the same images and targets are fed to both.

- train step: forward with targets, the model's own loss, backward (no optimiser step);
- forward: eval mode, no targets, under ``torch.inference_mode``.

The four timings of a case run round-robin in one process (ours train, HF train, ours forward,
HF forward, then the next round), so load from other processes hits both sides alike; the
table reports medians over rounds and the ratio HF time / our time (> 1: we are faster).

``--official-detr DIR`` (a checkout of facebookresearch/detr, kept outside this repository)
adds the official DETR code as a third contender in the DETR cases: its model, matcher and
``SetCriterion`` (aux losses, the loss ``main.py`` back-propagates) at the same shapes and frozen
layers (parameter counts asserted equal), fed the same batch (its images normalised beforehand,
as its data pipeline does), timed in the same round-robin; the table then has a speed-up column
per contender. Its top-level packages (``models``, ``util``, ``datasets``) are imported without
staying on ``sys.path`` or in ``sys.modules``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from detr_lineage.denoising import DenoisingConfig
from detr_lineage.lit import DETR, RTDETRv2
from detr_lineage.models.common import IMAGENET_MEAN, IMAGENET_STD
from detr_lineage.models.detr import DETRConfig
from detr_lineage.models.rtdetr_v2 import RTDETRv2Config
from detr_lineage.nn.backbone import BackboneConfig


@dataclass
class Case:
    """One comparison: shapes and the models' builders (``official``: the DETR cases' shapes for
    the official code, timed when ``--official-detr`` is given)."""

    name: str
    image_size: int
    batch: int
    objects: int  # ground-truth boxes per image
    num_classes: int
    build_ours: Callable[[], nn.Module]
    build_hf: Callable[[], nn.Module]
    official: DetrShape | None = None


# ---- DETR -------------------------------------------------------------------------------------
@dataclass
class DetrShape:
    backbone: str
    d: int
    layers: int  # encoder and decoder layers each
    ff: int
    queries: int
    classes: int
    drop: float


def detr_ours(s: DetrShape) -> nn.Module:
    net = DETRConfig(
        num_classes=s.classes,
        backbone=BackboneConfig(name=s.backbone, trainable_layers=3, return_strides=[32]),
        d_model=s.d,
        nhead=8,
        num_encoder_layers=s.layers,
        num_decoder_layers=s.layers,
        dim_feedforward=s.ff,
        dropout=s.drop,
        num_queries=s.queries,
    )
    return DETR(net)


def detr_hf(s: DetrShape) -> nn.Module:
    from transformers import DetrConfig, DetrForObjectDetection

    cfg = DetrConfig(
        use_timm_backbone=True,
        backbone=s.backbone,
        use_pretrained_backbone=False,
        num_labels=s.classes,
        d_model=s.d,
        encoder_layers=s.layers,
        decoder_layers=s.layers,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=s.ff,
        decoder_ffn_dim=s.ff,
        num_queries=s.queries,
        dropout=s.drop,
        attention_dropout=s.drop,  # the official DETR (and ours) drops attention weights too
        activation_dropout=0.0,
        auxiliary_loss=True,
    )
    model = DetrForObjectDetection(cfg)
    # DETR's freezing: stem and layer1 (HF's timm path leaves them trainable in recent versions)
    for name, p in model.model.backbone.model.named_parameters():
        p.requires_grad_(any(f"layer{i}" in name for i in (2, 3, 4)))
    return model


# ---- the official DETR code (facebookresearch/detr), from a checkout outside the repository ----
OFFICIAL_TOP_LEVEL = ("models", "util", "datasets")  # the checkout's top-level packages


def _official_name(module: str) -> bool:
    return module.split(".")[0] in OFFICIAL_TOP_LEVEL


def import_official_detr(root: Path) -> SimpleNamespace:
    """facebookresearch/detr's modules imported from the checkout ``root``, leaving no trace.

    The checkout's top-level packages ``models``, ``util`` and ``datasets`` would shadow (or be
    shadowed by) any other module of those names, so ``root`` is on ``sys.path`` only during the
    import, same-named modules already loaded are set aside and put back, and the official ones
    are removed from ``sys.modules`` afterwards (the returned namespace keeps them alive; their
    own imports are bound at module level, so they work without ``sys.modules`` entries).
    """
    if not (root / "models" / "detr.py").is_file() or not (root / "util" / "misc.py").is_file():
        raise SystemExit(
            f"--official-detr {root}: no models/detr.py and util/misc.py there; "
            "expected a checkout of https://github.com/facebookresearch/detr"
        )
    # their third-party imports, resolved from site-packages before the checkout is on the path
    import scipy.optimize  # noqa: F401  (the official HungarianMatcher)
    import torchvision  # noqa: F401

    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if _official_name(k)}
    sys.path.insert(0, str(root))
    try:
        names = ("models.detr", "models.backbone", "models.transformer", "models.matcher")
        detr, backbone, transformer, matcher = (importlib.import_module(n) for n in names)
        misc = importlib.import_module("util.misc")
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if _official_name(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
    # its Backbone asks torchvision for ImageNet weights on the main process: build at random init
    backbone.is_main_process = lambda: False
    return SimpleNamespace(
        detr=detr, backbone=backbone, transformer=transformer, matcher=matcher, misc=misc
    )


@dataclass
class OfficialDETR:
    """The official model and criterion, and the weighted sum ``main.py`` back-propagates."""

    model: nn.Module
    criterion: nn.Module
    NestedTensor: type

    @staticmethod
    def normalise(images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> its input: ImageNet mean/std, as its ``datasets/coco.py`` does."""
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (images - mean) / std

    def loss(self, outputs: dict, targets: list[dict]) -> torch.Tensor:
        losses, weights = self.criterion(outputs, targets), self.criterion.weight_dict
        return sum(losses[k] * weights[k] for k in losses if k in weights)


def detr_official(off: SimpleNamespace, s: DetrShape) -> OfficialDETR:
    """The official ``models.detr.build`` at our shapes, its defaults otherwise (post-norm, sine
    positions, backbone stem and layer1 frozen, FrozenBatchNorm2d, aux losses, eos 0.1, costs and
    loss weights 1/5/2). ``build`` itself hard-codes ``num_classes`` per dataset, so the pieces are
    put together here as it does; its ``num_classes`` is ours (class head ``num_classes + 1``,
    the last no-object)."""
    args = SimpleNamespace(
        backbone=s.backbone,
        dilation=False,
        position_embedding="sine",
        lr_backbone=1e-5,  # > 0: layer2-4 trainable
        masks=False,
        hidden_dim=s.d,
        dropout=s.drop,
        nheads=8,
        dim_feedforward=s.ff,
        enc_layers=s.layers,
        dec_layers=s.layers,
        pre_norm=False,
        num_queries=s.queries,
        aux_loss=True,
        set_cost_class=1.0,
        set_cost_bbox=5.0,
        set_cost_giou=2.0,
    )
    with warnings.catch_warnings():  # its torchvision call passes the deprecated `pretrained`
        warnings.filterwarnings("ignore", r".*(pretrained|weight enum)", UserWarning)
        backbone = off.backbone.build_backbone(args)
    model = off.detr.DETR(
        backbone,
        off.transformer.build_transformer(args),
        num_classes=s.classes,
        num_queries=s.queries,
        aux_loss=True,
    )
    weights = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    weights |= {f"{k}_{i}": v for i in range(s.layers - 1) for k, v in list(weights.items())}
    criterion = off.detr.SetCriterion(
        s.classes,
        matcher=off.matcher.build_matcher(args),
        weight_dict=weights,
        eos_coef=0.1,
        losses=["labels", "boxes", "cardinality"],
    )
    return OfficialDETR(model, criterion, off.misc.NestedTensor)


# ---- RT-DETRv2 --------------------------------------------------------------------------------
@dataclass
class RTShape:
    d: int
    enc_ff: int
    dec_ff: int
    dec_layers: int
    queries: int
    dn_budget: int
    classes: int


def rtdetr_ours(s: RTShape) -> nn.Module:
    net = RTDETRv2Config(
        num_classes=s.classes,
        backbone=BackboneConfig(
            name="resnet18vd", return_strides=[8, 16, 32], freeze_at=-1, frozen_bn=False
        ),
        hidden_dim=s.d,
        encoder_dim=s.d,
        nhead=8,
        encoder_dim_feedforward=s.enc_ff,
        expansion=0.5,
        num_queries=s.queries,
        num_decoder_layers=s.dec_layers,
        dim_feedforward=s.dec_ff,
        num_points=[4, 4, 4],
        denoising=DenoisingConfig(
            query_budget=s.dn_budget, label_noise=0.25, box_noise=1.0, contrastive=True
        ),
    )
    return RTDETRv2(net, num_select=s.queries)


def rtdetr_hf(s: RTShape) -> nn.Module:
    from transformers import RTDetrResNetConfig, RTDetrV2Config, RTDetrV2ForObjectDetection

    backbone = RTDetrResNetConfig(
        depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    cfg = RTDetrV2Config(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        freeze_backbone_batch_norms=False,
        num_labels=s.classes,
        encoder_in_channels=[128, 256, 512],
        encoder_hidden_dim=s.d,
        encoder_ffn_dim=s.enc_ff,
        hidden_expansion=0.5,
        d_model=s.d,
        decoder_in_channels=[s.d] * 3,
        decoder_ffn_dim=s.dec_ff,
        decoder_layers=s.dec_layers,
        num_queries=s.queries,
        num_denoising=s.dn_budget,
        label_noise_ratio=0.5,
        box_noise_scale=1.0,
    )
    return RTDetrV2ForObjectDetection(cfg)


TOY_DETR = DetrShape("resnet18", d=128, layers=3, ff=512, queries=100, classes=6, drop=0.0)
R50_DETR = DetrShape("resnet50", d=256, layers=6, ff=2048, queries=100, classes=80, drop=0.1)
TOY_RT = RTShape(d=128, enc_ff=512, dec_ff=512, dec_layers=3, queries=100, dn_budget=50, classes=6)
S_RT = RTShape(
    d=256, enc_ff=1024, dec_ff=1024, dec_layers=3, queries=300, dn_budget=100, classes=80
)

CASES = {
    "toy_detr": Case(
        "toy DETR (R18, d 128, 3+3 layers, FFN 512, 100 queries), 128 px, batch 8",
        128,
        8,
        4,
        6,
        lambda: detr_ours(TOY_DETR),
        lambda: detr_hf(TOY_DETR),
        TOY_DETR,
    ),
    "toy_rtdetr": Case(
        "toy RT-DETRv2 (R18vd, d 128, FFN 512, 3 dec layers, 100 queries, CDN 50), 128 px, batch 8",
        128,
        8,
        4,
        6,
        lambda: rtdetr_ours(TOY_RT),
        lambda: rtdetr_hf(TOY_RT),
    ),
    "detr_r50": Case(
        "DETR-R50 (stem+layer1 frozen, dropout 0.1), 640 px, batch 2",
        640,
        2,
        8,
        80,
        lambda: detr_ours(R50_DETR),
        lambda: detr_hf(R50_DETR),
        R50_DETR,
    ),
    "rtdetr_s": Case(
        "RT-DETRv2-S (R18vd, CDN 100), 640 px, batch 2",
        640,
        2,
        8,
        80,
        lambda: rtdetr_ours(S_RT),
        lambda: rtdetr_hf(S_RT),
    ),
}


def count(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def make_batch(case: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(case.batch, 3, case.image_size, case.image_size, generator=g)
    masks = torch.zeros(case.batch, case.image_size, case.image_size, dtype=torch.bool)
    targets = []
    for _ in range(case.batch):
        wh = 0.1 + 0.3 * torch.rand(case.objects, 2, generator=g)
        cxcy = wh / 2 + (1 - wh) * torch.rand(case.objects, 2, generator=g)
        labels = torch.randint(0, case.num_classes, (case.objects,), generator=g)
        targets.append({"boxes": torch.cat([cxcy, wh], 1), "labels": labels})
    return images, masks, targets


def step_fns(
    ours: nn.Module, hf: nn.Module, case: Case, official: OfficialDETR | None = None
) -> dict[str, Callable[[], None]]:
    """The timed callables of a case (four, six with the official code), on one shared batch,
    in round-robin order: the train steps, then the forwards."""
    images, masks, targets = make_batch(case)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    pixel_mask = (~masks).long()

    def ours_train() -> None:
        ours.train()
        out = ours.net(images, masks, targets)
        ours.criterion(out, targets)["loss"].backward()

    def hf_train() -> None:
        hf.train()
        hf(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss.backward()

    def ours_fwd() -> None:
        ours.eval()
        with torch.inference_mode():
            ours.net(images, masks)

    def hf_fwd() -> None:
        hf.eval()
        with torch.inference_mode():
            hf(pixel_values=images, pixel_mask=pixel_mask)

    if official is None:
        return {
            "ours train": ours_train,
            "HF train": hf_train,
            "ours fwd": ours_fwd,
            "HF fwd": hf_fwd,
        }
    # its batch: images normalised by its data pipeline (ours normalises inside), padding mask
    samples = official.NestedTensor(official.normalise(images), masks)

    def official_train() -> None:
        official.model.train()
        official.loss(official.model(samples), targets).backward()

    def official_fwd() -> None:
        official.model.eval()
        with torch.inference_mode():
            official.model(samples)

    return {
        "ours train": ours_train,
        "HF train": hf_train,
        "official train": official_train,
        "ours fwd": ours_fwd,
        "HF fwd": hf_fwd,
        "official fwd": official_fwd,
    }


def time_round_robin(
    fns: dict[str, Callable[[], None]], rounds: int, warmup: int, bf16: bool
) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    autocast = torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            with autocast:
                fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


Row = tuple[Case, tuple[int, int], int, dict[str, float]]  # case, parameter counts, threads, s


def table(rows: list[Row], official: bool) -> list[str]:
    """The printed table (its title's end, then markdown): median ms per contender, speed-up =
    the other contender's time / our time; ``official``: columns for the official code (``-``
    in the cases it does not have)."""
    if not official:
        lines = [
            "HF time / our time\n",
            "| model, shapes | params (total / trainable) | threads | train step: ours / HF ms "
            "| speed-up | forward: ours / HF ms | speed-up |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
    else:
        lines = [
            "speed-up: HF's or the official code's time / our time\n",
            "| model, shapes | params (total / trainable) | threads "
            "| train step: ours / HF / official ms | vs HF | vs official "
            "| forward: ours / HF / official ms | vs HF | vs official |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for case, (total, trainable), threads, t in rows:
        cells = [f"{case.name}", f"{total / 1e6:.2f}M / {trainable / 1e6:.2f}M", f"{threads}"]
        for step in ("train", "fwd"):
            ms = [f"{1000 * t[f'{who} {step}']:.0f}" for who in ("ours", "HF")]
            ups = [f"{t[f'HF {step}'] / t[f'ours {step}']:.2f}x"]
            if official:
                off = t.get(f"official {step}")
                ms.append("-" if off is None else f"{1000 * off:.0f}")
                ups.append("-" if off is None else f"{off / t[f'ours {step}']:.2f}x")
            cells += [" / ".join(ms), *ups]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def build_case(
    key: str, off: SimpleNamespace | None = None
) -> tuple[nn.Module, nn.Module, OfficialDETR | None, tuple[int, int]]:
    """Ours, HF's and (given the official modules, for the DETR cases) the official model of a
    case, at random init; asserts equal parameter counts (total and trainable)."""
    case = CASES[key]
    torch.manual_seed(0)
    ours, hf = case.build_ours(), case.build_hf()
    n_ours, n_hf = count(ours.net), count(hf)
    assert n_ours == n_hf, f"{key}: parameter counts differ: ours {n_ours}, HF {n_hf}"
    official = None
    if off is not None and case.official is not None:
        official = detr_official(off, case.official)
        n_off = count(official.model)
        assert n_ours == n_off, f"{key}: parameter counts differ: ours {n_ours}, official {n_off}"
    return ours, hf, official, n_ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="both sides under bf16 autocast")
    parser.add_argument(
        "--official-detr",
        type=Path,
        metavar="DIR",
        help="a checkout of facebookresearch/detr (outside this repository): "
        "its DETR is timed too, in the DETR cases",
    )
    args = parser.parse_args()
    try:
        import transformers  # noqa: F401
    except ImportError:  # `make bench` runs every benchmark; this one needs the bench extra
        print("bench_vs_hf: skipped, transformers is not installed (pip install -e '.[bench]')")
        return
    off = import_official_detr(args.official_detr) if args.official_detr else None

    rows: list[Row] = []
    for key in args.cases:
        case = CASES[key]
        ours, hf, official, n_ours = build_case(key, off)
        fns = step_fns(ours, hf, case, official)
        for threads in args.threads:
            torch.set_num_threads(threads)
            t = time_round_robin(fns, args.rounds, args.warmup, args.bf16)
            rows.append((case, n_ours, threads, t))
            print(
                f"{key} threads={threads}: "
                + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in t.items()),
                flush=True,
            )
        del ours, hf, official, fns

    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(f"\n{precision}; median of {args.rounds} round-robin rounds; ", end="")
    print("\n".join(table(rows, official=off is not None)))


if __name__ == "__main__":
    main()
