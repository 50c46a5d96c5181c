"""Toy shapes data: determinism, tight boxes, class balance, counts, collate, data module."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detr_lineage.data import (
    CLASS_NAMES,
    PRESETS,
    ToyShapesConfig,
    ToyShapesDataModule,
    ToyShapesDataset,
    collate_detection,
    get_preset,
)
from detr_lineage.data.toy_shapes import BRIGHT_MIN, DARK_MAX

SMALL = 64  # image size for most tests: fast and still has every preset's structure


def small(preset: str, **overrides: object) -> ToyShapesConfig:
    return replace(get_preset(preset), image_size=SMALL, **overrides)


def mask_bbox(mask: np.ndarray) -> np.ndarray:
    """xyxy pixel edges (x1, y1 exclusive) of a non-empty bool mask [H,W]."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)


def check_contract(image: torch.Tensor, target: dict, size: int) -> None:
    assert image.dtype == torch.float32 and image.shape == (3, size, size)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    n = target["labels"].shape[0]
    assert target["labels"].dtype == torch.long and target["labels"].shape == (n,)
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (n, 4)
    assert isinstance(target["image_id"], int)
    for key in ("orig_size", "size"):
        assert target[key].dtype == torch.long and target[key].tolist() == [size, size]
    if n:
        assert int(target["labels"].min()) >= 0
        assert int(target["labels"].max()) < len(CLASS_NAMES)


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_same_seed_split_index_is_identical(preset: str) -> None:
    a = ToyShapesDataset(small(preset), "train", 8, seed=3)
    b = ToyShapesDataset(small(preset), "train", 8, seed=3)
    for i in (0, 5, 7):
        (ia, ta), (ib, tb) = a[i], b[i]
        assert torch.equal(ia, ib)
        assert torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])
    # Access order does not matter: regenerating an earlier index gives the same image.
    assert torch.equal(a[5][0], ToyShapesDataset(small(preset), "train", 8, seed=3)[5][0])


def test_different_split_seed_or_index_differ() -> None:
    cfg = small("easy")
    base = ToyShapesDataset(cfg, "train", 4, seed=0)[1][0]
    for other in (
        ToyShapesDataset(cfg, "val", 4, seed=0)[1][0],
        ToyShapesDataset(cfg, "test", 4, seed=0)[1][0],
        ToyShapesDataset(cfg, "train", 4, seed=1)[1][0],
        ToyShapesDataset(cfg, "train", 4, seed=0)[2][0],
    ):
        assert not torch.equal(base, other)


# ---------------------------------------------------------------- boxes


@settings(max_examples=30, deadline=None)
@given(
    preset=st.sampled_from(sorted(PRESETS)),
    seed=st.integers(0, 2**31),
    index=st.integers(0, 10**6),
)
def test_boxes_inside_and_tight_to_own_visible_pixels(preset: str, seed: int, index: int) -> None:
    cfg = small(preset)
    ds = ToyShapesDataset(cfg, "train", 10**6 + 1, seed=seed)
    scene = ds.scene(index, return_masks=True)
    image, target = ds[index]
    check_contract(image, target, SMALL)
    n = len(scene.labels)
    assert scene.masks is not None and scene.masks.shape == (n, SMALL, SMALL)
    # Visible masks are disjoint (one object on top per pixel) and never empty.
    assert int(scene.masks.sum(0).max(initial=0)) <= 1
    for j in range(n):
        assert scene.masks[j].any()
        # Tight: within 1 pixel of the bounding box of the object's own visible pixels.
        np.testing.assert_allclose(scene.boxes[j], mask_bbox(scene.masks[j]), atol=1.0)
    # Normalised cxcywh boxes lie in the image and match the pixel boxes.
    boxes = target["boxes"].double()
    xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
    assert bool((boxes[:, 2:] > 0).all())
    assert bool((xyxy >= -1e-6).all()) and bool((xyxy <= 1 + 1e-6).all())
    np.testing.assert_allclose(xyxy.numpy() * SMALL, scene.boxes, atol=1e-3)
    # Occlusion rules: nominal-box IoU bounded, every object mostly visible.
    assert bool((scene.visible_fraction >= cfg.min_visible - 1e-6).all())
    if n > 1:
        from torchvision.ops import box_iou

        iou = box_iou(torch.from_numpy(scene.nominal_boxes), torch.from_numpy(scene.nominal_boxes))
        iou.fill_diagonal_(0)
        assert float(iou.max()) <= cfg.max_overlap + 1e-5


