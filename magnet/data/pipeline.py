"""The training and evaluation streams as lists of small named stages (CONVENTIONS.md 4-6).

Training, per rank: shard_list (the split, repeated forever: resampled) -> shuffle_shards (a seeded
permutation per round, the same on every rank) -> split_by_node -> split_by_worker -> samples
(tar members as bytes) -> shuffle (a buffer of encoded samples) -> skip (resume position) ->
decode -> subsample -> augment -> collate -> with_epoch (every rank and worker yields a fixed
number of batches). Every random choice is seeded from (seed, epoch, rank, worker, round or
sample index), so a stream is a pure function of the seed and a resumed run sees the same batches.

Evaluation, per rank: shard_list (once) -> split_by_node -> split_by_worker -> samples -> decode ->
chunk (every bin once) -> collate; no resampling, no augmentation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from magnet.data.manifest import check_manifest, geometry_of, load_manifest, manifest_path, split_shards
from magnet.data.transforms import augment, chunk_bins, decode_sample, subsample_bins
from magnet.dist import WorldInfo

Stage = Callable[[Iterator], Iterator]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _worker(num_workers: int, rotate: int = 0) -> tuple[int, int]:
    """(logical worker id, worker count); ``rotate`` shifts ids so a resumed epoch keeps its batch order."""
    info = get_worker_info()
    if info is None:
        return 0, 1
    return (info.id + rotate) % num_workers, num_workers


class Pipeline(IterableDataset):
    """Stages applied in order to an empty source; ``names`` lists them."""

    def __init__(self, stages: list[tuple[str, Stage]]):
        super().__init__()
        self.stages = stages

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.stages]

    def __iter__(self):
        it: Iterator = iter(())
        for _, stage in self.stages:
            it = stage(it)
        return it


# -- stages -------------------------------------------------------------------------------------


def shard_list(urls: list[str], repeat: bool) -> Stage:
    def stage(_: Iterator) -> Iterator:
        rounds = itertools.count() if repeat else [0]
        for r in rounds:
            for u in urls:
                yield {"url": u, "round": r}
    return stage


def shuffle_shards(seed: int, epoch: int, n: int) -> Stage:
    """Permute each round of ``n`` shards with a generator from (seed, epoch, round): same on all ranks."""
    def stage(src: Iterator) -> Iterator:
        while True:
            rnd = list(itertools.islice(src, n))
            if not rnd:
                return
            for i in _rng(seed, epoch, rnd[0]["round"]).permutation(len(rnd)):
                yield rnd[i]
    return stage


def split_by_node(world: WorldInfo) -> Stage:
    def stage(src: Iterator) -> Iterator:
        return itertools.islice(src, world.rank, None, world.world_size)
    return stage


def split_by_worker(num_workers: int, rotate: int = 0) -> Stage:
    def stage(src: Iterator) -> Iterator:
        w, n = _worker(num_workers, rotate)
        return itertools.islice(src, w, None, n)
    return stage


def samples() -> Stage:
    import webdataset as wds

    return wds.tarfile_to_samples()


def shuffle(bufsize: int, initial: int, seed: int, epoch: int, rank: int, num_workers: int, rotate: int) -> Stage:
    """A buffer of still-encoded samples: filled to ``initial`` first, then grows to ``bufsize``."""
    def stage(src: Iterator) -> Iterator:
        rng = _rng(seed, epoch, rank, _worker(num_workers, rotate)[0], 1)
        buf: list = []
        for s in src:
            buf.append(s)
            if len(buf) < bufsize:
                buf.extend(itertools.islice(src, 1))
            if len(buf) >= min(initial, bufsize):
                yield _pick(buf, rng)
        while buf:
            yield _pick(buf, rng)
    return stage


def _pick(buf: list, rng: np.random.Generator):
    i = int(rng.integers(len(buf)))
    buf[i], buf[-1] = buf[-1], buf[i]
    return buf.pop()


def number() -> Stage:
    def stage(src: Iterator) -> Iterator:
        for i, s in enumerate(src):
            s["__index__"] = i
            yield s
    return stage


def skip(count: Callable[[], int]) -> Stage:
    """Drop the samples a resumed run has already trained on (before decoding them)."""
    def stage(src: Iterator) -> Iterator:
        return itertools.islice(src, count(), None)
    return stage


def decode() -> Stage:
    def stage(src: Iterator) -> Iterator:
        for s in src:
            index = s.get("__index__", 0)
            d = decode_sample(s)
            d["__index__"] = index
            yield d
    return stage


def per_sample(fn: Callable[[dict, np.random.Generator], dict], key: Callable[[], tuple], tag: int) -> Stage:
    """Apply ``fn(sample, rng)`` with a generator seeded from ``key() + (tag, sample index)``."""
    def stage(src: Iterator) -> Iterator:
        k = key()
        for s in src:
            yield fn(s, _rng(*k, tag, s["__index__"]))
    return stage


def chunk(cap: int) -> Stage:
    def stage(src: Iterator) -> Iterator:
        for s in src:
            yield from chunk_bins(s, cap)
    return stage


def collate(batch_size: int, geometry, partial: bool, knn: dict) -> Stage:
    """Group samples into the model's :class:`magnet.batch.Batch` (``knn``: its ``k_bin/k_spot/k_global``)."""
    from magnet.batch import collate as model_collate

    def stage(src: Iterator) -> Iterator:
        while True:
            group = list(itertools.islice(src, batch_size))
            if not group or (len(group) < batch_size and not partial):
                return
            for s in group:
                s.pop("__index__", None)
            yield model_collate(group, geometry, **knn)
    return stage


