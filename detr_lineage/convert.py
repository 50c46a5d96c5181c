"""Checkpoints of the reference implementations -> ours.

``detr-lineage convert --from {official,hf} --variant VARIANT IN OUT``

Sources: the official facebookresearch/detr checkpoints (R50, R101), the official
IDEA-Research/DN-DETR R50 checkpoint (DN-DAB-DETR, 300 queries), the official
lyuwenyu/RT-DETR ``rtdetrv2_pytorch`` checkpoints (S, M*, M, L, X; ``--state model`` or
``ema``) and Hugging Face transformers' ``DetrForObjectDetection`` /
``RTDetrV2ForObjectDetection`` state dicts (``model.safetensors`` or ``pytorch_model.bin``).
Every tensor maps by renaming, except that separate q/k/v projections (transformers) are
concatenated into one ``in_proj``, the RT-DETRv2 box heads are stored under both of our names,
the official anchor buffers (recomputed by ours) are dropped, and DETR's 91 COCO category ids
+ no-object are gathered into our contiguous 80 labels + no-object (DN-DETR: 91 ids in the
sigmoid class head, 91 ids + "unknown" in the label embedding; its tied box head is stored under
each of our decoder layers' names).

OUT is a checkpoint with the variant's hyper-parameters (the matching YAML under
``experiments/coco``), so it works as ``--ckpt_path`` of ``validate`` / ``test`` / ``predict``
and as initial weights of ``fit`` (``--run.init_weights OUT``).
"""

from __future__ import annotations

import argparse
import argparse as _argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from .nn.resnet_vd import official_to_timm_key

# COCO 2017: the 80 category ids in use (DETR's class head has one row per id 0..90) and names.
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
COCO_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant "
    "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe "
    "backpack umbrella handbag tie suitcase frisbee skis snowboard sports_ball kite "
    "baseball_bat baseball_glove skateboard surfboard tennis_racket bottle wine_glass cup fork "
    "knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake "
    "chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear "
    "hair_drier toothbrush"
)
COCO_NAMES_LIST = [n.replace("_", " ") for n in COCO_NAMES.split()]

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "coco"


@dataclass(frozen=True)
class Variant:
    """A converted model: its family, base YAML and the overrides of that YAML's init_args."""

    family: str  # "detr" | "dn_detr" | "rtdetrv2"
    yaml: str
    overrides: dict[str, Any] = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {
    "detr-r50": Variant("detr", "detr_r50.yaml"),
    "detr-r101": Variant("detr", "detr_r50.yaml", {"backbone.name": "resnet101"}),
    "dn-detr-r50": Variant("dn_detr", "dn_detr_r50.yaml"),
    "rtdetrv2-s": Variant("rtdetrv2", "rtdetrv2_r18.yaml"),
    "rtdetrv2-m*": Variant("rtdetrv2", "rtdetrv2_r34.yaml"),
    "rtdetrv2-m": Variant("rtdetrv2", "rtdetrv2_r50.yaml", {"expansion": 0.5, "eval_idx": 2}),
    "rtdetrv2-l": Variant("rtdetrv2", "rtdetrv2_r50.yaml"),
    "rtdetrv2-x": Variant("rtdetrv2", "rtdetrv2_r101.yaml"),
}


def variant_config(name: str) -> tuple[str, dict[str, Any]]:
    """-> (LightningModule class path, its init_args as Python objects) of a variant."""
    from .denoising import DenoisingConfig
    from .nn.backbone import BackboneConfig

    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {sorted(VARIANTS)}")
    variant = VARIANTS[name]
    path = EXPERIMENTS / variant.yaml
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the variant's config is missing (run from a checkout)")
    import importlib

    model = yaml.safe_load(path.read_text())["model"]
    args = dict(model["init_args"])
    net = dict(args["net"])  # the overrides are the network's hyper-parameters
    net["backbone"] = dict(net["backbone"])
    for key, value in variant.overrides.items():
        if key.startswith("backbone."):
            net["backbone"][key.removeprefix("backbone.")] = value
        else:
            net[key] = value
    net["backbone"] = BackboneConfig(**net["backbone"])
    if net.get("denoising") is not None:
        net["denoising"] = DenoisingConfig(**net["denoising"])
    module_name, _, class_name = model["class_path"].rpartition(".")
    net_config = getattr(importlib.import_module(module_name), class_name).net_config
    args["net"] = net_config(**net)
    return model["class_path"], args


