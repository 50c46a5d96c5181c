"""Batch collation shared by every detection data module (toy shapes, COCO).

Images of different sizes are zero-padded at the bottom/right to the largest height and width of
the batch; the padding mask tells the networks (attention key-padding, position encodings)
which pixels are not part of the image. Targets stay a list of per-image dicts because the
number of objects differs from image to image (and may be zero).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    get_worker_info,
)

__all__ = [
    "DetectionLoader",
    "EpochShuffleSampler",
    "collate_detection",
    "evaluation_sampler",
    "pack_targets",
    "unpack_targets",
]

PACKED = "__packed_targets__"


def collate_detection(
    batch: list[tuple[Tensor, dict[str, Any]]], *, pad_to_multiple: int = 1
) -> dict[str, Any]:
    """Stack ``(image, target)`` items into ``{"images", "masks", "targets"}``.

    ``images`` is float ``[B,C,Hmax,Wmax]`` with zeros in the padding, ``masks`` is bool
    ``[B,Hmax,Wmax]`` with True exactly on the padding, ``targets`` is the list of the B target
    dicts unchanged. ``pad_to_multiple`` (keyword, default 1 = no rounding) rounds Hmax and Wmax
    up to a multiple, for networks whose strides need it (use ``functools.partial``).
    """
    if len(batch) == 0:
        raise ValueError("collate_detection got an empty batch")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    images = [image for image, _ in batch]
    for image in images:
        if image.dim() != 3:
            raise ValueError(f"expected images of shape [C,H,W], got {tuple(image.shape)}")
    channels = images[0].shape[0]
    if any(image.shape[0] != channels for image in images):
        raise ValueError("all images of a batch must have the same number of channels")
    h_max = max(image.shape[1] for image in images)
    w_max = max(image.shape[2] for image in images)
    h_max = -(-h_max // pad_to_multiple) * pad_to_multiple
    w_max = -(-w_max // pad_to_multiple) * pad_to_multiple

    padded = images[0].new_zeros((len(images), channels, h_max, w_max))  # [B,C,Hmax,Wmax]
    masks = torch.ones((len(images), h_max, w_max), dtype=torch.bool)  # [B,Hmax,Wmax]
    for b, image in enumerate(images):
        _, h, w = image.shape
        padded[b, :, :h, :w].copy_(image)
        masks[b, :h, :w] = False
    return {"images": padded, "masks": masks, "targets": [target for _, target in batch]}


# -- moving targets between processes ----------------------------------------------------------
# Every tensor a loader worker sends to the main process is handed over separately (a shared
# memory segment and a file descriptor passed over a socket). A batch of 32 toy images carries
# ~130 small target tensors: measured here, that made a one-worker loader 3-4x slower than
# drawing the same images in the main process. Workers therefore send one tensor per target key
# for the whole batch, and the loader splits it back into the per-image dicts (views).


def pack_targets(targets: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-image target dicts -> one concatenated tensor per tensor-valued key (+ lengths).

    Keys whose values are not all tensors of one dtype and trailing shape stay per-image lists.
    """
    keys = list(targets[0]) if targets else []
    tensors, lengths, lists = {}, {}, {}
    for key in keys:
        values = [t.get(key) for t in targets]
        first = values[0]
        if all(
            isinstance(v, Tensor)
            and v.dim() > 0
            and v.dtype == first.dtype
            and v.shape[1:] == first.shape[1:]
            for v in values
        ):
            tensors[key], lengths[key] = torch.cat(values), [len(v) for v in values]
        else:
            lists[key] = values
    return {
        PACKED: len(targets),
        "keys": keys,
        "tensors": tensors,
        "lengths": lengths,
        "lists": lists,
    }


def unpack_targets(packed: dict[str, Any]) -> list[dict[str, Any]]:
    """The inverse of ``pack_targets`` (tensors come back as views of the packed ones)."""
    parts = {k: torch.split(v, packed["lengths"][k]) for k, v in packed["tensors"].items()}
    parts.update(packed["lists"])
    return [{k: parts[k][i] for k in packed["keys"]} for i in range(packed[PACKED])]