def with_epoch(count: Callable[[], int]) -> Stage:
    def stage(src: Iterator) -> Iterator:
        return itertools.islice(src, count())
    return stage


# -- streams ------------------------------------------------------------------------------------


class ShardSet:
    """One bin size's shards: the manifest, checked against what this run expects."""

    def __init__(self, shards: str, bin_um: int, genes: list[str] | None, normalisation: dict | None):
        self.root = Path(shards) / f"{bin_um}um"
        self.manifest = load_manifest(shards, bin_um)
        check_manifest(self.manifest, manifest_path(shards, bin_um), genes=genes, normalisation=normalisation)
        self.geometry = geometry_of(self.manifest)
        self.genes = list(self.manifest["genes"])
        self.normalisation = self.manifest["normalisation"]

    def shards(self, split: str) -> list[tuple[str, int]]:
        return split_shards(self.manifest, self.root, split)


class TrainStream:
    """Equal, deterministic micro-batches per rank: ``epoch(e, skip)`` yields ``batches_per_epoch - skip``."""

    def __init__(self, shard_set: ShardSet, cfg, world: WorldInfo, seed: int, knn: dict):
        self.set, self.cfg, self.world, self.seed, self.knn = shard_set, cfg, world, seed, knn
        shards = shard_set.shards(cfg.train_split)
        self.urls = [u for u, _ in shards]
        total = cfg.epoch_samples or sum(n for _, n in shards)
        self.n_workers = max(cfg.workers, 1)
        per_worker = max(1, math.ceil(total / (world.world_size * cfg.micro_batch * self.n_workers)))
        self.batches_per_worker = per_worker
        self.batches_per_epoch = per_worker * self.n_workers
        # a round holds the list enough times that every (rank, worker) gets at least one shard of it
        self.repeats = math.ceil(world.world_size * self.n_workers / len(self.urls))

    def stages(self, epoch: int, skip_batches: int = 0) -> list[tuple[str, Stage]]:
        cfg, nw, world, seed = self.cfg, self.n_workers, self.world, self.seed
        rotate = skip_batches % nw

        def done_batches() -> int:  # batches this logical worker yielded before the resume point
            w = _worker(nw, rotate)[0]
            return max(0, -(-(skip_batches - w) // nw))

        def key() -> tuple:
            return seed, epoch, world.rank, _worker(nw, rotate)[0]

        urls = self.urls * self.repeats
        stages = [
            ("shard_list", shard_list(urls, repeat=True)),
            ("shuffle_shards", shuffle_shards(seed, epoch, len(urls))),
            ("split_by_node", split_by_node(world)),
            ("split_by_worker", split_by_worker(nw, rotate)),
            ("samples", samples()),
            ("shuffle", shuffle(cfg.shuffle_buffer, cfg.shuffle_initial, seed, epoch, world.rank, nw, rotate)),
            ("number", number()),
            ("skip", skip(lambda: done_batches() * cfg.micro_batch)),
            ("decode", decode()),
            ("subsample", per_sample(lambda s, r: subsample_bins(s, cfg.max_bins, r), key, 2)),
        ]
        if cfg.augment:
            g = self.set.geometry
            stages.append(("augment", per_sample(lambda s, r: augment(s, g, r), key, 3)))
        stages += [
            ("collate", collate(cfg.micro_batch, self.set.geometry, False, self.knn)),
            ("with_epoch", with_epoch(lambda: self.batches_per_worker - done_batches())),
        ]
        return stages

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterable:
        return _loader(Pipeline(self.stages(epoch, skip_batches)), self.cfg)


class EvalStream:
    """Every sample of a split exactly once per rank group, all bins, no augmentation."""

    def __init__(self, shard_set: ShardSet, cfg, world: WorldInfo, split: str, knn: dict):
        self.set, self.cfg, self.world, self.knn = shard_set, cfg, world, knn
        self.urls = [u for u, _ in shard_set.shards(split)]

    def stages(self) -> list[tuple[str, Stage]]:
        nw = max(self.cfg.workers, 1)
        return [
            ("shard_list", shard_list(self.urls, repeat=False)),
            ("split_by_node", split_by_node(self.world)),
            ("split_by_worker", split_by_worker(nw)),
            ("samples", samples()),
            ("decode", decode()),
            ("chunk", chunk(self.cfg.max_bins)),
            ("collate", collate(self.cfg.eval_batch, self.set.geometry, True, self.knn)),
        ]

    def __iter__(self):
        return iter(_loader(Pipeline(self.stages()), self.cfg))


def _loader(pipe: Pipeline, cfg) -> DataLoader:
    kw = {"prefetch_factor": cfg.prefetch} if cfg.workers > 0 else {}
    return DataLoader(pipe, batch_size=None, num_workers=cfg.workers, worker_init_fn=_worker_threads,
                      pin_memory=torch.cuda.is_available(), **kw)


def _worker_threads(_: int) -> None:
    torch.set_num_threads(1)