def build_module(name: str) -> torch.nn.Module:
    """The variant's LightningModule at random init (nothing downloaded)."""
    import importlib

    class_path, args = variant_config(name)
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)(**args)


# -- renaming rules, applied in order to every key; a rule's replacement may use groups -------

Rules = list[tuple[str, str]]

_TRANSFORMER_LAYER: Rules = [  # transformers' layer names -> ours (both of its generations)
    (r"\.self_attn\.(o_proj|out_proj)\.", ".self_attn.out_proj."),
    (r"\.encoder_attn\.(o_proj|out_proj)\.", ".cross_attn.attn.out_proj."),
    (r"\.encoder_attn\.(q|k|v)_proj\.", r".cross_attn.attn.\1_proj."),
    (r"\.self_attn_layer_norm\.", ".norm1."),
    (r"\.encoder_attn_layer_norm\.", ".norm2."),
    (r"\.(mlp\.)?fc1\.", ".ffn.linear1."),
    (r"\.(mlp\.)?fc2\.", ".ffn.linear2."),
    (r"\.final_layer_norm\.", ".ffn.norm."),
]

HF_DETR_RULES: Rules = [
    (r"^model\.backbone\.(conv_encoder\.)?model\.conv1\.", "encoder.backbone.body.stem.0."),
    (r"^model\.backbone\.(conv_encoder\.)?model\.bn1\.", "encoder.backbone.body.stem.1."),
    (r"^model\.backbone\.(conv_encoder\.)?model\.layer(\d)\.", r"stage\2."),
    (r"^model\.input_projection\.", "encoder.input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.encoder\.layers\.", "encoder.layers."),
    (r"^model\.decoder\.layers\.", "decoder.layers."),
    (r"^model\.decoder\.layernorm\.", "decoder.norm."),
    (r"^class_labels_classifier\.", "class_head."),
    (r"^bbox_predictor\.", "box_head."),
    *_TRANSFORMER_LAYER,
    (r"^encoder\.layers\.(\d+)\.norm1\.", r"encoder.layers.\1.norm."),
]

