"""Export a checkpoint to ONNX.

``detr-lineage export --format onnx --ckpt_path CKPT --out FILE.onnx [--height H --width W]``

The graph takes ``images [B,3,H,W]`` in [0, 1] (unpadded: the padding mask is all False) and
returns the last decoder layer's ``pred_logits [B,Q,C(+1)]`` and ``pred_boxes [B,Q,4]``
(normalised cxcywh), as the network does; post-processing stays outside. The batch dimension
is dynamic; H and W are fixed at export (default: the official evaluation size, 640 x 640 for
RT-DETRv2, 800 x 800 for DETR / DN-DETR). RT-DETRv2 is exported after ``deploy()`` (RepVGG
blocks fused, denoising parts and unused decoder layers dropped). Needs the ``export`` extra.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from .data.transforms import DETR_VAL_SIZE, RTDETR_SIZE


class ExportWrapper(nn.Module):
    """``images -> (pred_logits, pred_boxes)`` of a network, with an all-False padding mask."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        masks = torch.zeros_like(images[:, 0], dtype=torch.bool)  # [B,H,W]
        out = self.net(images, masks)
        return out["pred_logits"], out["pred_boxes"]


def export_onnx(
    module: nn.Module, out: str | Path, height: int, width: int, opset: int = 17
) -> ExportWrapper:
    """Write ``module``'s network (deployed if it can be) as ONNX; -> the exported wrapper."""
    net = module.net.eval()
    if hasattr(net, "deploy"):
        net = net.deploy()
    wrapper = ExportWrapper(net).eval()
    example = torch.rand(1, 3, height, width)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (example,),
            str(out),
            input_names=["images"],
            output_names=["pred_logits", "pred_boxes"],
            dynamic_axes={
                "images": {0: "batch"},
                "pred_logits": {0: "batch"},
                "pred_boxes": {0: "batch"},
            },
            opset_version=opset,
            dynamo=False,
        )
    return wrapper


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="detr-lineage export", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--format", default="onnx", choices=["onnx"])
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)
    if not Path(args.ckpt_path).is_file():
        parser.exit(2, f"detr-lineage export: error: checkpoint not found: {args.ckpt_path}\n")
    from .lit import load_detector

    module = load_detector(args.ckpt_path)
    default = RTDETR_SIZE if type(module).__name__.lower().startswith("rtdetr") else DETR_VAL_SIZE
    height, width = args.height or default, args.width or args.height or default
    export_onnx(module, args.out, height, width, args.opset)
    print(f"wrote {args.out} (images [batch,3,{height},{width}] -> pred_logits, pred_boxes)")


if __name__ == "__main__":
    main()
