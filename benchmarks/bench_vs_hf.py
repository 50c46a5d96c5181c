"""Our models against Hugging Face transformers' at identical shapes (a measurement, not a test).

    pip install -e '.[bench]'
    python benchmarks/bench_vs_hf.py                      # every case, 1 and 2 threads
    python benchmarks/bench_vs_hf.py --cases toy_detr toy_rtdetr --threads 1 --rounds 5
    python benchmarks/bench_vs_hf.py --bf16               # both sides under bf16 autocast

Both sides are built at random init (nothing is downloaded: ``use_pretrained_backbone=False``,
the ResNet built locally by timm / transformers' RT-DETR ResNet), with the same widths, depths,
query counts, denoising budget and frozen layers; the script asserts that the parameter counts
(total and trainable) are equal. Per case, the same images and targets are fed to both.

- train step: forward with targets, the model's own loss, backward (no optimiser step);
- forward: eval mode, no targets, under ``torch.inference_mode``.

The four timings of a case run round-robin in one process (ours train, HF train, ours forward,
HF forward, then the next round), so load from other processes hits both sides alike; the
table reports medians over rounds and the ratio HF time / our time (> 1: we are faster).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from detr_lineage.denoising import DenoisingConfig
from detr_lineage.lit import DETR, RTDETRv2
from detr_lineage.models.detr import DETRConfig
from detr_lineage.models.rtdetr_v2 import RTDETRv2Config
from detr_lineage.nn.backbone import BackboneConfig


@dataclass
class Case:
    """One comparison: shapes and the two models' builders."""

    name: str
    image_size: int
    batch: int
    objects: int  # ground-truth boxes per image
    num_classes: int
    build_ours: Callable[[], nn.Module]
    build_hf: Callable[[], nn.Module]


# ---- DETR -------------------------------------------------------------------------------------
def detr_ours(backbone: str, d: int, layers: int, ff: int, queries: int, classes: int, drop: float):
    net = DETRConfig(
        num_classes=classes,
        backbone=BackboneConfig(name=backbone, trainable_layers=3, return_strides=[32]),
        d_model=d,
        nhead=8,
        num_encoder_layers=layers,
        num_decoder_layers=layers,
        dim_feedforward=ff,
        dropout=drop,
        num_queries=queries,
    )
    return DETR(net)


def detr_hf(backbone: str, d: int, layers: int, ff: int, queries: int, classes: int, drop: float):
    from transformers import DetrConfig, DetrForObjectDetection

    cfg = DetrConfig(
        use_timm_backbone=True,
        backbone=backbone,
        use_pretrained_backbone=False,
        num_labels=classes,
        d_model=d,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=ff,
        decoder_ffn_dim=ff,
        num_queries=queries,
        dropout=drop,
        attention_dropout=drop,  # the official DETR (and ours) drops attention weights too
        activation_dropout=0.0,
        auxiliary_loss=True,
    )
    model = DetrForObjectDetection(cfg)
    # DETR's freezing: stem and layer1 (HF's timm path leaves them trainable in recent versions)
    for name, p in model.model.backbone.model.named_parameters():
        p.requires_grad_(any(f"layer{i}" in name for i in (2, 3, 4)))
    return model


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
        lambda: detr_ours("resnet18", 128, 3, 512, 100, 6, 0.0),
        lambda: detr_hf("resnet18", 128, 3, 512, 100, 6, 0.0),
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
        lambda: detr_ours("resnet50", 256, 6, 2048, 100, 80, 0.1),
        lambda: detr_hf("resnet50", 256, 6, 2048, 100, 80, 0.1),
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


def step_fns(ours: nn.Module, hf: nn.Module, case: Case) -> dict[str, Callable[[], None]]:
    """The four timed callables of a case, on one shared batch."""
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

    return {"ours train": ours_train, "HF train": hf_train, "ours fwd": ours_fwd, "HF fwd": hf_fwd}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="both sides under bf16 autocast")
    args = parser.parse_args()
    try:
        import transformers  # noqa: F401
    except ImportError:  # `make bench` runs every benchmark; this one needs the bench extra
        print("bench_vs_hf: skipped, transformers is not installed (pip install -e '.[bench]')")
        return

    rows = []
    for key in args.cases:
        case = CASES[key]
        torch.manual_seed(0)
        ours, hf = case.build_ours(), case.build_hf()
        n_ours, n_hf = count(ours.net), count(hf)
        assert n_ours == n_hf, f"{key}: parameter counts differ: ours {n_ours}, HF {n_hf}"
        fns = step_fns(ours, hf, case)
        for threads in args.threads:
            torch.set_num_threads(threads)
            t = time_round_robin(fns, args.rounds, args.warmup, args.bf16)
            rows.append((case, n_ours, threads, t))
            print(
                f"{key} threads={threads}: "
                + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in t.items()),
                flush=True,
            )
        del ours, hf, fns

    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(f"\n{precision}; median of {args.rounds} round-robin rounds; HF time / our time\n")
    print(
        "| model, shapes | params (total / trainable) | threads | train step: ours / HF ms "
        "| speed-up | forward: ours / HF ms | speed-up |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for case, (total, trainable), threads, t in rows:
        print(
            f"| {case.name} | {total / 1e6:.2f}M / {trainable / 1e6:.2f}M | {threads} "
            f"| {1000 * t['ours train']:.0f} / {1000 * t['HF train']:.0f} "
            f"| {t['HF train'] / t['ours train']:.2f}x "
            f"| {1000 * t['ours fwd']:.0f} / {1000 * t['HF fwd']:.0f} "
            f"| {t['HF fwd'] / t['ours fwd']:.2f}x |"
        )


if __name__ == "__main__":
    main()