@pytest.mark.parametrize("preset", ["easy", "crowded"])
def test_visible_pixels_show_one_colour_per_object(preset: str) -> None:
    """Without noise each object's visible pixels have one colour: painting order == masks."""
    ds = ToyShapesDataset(small(preset), "val", 4)
    for i in range(len(ds)):
        scene = ds.scene(i, return_masks=True)
        for mask in scene.masks:
            assert np.ptp(scene.image[:, mask], axis=1).max() == 0.0  # [3,P] -> per channel


def test_noise_has_configured_std() -> None:
    cfg = ToyShapesConfig(image_size=64, min_objects=0, max_objects=0, noise=0.05)
    clean = ToyShapesDataset(replace(cfg, noise=0.0), "train", 1)[0][0]
    noisy = ToyShapesDataset(cfg, "train", 1)[0][0]
    away_from_clip = (clean > 0.25) & (clean < 0.75)
    diff = (noisy - clean)[away_from_clip]
    assert diff.numel() > 1000
    assert abs(float(diff.mean())) < 0.005 and abs(float(diff.std()) - 0.05) < 0.005


# ---------------------------------------------------------------- class balance and counts


def test_classes_roughly_balanced() -> None:
    """Over 300 'easy' images (~1000 objects) each class's share is within +-25% of uniform."""
    ds = ToyShapesDataset(replace(get_preset("easy"), image_size=48), "train", 300, seed=0)
    counts = np.zeros(len(CLASS_NAMES), dtype=np.int64)
    for i in range(len(ds)):
        counts += np.bincount(ds.scene(i).labels, minlength=len(CLASS_NAMES))
    share = counts / counts.sum()
    expected = 1.0 / len(CLASS_NAMES)
    assert counts.sum() > 600
    assert np.all(np.abs(share - expected) <= 0.25 * expected), dict(
        zip(CLASS_NAMES, counts, strict=True)
    )


def test_simple_preset_draws_its_classes_counts_and_sizes() -> None:
    """'simple': labels only 0..2, 1-4 objects, sides 15-45% of the image."""
    dm = ToyShapesDataModule(preset="simple", image_size=64)
    assert dm.num_classes == 3 and dm.class_names == CLASS_NAMES[:3]
    labels, counts, sides = [], [], []
    for i in range(150):
        _, t = dm.train_set[i]
        labels += t["labels"].tolist()
        counts.append(len(t["labels"]))
        sides += t["boxes"][:, 2:].max(1).values.tolist()
    assert set(labels) == {0, 1, 2}
    assert min(counts) >= 1 and max(counts) == 4
    assert max(sides) <= 0.45 + 1 / 64 and np.median(sides) > 0.15  # pixel edges: +1 px
    # the default keeps the six classes and draws the same images as before the knob existed
    assert ToyShapesDataModule(preset="easy").num_classes == len(CLASS_NAMES)
    with pytest.raises(ValueError, match="num_classes"):
        ToyShapesConfig(num_classes=7)


def test_dark_background_colours_and_same_layout() -> None:
    """``dark_background``: background channels <= DARK_MAX, object pixels >= BRIGHT_MIN; the
    scene layout (labels, boxes) is drawn from the same random numbers as without it."""
    dark = replace(get_preset("simple"), image_size=64)
    light = replace(dark, dark_background=False)
    assert get_preset("simple").dark_background and not get_preset("easy").dark_background
    for i in range(20):
        image, t = ToyShapesDataset(dark, "train", 20, seed=3)[i]
        _, t_light = ToyShapesDataset(light, "train", 20, seed=3)[i]
        assert torch.equal(t["labels"], t_light["labels"])
        assert torch.equal(t["boxes"], t_light["boxes"])
        dim = (image <= DARK_MAX + 1e-6).all(0)  # [H,W] background pixels
        bright = (image >= BRIGHT_MIN - 1e-6).all(0)  # [H,W] object pixels
        assert bool((dim | bright).all()), f"image {i}: a pixel is neither background nor object"
        assert bool(dim.any()) and bool(bright.any())


@settings(max_examples=25, deadline=None)
@given(
    lo=st.integers(0, 8),
    extra=st.integers(0, 8),
    seed=st.integers(0, 1000),
)
def test_counts_within_min_max(lo: int, extra: int, seed: int) -> None:
    cfg = ToyShapesConfig(
        image_size=SMALL, min_objects=lo, max_objects=lo + extra, min_size=0.1, max_size=0.2
    )
    ds = ToyShapesDataset(cfg, "train", 4, seed=seed)
    for i in range(len(ds)):
        n = len(ds[i][1]["labels"])
        # Objects that cannot be placed are dropped, so n may fall below min_objects only when
        # placement fails; with these small sizes and few objects it never does.
        assert lo <= n <= lo + extra