class PackingCollate:
    """``collate_fn`` wrapper: in a loader worker, send the batch's targets packed."""

    def __init__(self, collate_fn: Callable[[list], dict[str, Any]]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list) -> dict[str, Any]:
        batch = self.collate_fn(items)
        if get_worker_info() is not None:
            batch["targets"] = pack_targets(batch["targets"])
        return batch


def evaluation_sampler(dataset: Dataset) -> DistributedSampler | None:
    """Under DDP, each process evaluates its own images and none twice: Lightning's default
    ``DistributedSampler`` repeats images to even out the split, and a repeated image would be
    counted twice in mAP and in ``val/loss``. Processes may then run one batch more than others
    (nothing in an evaluation step communicates). None when not distributed.

    Evaluation loaders also get their own ``generator`` (see the data modules): creating a
    loader's iterator draws a seed from its generator, or from the global random state when it
    has none, so every validation would shift the random stream training draws from (denoising
    noise, dropout), by how many loaders were created, i.e. by ``num_workers`` (persistent
    workers create one) and by the validation schedule."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, shuffle=False)


class EpochShuffleSampler(RandomSampler):
    """Random order fixed by ``(seed, epoch)`` (Lightning calls ``set_epoch``), so a resumed
    run sees the same order; ``start`` skips the first indices of the next pass only."""

    def __init__(self, data_source: Any, seed: int | None = None) -> None:
        super().__init__(data_source)
        self.seed = int(torch.initial_seed() if seed is None else seed) % 2**63
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed((self.seed + self.epoch) % 2**63)
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        start, self.start = self.start, 0
        yield from order[start:]


class DetectionLoader(DataLoader):
    """A ``DataLoader`` whose workers send targets packed and whose batches arrive unpacked:
    what it yields is exactly ``collate_fn``'s batch (the data contract), only faster.

    Resumable (Lightning's ``state_dict`` / ``load_state_dict``): ``shuffle=True`` draws the
    order from ``EpochShuffleSampler``, and a run resumed mid-epoch continues with the batches
    the interrupted one had not trained on (none repeated, none missed).
    """

    def __init__(self, dataset: Any, *args: Any, collate_fn: Callable | None = None, **kw: Any):
        collate = collate_fn or collate_detection
        if not isinstance(collate, PackingCollate):
            collate = PackingCollate(collate)
        if kw.get("shuffle") and kw.get("sampler") is None and kw.get("batch_sampler") is None:
            kw["shuffle"], kw["sampler"] = None, EpochShuffleSampler(dataset)
            # workers' seeds from (seed, epoch) too, not from the global random state
            if kw.get("generator") is None:
                kw["generator"] = torch.Generator()
        super().__init__(dataset, *args, collate_fn=collate, **kw)
        self._yielded = 0  # batches of the current pass handed out
        self._skip = 0  # batches to leave out of the next pass (restored from a checkpoint)

    def state_dict(self) -> dict[str, int]:
        state = {"batches": self._yielded}
        if isinstance(self.sampler, EpochShuffleSampler):
            state["seed"] = self.sampler.seed
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.sampler, EpochShuffleSampler) and "seed" in state:
            self.sampler.seed = int(state["seed"])
        batches = int(state.get("batches", 0))
        self._skip = batches if batches < len(self) else 0  # a finished pass: start anew

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skip, self._skip = self._skip, 0
        self._yielded = skip
        if isinstance(self.sampler, EpochShuffleSampler) and self.generator is not None:
            self.generator.manual_seed((self.sampler.seed + self.sampler.epoch + 1) % 2**63)
        if skip and isinstance(self.sampler, EpochShuffleSampler) and self.batch_size:
            self.sampler.start, skip = skip * self.batch_size, 0  # skip indices, not images
        for batch in super().__iter__():
            if skip:  # another sampler (e.g. DDP's): drop the batches already trained on
                skip -= 1
                continue
            targets = batch.get("targets") if isinstance(batch, dict) else None
            if isinstance(targets, dict) and PACKED in targets:
                batch["targets"] = unpack_targets(targets)
            self._yielded += 1
            yield batch