OFFICIAL_DETR_RULES: Rules = [
    (r"^backbone\.0\.body\.conv1\.", "encoder.backbone.body.stem.0."),
    (r"^backbone\.0\.body\.bn1\.", "encoder.backbone.body.stem.1."),
    (r"^backbone\.0\.body\.layer(\d)\.", r"stage\1."),
    (r"^input_proj\.", "encoder.input_proj."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm1\.", r"encoder.layers.\1.norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm2\.", r"encoder.layers.\1.ffn.norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm3\.", r"decoder.layers.\1.ffn.norm."),
    (
        r"^transformer\.(en|de)coder\.layers\.(\d+)\.linear(\d)\.",
        r"\1coder.layers.\2.ffn.linear\3.",
    ),
    (
        r"^transformer\.decoder\.layers\.(\d+)\.multihead_attn\.",
        r"decoder.layers.\1.cross_attn.attn.",
    ),
    (r"^transformer\.", ""),
    (r"^class_embed\.", "class_head."),
    (r"^bbox_embed\.", "box_head."),
]

OFFICIAL_DN_DETR_RULES: Rules = [  # IDEA-Research/DN-DETR models/DN_DAB_DETR, then DETR's
    (
        r"^transformer\.(en|de)coder\.layers\.(\d+)\.activation\.",
        r"\1coder.layers.\2.ffn.activation.",
    ),
    (r"^transformer\.encoder\.query_scale\.", "encoder.pos_scale."),
    (
        r"^transformer\.decoder\.(query_scale|ref_point_head|ref_anchor_head)\.",
        r"decoder.query_pos_head.\1.",
    ),
    (
        r"^transformer\.decoder\.layers\.(\d+)\.sa_(q|k)(content|pos)_proj\.",
        r"decoder.layers.\1.self_attn.proj.\2_\3.",
    ),
    (r"^transformer\.decoder\.layers\.(\d+)\.sa_v_proj\.", r"decoder.layers.\1.self_attn.proj.v."),
    (
        r"^transformer\.decoder\.layers\.(\d+)\.ca_(q|k)(content|pos)_proj\.",
        r"decoder.layers.\1.cross_attn.\2_\3.",
    ),
    (r"^transformer\.decoder\.layers\.(\d+)\.ca_v_proj\.", r"decoder.layers.\1.cross_attn.v."),
    (
        r"^transformer\.decoder\.layers\.(\d+)\.ca_qpos_sine_proj\.",
        r"decoder.layers.\1.cross_attn.q_sine.",
    ),
    (r"^label_enc\.", "label_embed."),
    (r"^refpoint_embed\.", "anchors."),
    *OFFICIAL_DETR_RULES,
]

OFFICIAL_RTDETR_RULES: Rules = [
    (r"^encoder\.encoder\.(\d+)\.layers\.(\d+)\.norm1\.", r"encoder.encoder.\1.layers.\2.norm."),
    (
        r"^encoder\.encoder\.(\d+)\.layers\.(\d+)\.norm2\.",
        r"encoder.encoder.\1.layers.\2.ffn.norm.",
    ),
    (
        r"^encoder\.encoder\.(\d+)\.layers\.(\d+)\.linear(\d)\.",
        r"encoder.encoder.\1.layers.\2.ffn.linear\3.",
    ),
    (r"^decoder\.input_proj\.(\d+)\.conv\.", r"input_proj.\1.0."),
    (r"^decoder\.input_proj\.(\d+)\.norm\.", r"input_proj.\1.1."),
    (r"^decoder\.decoder\.layers\.(\d+)\.cross_attn\.", r"decoder.layers.\1.cross_attn.attn."),
    (r"^decoder\.decoder\.layers\.(\d+)\.norm3\.", r"decoder.layers.\1.ffn.norm."),
    (r"^decoder\.decoder\.layers\.(\d+)\.linear(\d)\.", r"decoder.layers.\1.ffn.linear\2."),
    (r"^decoder\.decoder\.", "decoder."),
    (r"^decoder\.query_pos_head\.", "decoder.query_pos_head.mlp."),
    (r"^decoder\.enc_output\.proj\.", "enc_output.0."),
    (r"^decoder\.enc_output\.norm\.", "enc_output.1."),
    (r"^decoder\.dec_score_head\.", "dec_score_heads."),
    (r"^decoder\.dec_bbox_head\.", "dec_bbox_heads."),
    (r"^decoder\.(enc_score_head|enc_bbox_head|denoising_class_embed)\.", r"\1."),
]

HF_RTDETR_RULES: Rules = [
    (
        r"^model\.backbone\.model\.embedder\.embedder\.0\.convolution\.",
        "backbone.body.body.conv1.0.",
    ),
    (
        r"^model\.backbone\.model\.embedder\.embedder\.0\.normalization\.",
        "backbone.body.body.conv1.1.",
    ),
    (
        r"^model\.backbone\.model\.embedder\.embedder\.1\.convolution\.",
        "backbone.body.body.conv1.3.",
    ),
    (
        r"^model\.backbone\.model\.embedder\.embedder\.1\.normalization\.",
        "backbone.body.body.conv1.4.",
    ),
    (
        r"^model\.backbone\.model\.embedder\.embedder\.2\.convolution\.",
        "backbone.body.body.conv1.6.",
    ),
    (r"^model\.backbone\.model\.embedder\.embedder\.2\.normalization\.", "backbone.body.body.bn1."),
    (r"^model\.backbone\.model\.encoder\.stages\.(\d+)\.layers\.", r"hfstage\1."),
    (r"\.shortcut\.(1\.)?convolution\.", ".downsample.1."),
    (r"\.shortcut\.(1\.)?normalization\.", ".downsample.2."),
    (r"^model\.encoder_input_proj\.(\d+)\.0\.", r"encoder.input_proj.\1.conv."),
    (r"^model\.encoder_input_proj\.(\d+)\.1\.", r"encoder.input_proj.\1.norm."),
    (r"^model\.encoder\.(aifi|encoder)\.", "encoder.encoder."),
    (r"^model\.encoder\.", "encoder."),
    (r"^model\.decoder_input_proj\.", "input_proj."),
    (r"^model\.decoder\.query_pos_head\.", "decoder.query_pos_head.mlp."),
    (r"^model\.decoder\.class_embed\.", "dec_score_heads."),
    (r"^model\.decoder\.bbox_embed\.", "dec_bbox_heads."),
    (r"^model\.decoder\.layers\.", "decoder.layers."),
    (r"^model\.", ""),
    (r"\.n_points_scale$", ".num_points_scale"),
    *_TRANSFORMER_LAYER,
    (r"^decoder\.layers\.(\d+)\.encoder_attn\.", r"decoder.layers.\1.cross_attn.attn."),
    (r"^encoder\.encoder\.(\d+)\.layers\.(\d+)\.norm1\.", r"encoder.encoder.\1.layers.\2.norm."),
]


def rename(key: str, rules: Rules) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _torchvision_stage(key: str, prefix: str) -> str:
    """``stageN.rest`` (ResNet ``layerN``) -> our torchvision trunk's ``stages.N-1.rest``."""
    m = re.match(r"^stage(\d)\.", key)
    return f"{prefix}stages.{int(m.group(1)) - 1}.{key[m.end() :]}" if m else key


def _hf_rtdetr_stage(key: str) -> str:
    """``hfstageI.J.layer.K.{convolution,normalization}`` -> ``layerI+1.J.{conv,bn}K+1``."""
    m = re.match(r"^hfstage(\d+)\.", key)
    if not m:
        return key
    key = f"backbone.body.body.layer{int(m.group(1)) + 1}.{key[m.end() :]}"
    key = re.sub(r"\.layer\.(\d)\.convolution\.", lambda g: f".conv{int(g[1]) + 1}.", key)
    return re.sub(r"\.layer\.(\d)\.normalization\.", lambda g: f".bn{int(g[1]) + 1}.", key)


def merge_qkv(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``X.q_proj / X.k_proj / X.v_proj`` -> ``X.in_proj_weight / in_proj_bias`` (q, k, v)."""
    out = {k: v for k, v in state.items() if not re.search(r"\.[qkv]_proj\.", k)}
    for key in state:
        m = re.match(r"^(.*)\.q_proj\.(weight|bias)$", key)
        if m:
            parts = [state.get(f"{m.group(1)}.{p}_proj.{m.group(2)}") for p in "qkv"]
            if any(p is None for p in parts):
                raise ValueError(f"{m.group(1)}: q_proj without k_proj / v_proj")
            out[f"{m.group(1)}.in_proj_{m.group(2)}"] = torch.cat(parts)  # type: ignore[arg-type]
    return out


def coco91_to_contiguous(weight: Tensor) -> Tensor:
    """Class-head rows: 91 COCO ids (0..90) + no-object -> 80 contiguous labels + no-object."""
    return weight[[*COCO_CATEGORY_IDS, weight.shape[0] - 1]]


def convert_detr(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    rules = OFFICIAL_DETR_RULES if source == "official" else HF_DETR_RULES
    out = {}
    for key, value in state.items():
        out[_torchvision_stage(rename(key, rules), "encoder.backbone.body.")] = value
    out = merge_qkv(out)
    for name in ("class_head.weight", "class_head.bias"):
        if name in out and out[name].shape[0] == 92:  # the COCO head: ids 0..90 + no-object
            out[name] = coco91_to_contiguous(out[name])
    return out


def convert_dn_detr(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    if source != "official":
        raise ValueError("DN-DETR converts from its official checkpoint only (--from official)")
    out = {}
    for key, value in state.items():
        if key.startswith("transformer.decoder.bbox_embed."):
            continue  # the official ties it to bbox_embed (stored under both names)
        out[_torchvision_stage(rename(key, OFFICIAL_DN_DETR_RULES), "encoder.backbone.body.")] = (
            value
        )
    for name in ("class_head.weight", "class_head.bias"):
        if name in out and out[name].shape[0] == 91:  # sigmoid head: one row per id 0..90
            out[name] = out[name][COCO_CATEGORY_IDS]
    if "label_embed.weight" in out and out["label_embed.weight"].shape[0] == 92:
        out["label_embed.weight"] = coco91_to_contiguous(out["label_embed.weight"])  # + unknown
    num_layers = len({k.split(".")[2] for k in out if k.startswith("decoder.layers.")})
    for key in [k for k in out if k.startswith("box_head.")]:
        for i in range(num_layers):  # our decoder's per-layer names of the shared box head
            out[f"decoder.box_heads.{i}.{key.removeprefix('box_head.')}"] = out[key]
    return out


def convert_rtdetrv2(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        if source == "official":
            if key in ("decoder.anchors", "decoder.valid_mask"):
                continue  # recomputed by ours from the feature-map sizes
            if key.startswith("backbone."):
                key = "backbone.body.body." + official_to_timm_key(key.removeprefix("backbone."))
            else:
                key = rename(key, OFFICIAL_RTDETR_RULES)
        else:
            if re.match(r"^(class_embed|bbox_embed)\.", key):
                continue  # transformers ties these to model.decoder.{class,bbox}_embed
            key = _hf_rtdetr_stage(rename(key, HF_RTDETR_RULES))
        out[key] = value
    out = merge_qkv(out)
    for key in [k for k in out if k.startswith("dec_bbox_heads.")]:
        out["decoder.box_heads." + key.removeprefix("dec_bbox_heads.")] = out[key]
    return out


CONVERTERS: dict[str, Callable[[Mapping[str, Tensor], str], dict[str, Tensor]]] = {
    "detr": convert_detr,
    "dn_detr": convert_dn_detr,
    "rtdetrv2": convert_rtdetrv2,
}


def check_against(
    converted: Mapping[str, Tensor], expected: Mapping[str, Tensor], what: str
) -> None:
    """Raise naming ``what`` unless ``converted`` has exactly ``expected``'s keys and shapes."""
    expected = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    converted = {k: v for k, v in converted.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    shapes = [
        f"{k}: file {tuple(converted[k].shape)} vs ours {tuple(v.shape)}"
        for k, v in expected.items()
        if k in converted and tuple(converted[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{what}: {len(missing)} missing, {len(unexpected)} unexpected and "
            f"{len(shapes)} mis-shaped tensors (a file of another model or size?); "
            f"missing e.g. {missing[:3]}, unexpected e.g. {unexpected[:3]}, "
            f"shapes e.g. {shapes[:3]}"
        )


# Tensors whose shape depends on the number of classes: re-initialised when fine-tuning on a
# dataset with another number of classes.
CLASS_TENSORS = re.compile(
    r"^(class_head|enc_score_head|dec_score_heads\.\d+|denoising_class_embed|label_embed)\."
    r"(weight|bias)$"
)


def load_initial_weights(module: torch.nn.Module, path: str) -> list[str]:
    """Initialise ``module.net`` from a checkpoint of ours (``fit --run.init_weights``).

    Every tensor must exist with the same shape, except the class-dependent ones
    (``CLASS_TENSORS``), which keep their fresh init when the number of classes differs
    (fine-tuning COCO weights on another dataset). Returns the names of those left as they were.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"initial weights not found: {file}")
    checkpoint = torch.load(file, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"{file}: expected a checkpoint with a state_dict")
    state = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    own = module.net.state_dict()
    kept = [
        k
        for k, v in state.items()
        if k in own and CLASS_TENSORS.match(k) and tuple(v.shape) != tuple(own[k].shape)
    ]
    state = {k: v for k, v in state.items() if k not in kept}
    check_against(state, {k: v for k, v in own.items() if k not in kept}, str(file))
    module.net.load_state_dict(state, strict=False)  # checked: only num_batches_tracked
    return kept


def load_source(path: str, source: str, state: str = "model") -> dict[str, Tensor]:
    """A checkpoint file -> its model state dict (``state``: official RT-DETR ``model``/``ema``)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint to convert not found: {file}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(file)))
    with torch.serialization.safe_globals([_argparse.Namespace]):  # DETR stores its args
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{file}: expected a state dict, got {type(ckpt).__name__}")
    if source == "official":
        if state == "ema":
            if not isinstance(ckpt.get("ema"), Mapping) or "module" not in ckpt["ema"]:
                raise ValueError(f"{file}: no 'ema' state (keys: {sorted(ckpt)[:8]})")
            return dict(ckpt["ema"]["module"])
        if isinstance(ckpt.get("model"), Mapping):
            return dict(ckpt["model"])
    if "state_dict" in ckpt and isinstance(ckpt["state_dict"], Mapping):
        return dict(ckpt["state_dict"])
    return dict(ckpt)


def convert_state(
    state: Mapping[str, Tensor], source: str, variant: str, what: str = "checkpoint"
) -> tuple[torch.nn.Module, dict[str, Tensor]]:
    """Convert and load into the variant's module: -> (module, our ``net`` state dict)."""
    if source not in ("official", "hf"):
        raise ValueError(f"--from must be 'official' or 'hf', got {source!r}")
    module = build_module(variant)
    family = VARIANTS[variant].family
    state = {k.removeprefix("module."): v for k, v in state.items()}
    converted = CONVERTERS[family](state, source)
    converted = {k: v for k, v in converted.items() if not k.endswith("num_batches_tracked")}
    check_against(converted, module.net.state_dict(), f"{what} as {source} {variant}")
    module.net.load_state_dict(converted, strict=False)  # checked: only num_batches_tracked
    return module, converted


def write_checkpoint(
    module: torch.nn.Module, hparams: dict[str, Any], out: str | Path, note: str, **extra: Any
) -> None:
    """Weights + hyper-parameters as a Lightning checkpoint without training state: what
    ``load_detector``, ``--ckpt_path`` (validate/test/predict) and ``--run.init_weights`` read."""
    import lightning

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": hparams,
        "model_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
        "converted_from": note,
        **extra,
    }
    torch.save(checkpoint, out)


def save_checkpoint(module: torch.nn.Module, variant: str, out: str, note: str) -> None:
    """The converted ``variant`` with its YAML's hyper-parameters and COCO's ids and names."""
    _, args = variant_config(variant)
    coco = {}
    if args["net"].num_classes == 80:  # every supported variant is a COCO model
        coco = {"label_to_category_id": COCO_CATEGORY_IDS, "class_names": COCO_NAMES_LIST}
    write_checkpoint(module, args, out, note, **coco)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="detr-lineage convert", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--from", dest="source", required=True, choices=["official", "hf"])
    parser.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    parser.add_argument(
        "--state", default="model", choices=["model", "ema"], help="official RT-DETR: which"
    )
    parser.add_argument("input", help="the checkpoint to convert")
    parser.add_argument("output", help="where to write ours")
    args = parser.parse_args(argv)
    try:
        state = load_source(args.input, args.source, args.state)
        module, _ = convert_state(state, args.source, args.variant, args.input)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"detr-lineage convert: error: {err}\n")
    save_checkpoint(module, args.variant, args.output, f"{args.source}:{args.input}")
    print(f"wrote {args.output} ({args.variant}, from {args.source} {args.input})")


if __name__ == "__main__":
    main()