def test_crowded_reaches_30_objects() -> None:
    ds = ToyShapesDataset("crowded", "train", 40, seed=0)
    counts = [len(ds.scene(i).labels) for i in range(len(ds))]
    assert max(counts) == 30 == PRESETS["crowded"].max_objects
    assert min(counts) >= PRESETS["crowded"].min_objects


def test_empty_images() -> None:
    cfg = replace(get_preset("easy"), image_size=32, min_objects=0, max_objects=0, clutter=3)
    ds = ToyShapesDataset(cfg, "train", 3)
    image, target = ds[0]
    check_contract(image, target, 32)
    assert target["labels"].shape == (0,) and target["boxes"].shape == (0, 4)
    # With min_objects=0 some images of a mixed setting are empty and fine too.
    mixed = ToyShapesDataset(replace(cfg, max_objects=1), "train", 40)
    assert any(len(mixed[i][1]["labels"]) == 0 for i in range(40))


def test_drop_when_impossible_to_place() -> None:
    """Objects that do not fit are dropped (fewer than requested), never overlapping more."""
    cfg = ToyShapesConfig(
        image_size=32, min_objects=20, max_objects=20, min_size=0.5, max_size=0.6,
        max_overlap=0.0, placement_tries=5,
    )  # fmt: skip
    scene = ToyShapesDataset(cfg, "train", 1).scene(0)
    assert 1 <= len(scene.labels) < 20


# ---------------------------------------------------------------- collate


def test_collate_pads_and_masks() -> None:
    a = torch.rand(3, 5, 7) + 0.1  # strictly positive so padding zeros are recognisable
    b = torch.rand(3, 8, 4) + 0.1
    ta = {"labels": torch.tensor([1]), "boxes": torch.rand(1, 4), "image_id": 0}
    tb = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4), "image_id": 1}
    out = collate_detection([(a, ta), (b, tb)])
    images, masks = out["images"], out["masks"]
    assert images.shape == (2, 3, 8, 7) and masks.shape == (2, 8, 7) and masks.dtype == torch.bool
    assert torch.equal(images[0, :, :5, :7], a) and torch.equal(images[1, :, :8, :4], b)
    assert torch.equal(masks, (images == 0).all(1))  # True exactly where padded
    assert not masks[0, :5, :].any() and masks[0, 5:, :].all()
    assert not masks[1, :, :4].any() and masks[1, :, 4:].all()
    assert out["targets"][0] is ta and out["targets"][1] is tb
    rounded = collate_detection([(a, ta)], pad_to_multiple=4)
    assert rounded["images"].shape == (1, 3, 8, 8)
    assert not rounded["masks"][0, :5, :7].any() and rounded["masks"][0, 5:].all()


def test_collate_only_empty_targets() -> None:
    ds = ToyShapesDataset(replace(get_preset("easy"), image_size=32, min_objects=0, max_objects=0))
    out = collate_detection([ds[0], ds[1]])
    assert out["images"].shape == (2, 3, 32, 32) and not out["masks"].any()
    assert all(t["boxes"].shape == (0, 4) for t in out["targets"])
    with pytest.raises(ValueError, match="empty batch"):
        collate_detection([])


def test_packed_targets_round_trip_exactly() -> None:
    from detr_lineage.data.collate import pack_targets, unpack_targets

    targets = [
        {"boxes": torch.rand(3, 4), "labels": torch.tensor([0, 5, 2]), "image_id": 7,
         "size": torch.tensor([64, 48])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": 8,
         "size": torch.tensor([32, 32])},
    ]  # fmt: skip
    packed = pack_targets(targets)
    assert set(packed["tensors"]) == {"boxes", "labels", "size"}  # one tensor per key
    back = unpack_targets(packed)
    assert len(back) == 2
    for a, b in zip(targets, back):
        assert list(a) == list(b) and a["image_id"] == b["image_id"]
        for k in ("boxes", "labels", "size"):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])


def test_worker_batches_equal_in_process_batches() -> None:
    """A loader worker sends targets packed; what arrives is the same batch as without workers."""
    from torch.utils.data import DataLoader

    from detr_lineage.data.collate import PACKED

    kw = dict(preset="crowded", image_size=SMALL, num_train=8, num_val=8, batch_size=4, seed=3)
    batches = []
    for workers in (0, 1):
        dm = ToyShapesDataModule(num_workers=workers, **kw)
        dm.setup("fit")
        batches.append(list(dm.val_dataloader()))
    raw = next(iter(DataLoader.__iter__(dm.val_dataloader())))  # before unpacking
    assert PACKED in raw["targets"]  # the worker did send them packed
    for a, b in zip(*batches, strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["masks"], b["masks"])
        assert isinstance(b["targets"], list) and len(a["targets"]) == len(b["targets"])
        for ta, tb in zip(a["targets"], b["targets"]):
            assert list(ta) == list(tb)
            assert all(torch.equal(ta[k], tb[k]) for k in ta if isinstance(ta[k], torch.Tensor))


