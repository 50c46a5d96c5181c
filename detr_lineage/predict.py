"""Detect objects on the user's images with a checkpoint.

``detr-lineage predict --ckpt_path CKPT --images FILE_OR_DIR --out DIR`` writes
``DIR/detections.json`` (COCO results: image_id, category_id, bbox [x, y, w, h] in pixels,
score), ``DIR/images.json`` (the COCO ``images`` / ``categories`` the results refer to, so
``COCO("images.json").loadRes("detections.json")`` works) and one PNG per image with the boxes,
class names and scores drawn.

Each image is resized as the model's official evaluation does (DETR / DN-DETR: shorter side
800, longer at most 1333; RT-DETRv2: 640 x 640; ``--size`` overrides, ``--size 0`` keeps the
image as it is) and run alone, so no padding is involved. Boxes are mapped back to the
original image.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.utils import draw_bounding_boxes

from .data.transforms import DETR_MAX_SIZE, DETR_VAL_SIZE, RTDETR_SIZE, detr_resize_shape

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def find_images(path: str | Path) -> list[Path]:
    """A file, or the image files of a directory (sorted by name; not recursive)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--images: no such file or directory: {path}")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--images: {path} holds no {'/'.join(IMAGE_SUFFIXES)} file")
    return files


def read_image(path: Path) -> Tensor:
    """-> uint8 ``[3,H,W]`` RGB; a clear error naming the file otherwise."""
    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from err


def input_size(model: torch.nn.Module, height: int, width: int, size: int | None) -> tuple:
    """(h, w) the network sees: the official eval resize of the model's family."""
    rtdetr = type(model).__name__.lower().startswith("rtdetr")
    if size == 0:
        return height, width
    if rtdetr:
        return (size or RTDETR_SIZE,) * 2
    return detr_resize_shape(height, width, size or DETR_VAL_SIZE, DETR_MAX_SIZE)


@torch.no_grad()
def detect(
    model: torch.nn.Module,
    image: Tensor,
    size: int | None = None,
    score_threshold: float = 0.5,
    top_k: int = 100,
) -> dict[str, Tensor]:
    """uint8 ``[3,H,W]`` -> ``scores [n]``, ``labels [n]``, ``boxes [n,4]`` xyxy pixels of the
    original image, best first, at most ``top_k`` and all with score >= ``score_threshold``."""
    _, h, w = image.shape
    x = TF.to_dtype(image, torch.float32, scale=True)
    shape = input_size(model, h, w, size)
    if shape != (h, w):
        x = TF.resize(x, list(shape), antialias=True)
    x = x.clamp(0, 1)[None].to(model.device)
    masks = torch.zeros(1, *shape, dtype=torch.bool, device=model.device)
    out = model(x, masks)
    sizes = torch.tensor([[h, w]], device=model.device)
    det = model.postprocess(out["pred_logits"], out["pred_boxes"], sizes)[0]
    keep = det["scores"] >= score_threshold
    order = det["scores"][keep].argsort(descending=True)[:top_k]
    return {k: v[keep][order].cpu() for k, v in det.items()}


def draw(image: Tensor, det: dict[str, Tensor], names: list[str]) -> Tensor:
    labels = [f"{names[int(c)]} {float(s):.2f}" for c, s in zip(det["labels"], det["scores"])]
    width = max(1, round(max(image.shape[1:]) / 320))
    return draw_bounding_boxes(image, det["boxes"], labels, colors="red", width=width)


def predict(
    ckpt_path: str,
    images: str,
    out: str,
    score_threshold: float = 0.5,
    top_k: int = 100,
    size: int | None = None,
) -> Path:
    """Run a checkpoint on images; -> the detections JSON path (see the module doc)."""
    from .lit import load_detector

    files = find_images(images)
    model = load_detector(ckpt_path)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    num_classes = model.num_classes
    category_ids = checkpoint.get("label_to_category_id") or list(range(num_classes))
    names = checkpoint.get("class_names") or [str(c) for c in category_ids]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, image_rows = [], []
    for image_id, file in enumerate(files, start=1):
        image = read_image(file)
        det = detect(model, image, size, score_threshold, top_k)
        image_rows.append(
            {
                "id": image_id,
                "file_name": file.name,
                "height": image.shape[1],
                "width": image.shape[2],
            }
        )
        for score, label, (x0, y0, x1, y1) in zip(
            det["scores"].tolist(), det["labels"].tolist(), det["boxes"].tolist()
        ):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(category_ids[label]),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": score,
                }
            )
        drawn = draw(image, det, names)
        TF.to_pil_image(drawn).save(out_dir / f"{file.stem}.png")
    categories = [{"id": int(c), "name": n} for c, n in zip(category_ids, names)]
    (out_dir / "images.json").write_text(
        json.dumps({"images": image_rows, "annotations": [], "categories": categories})
    )
    path = out_dir / "detections.json"
    path.write_text(json.dumps(results))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="detr-lineage predict", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint of ours")
    parser.add_argument("--images", required=True, help="an image file or a directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--score_threshold", type=float, default=0.5)
    parser.add_argument("--top_k", type=int, default=100, help="at most this many per image")
    parser.add_argument(
        "--size", type=int, default=None, help="override the input size (0 = as is)"
    )
    args = parser.parse_args(argv)
    if not Path(args.ckpt_path).is_file():
        parser.exit(2, f"detr-lineage predict: error: checkpoint not found: {args.ckpt_path}\n")
    try:
        path = predict(
            args.ckpt_path, args.images, args.out, args.score_threshold, args.top_k, args.size
        )
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"detr-lineage predict: error: {err}\n")
    print(f"wrote {path} and the drawn images to {Path(args.out)}")


if __name__ == "__main__":
    main()