# ---------------------------------------------------------------- in-memory cache


def assert_same_item(a: tuple, b: tuple) -> None:
    """Bit-exact equality of two dataset items (image bytes, every target value and dtype)."""
    (ia, ta), (ib, tb) = a, b
    assert ia.dtype == ib.dtype and ia.shape == ib.shape
    assert ia.numpy().tobytes() == ib.numpy().tobytes()
    assert list(ta) == list(tb) and ta["image_id"] == tb["image_id"]
    for key in ("labels", "boxes", "orig_size", "size"):
        assert ta[key].dtype == tb[key].dtype and ta[key].shape == tb[key].shape, key
        assert ta[key].numpy().tobytes() == tb[key].numpy().tobytes(), key


@pytest.fixture
def count_renders(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts ``render_scene`` calls made by datasets (a cache hit renders nothing)."""
    import detr_lineage.data.toy_shapes as toy

    calls: list[int] = []
    render = toy.render_scene

    def counting(*args, **kwargs):
        calls.append(1)
        return render(*args, **kwargs)

    monkeypatch.setattr(toy, "render_scene", counting)
    return calls


@pytest.mark.parametrize("preset", ["cluttered", "crowded"])  # noise + clutter, many objects
def test_cached_items_equal_rendered_items_in_any_access_order(preset, count_renders) -> None:
    n = 10
    reference = [ToyShapesDataset(small(preset), "val", n, seed=5)[i] for i in range(n)]
    orders = [list(range(n - 1, -1, -1)), [3, 7, 3, 0, 9, 1, 8, 2, 6, 5, 4, 7]]  # fill orders
    for order in orders:
        cached = ToyShapesDataset(small(preset), "val", n, seed=5, cache=True)
        assert cached.cache
        count_renders.clear()
        for i in order:  # first reads fill the cache, repeated ones (3, 7) already hit it
            assert_same_item(cached[i], reference[i])
        assert len(count_renders) == n  # each image rendered exactly once
        for i in range(n):  # later reads: memory only, still exact
            assert_same_item(cached[i], reference[i])
            assert_same_item(cached[i - n], reference[i])  # negative indices too
        assert len(count_renders) == n
    assert any(len(t["labels"]) for _, t in reference)


def test_cached_items_are_fresh_copies_and_transform_runs_on_every_read() -> None:
    config = small("crowded", max_objects=12)
    reference = [ToyShapesDataset(config, "train", 3, seed=1)[i] for i in range(3)]
    cached = ToyShapesDataset(config, "train", 3, seed=1, cache=True)
    for i in range(3):
        image, target = cached[i]
        image.mul_(0.0)  # callers' in-place edits must not reach the cache
        target["boxes"] *= 2.0
        target["labels"][:] = 5
        target["size"][0] = 1
        assert_same_item(cached[i], reference[i])
    calls: list[int] = []

    def halve_and_flip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        calls.append(target["image_id"])
        target["boxes"][:, 0] = 1.0 - target["boxes"][:, 0]  # in place, as transforms may do
        return image.mul_(0.5), target

    transformed = ToyShapesDataset(config, "train", 3, seed=1, transform=halve_and_flip, cache=True)
    for _ in range(2):  # the same result on the filling read and on a cached read
        for i in (2, 0, 1):
            image, target = transformed[i]
            ref_image, ref_target = reference[i]
            assert torch.equal(image, ref_image * 0.5)
            assert torch.equal(target["boxes"][:, 0], 1.0 - ref_target["boxes"][:, 0])
            assert torch.equal(target["boxes"][:, 1:], ref_target["boxes"][:, 1:])
    assert calls == [2, 0, 1, 2, 0, 1]


def test_datamodule_cache_flag_reaches_every_split() -> None:
    kw = dict(preset="easy", image_size=SMALL, num_train=4, num_val=3, num_test=2, batch_size=2)
    plain = ToyShapesDataModule(**kw)
    assert not any(d.cache for d in (plain.train_set, plain.val_set, plain.test_set))
    dm = ToyShapesDataModule(cache_images=True, **kw)
    assert dm.hparams.cache_images
    loaders = [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()]
    loaders.append(dm.predict_dataloader())
    assert [loader.dataset.split for loader in loaders] == ["train", "val", "test", "test"]
    assert all(loader.dataset.cache for loader in loaders)
    for loader in loaders[1:3]:  # cached batches equal uncached ones
        other = getattr(plain, f"{loader.dataset.split}_dataloader")()
        for a, b in zip(loader, other, strict=True):
            assert torch.equal(a["images"], b["images"])
            for ta, tb in zip(a["targets"], b["targets"], strict=True):
                assert all(torch.equal(ta[k], tb[k]) for k in ("labels", "boxes", "size"))


def test_train_order_and_global_rng_do_not_depend_on_workers_or_cache() -> None:
    """The epoch's order comes from the sampler in the main process, seeded by (seed, epoch):
    num_workers 0 or 1 and the cache change neither the batches nor the global random state
    (which the model's own randomness draws from)."""
    kw = dict(preset="easy", image_size=32, num_train=12, batch_size=4, seed=0)
    runs = []
    for workers, cache in ((1, False), (0, False), (0, True)):
        torch.manual_seed(123)
        dm = ToyShapesDataModule(num_workers=workers, cache_images=cache, **kw)
        loader = dm.train_dataloader()
        epochs = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)  # as Lightning does
            epochs.append([(b["images"], [t["image_id"] for t in b["targets"]]) for b in loader])
        runs.append((epochs, torch.get_rng_state()))
    (ref_epochs, ref_state), *others = runs
    assert [ids for _, ids in ref_epochs[0]] != [ids for _, ids in ref_epochs[1]]  # reshuffled
    for epochs, state in others:
        assert torch.equal(state, ref_state)
        for ref_batches, batches in zip(ref_epochs, epochs, strict=True):
            for (ref_images, ref_ids), (images, ids) in zip(ref_batches, batches, strict=True):
                assert ids == ref_ids and torch.equal(images, ref_images)


@pytest.mark.parametrize("workers", [0, 1])
def test_evaluation_loaders_leave_the_global_random_state_alone(workers: int) -> None:
    """Each validation creates the val loader's iterator; without a generator of its own that
    draws from the global random state, so the training's denoising noise would depend on the
    validation schedule and on num_workers (persistent workers create the iterator once)."""
    kw = dict(image_size=32, num_val=4, num_test=4, batch_size=4)
    dm = ToyShapesDataModule(num_workers=workers, **kw)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        for _ in range(2):
            assert len(list(loader)) == 1
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- data module and errors


def test_datamodule_batch_matches_contract() -> None:
    dm = ToyShapesDataModule(
        preset="crowded", image_size=SMALL, max_objects=12, num_train=6, num_val=3, num_test=2,
        batch_size=4,
    )  # fmt: skip
    assert dm.num_classes == len(CLASS_NAMES) and dm.class_names == CLASS_NAMES
    assert dm.max_objects == 12 and dm.config.min_objects == PRESETS["crowded"].min_objects
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (4, 3, SMALL, SMALL) and batch["images"].dtype == torch.float32
    assert batch["masks"].shape == (4, SMALL, SMALL) and not batch["masks"].any()
    assert len(batch["targets"]) == 4
    for image, target in zip(batch["images"], batch["targets"], strict=True):
        check_contract(image, target, SMALL)
        assert len(target["labels"]) <= 12
    assert [len(dm.val_dataloader().dataset), len(dm.test_dataloader().dataset)] == [3, 2]
    assert len(next(iter(dm.predict_dataloader()))["targets"]) == 2
    assert dm.train_dataloader().dataset.split == "train"


def test_bad_preset_and_ranges_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="valid presets: .*crowded.*easy"):
        ToyShapesDataModule(preset="hard_mode")
    with pytest.raises(ValueError, match="min_objects"):
        ToyShapesDataModule(min_objects=5, max_objects=2)
    with pytest.raises(ValueError, match="min_size"):
        ToyShapesDataModule(min_size=0.5, max_size=0.2)
    with pytest.raises(ValueError, match="max_size .*larger than the image"):
        ToyShapesDataModule(max_size=1.5)
    with pytest.raises(ValueError, match="max_overlap"):
        ToyShapesDataModule(max_overlap=1.2)
    with pytest.raises(ValueError, match="image_size"):
        ToyShapesDataModule(image_size=4)
    with pytest.raises(ValueError, match="noise"):
        ToyShapesDataModule(noise=-0.1)
    with pytest.raises(ValueError, match="batch_size"):
        ToyShapesDataModule(batch_size=0)
    with pytest.raises(ValueError, match="split"):
        ToyShapesDataset("easy", "holdout")
    with pytest.raises(IndexError):
        ToyShapesDataset("easy", "train", 3)[3]
