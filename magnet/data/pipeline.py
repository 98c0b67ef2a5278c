"""The training and evaluation streams as lists of small named stages.

Training, per rank: shard_list (the split, repeated forever: resampled) -> shuffle_shards (a seeded
permutation per round, the same on every rank) -> split_by_node (webdataset's) -> split_by_worker ->
samples (shards checked, then webdataset's ``tarfile_to_samples``: member bytes, names checked) ->
shuffle (webdataset's, a buffer of encoded samples) -> skip (resume position) -> decode (schema
check) -> window -> augment -> collate -> with_epoch (every rank and worker yields a fixed number of
batches). Every random choice is seeded from (seed, epoch, rank, worker, round or
sample index), so a stream is a pure function of the seed and a resumed run sees the same batches.
Corrupted shards and samples are handled by ``data.on_corrupt`` (:mod:`magnet.format.reader`, the one
checked reader, also used by the training statistics and ``magnet shard validate``).

Evaluation, per rank: shard_list (once) -> split_by_node -> split_by_worker -> samples -> decode ->
chunk (every bin once) -> collate; no resampling, no augmentation.
"""

from __future__ import annotations

import itertools
import math
import random
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from magnet.batch import collate as model_collate
from magnet.data.manifest_view import check_manifest, fold_view
from magnet.data.transforms import augment, chunk_bins, window_bins
from magnet.dist import WorldInfo
from magnet.errors import UserError
from magnet.format.manifest import Manifest, manifest_path
from magnet.format.reader import ShardReader
from magnet.format.sample import Sample

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
    """Own: webdataset's ResampledShards draws with replacement; here every round lists each shard once."""
    def stage(_: Iterator) -> Iterator:
        rounds = itertools.count() if repeat else [0]
        for r in rounds:
            for u in urls:
                yield {"url": u, "round": r}
    return stage


def shuffle_shards(seed: int, epoch: int, n: int) -> Stage:
    """Permute each round of ``n`` shards with a generator from (seed, epoch, round): same on all ranks.
    Own: webdataset shuffles shard lists per process, which would give the ranks different orders."""
    def stage(src: Iterator) -> Iterator:
        while True:
            rnd = list(itertools.islice(src, n))
            if not rnd:
                return
            for i in _rng(seed, epoch, rnd[0]["round"]).permutation(len(rnd)):
                yield rnd[i]
    return stage


def split_by_node(world: WorldInfo) -> Stage:
    """webdataset's, which reads the rank from the environment or torch.distributed: checked against ``world``."""
    def stage(src: Iterator) -> Iterator:
        rank, size = wds.utils.pytorch_worker_info()[:2]
        if (rank, size) != (world.rank, world.world_size):
            raise RuntimeError(f"webdataset sees rank {rank} of {size}, the stream was made for {world}")
        return wds.split_by_node(src)
    return stage


def split_by_worker(num_workers: int, rotate: int = 0) -> Stage:
    """Own: webdataset's cannot rotate worker ids, which an exact resume mid-epoch needs."""
    def stage(src: Iterator) -> Iterator:
        w, n = _worker(num_workers, rotate)
        return itertools.islice(src, w, None, n)
    return stage


def shuffle(bufsize: int, initial: int, seed: int, epoch: int, rank: int, num_workers: int, rotate: int) -> Stage:
    """webdataset's shuffle buffer of still-encoded samples, its generator seeded in the worker from
    (seed, epoch, rank, logical worker)."""
    def stage(src: Iterator) -> Iterator:
        key = [seed, epoch, rank, _worker(num_workers, rotate)[0], 1]
        rng = random.Random(int(np.random.SeedSequence(key).generate_state(1)[0]))
        return wds.shuffle(bufsize, initial, rng=rng)(src)
    return stage


def number() -> Stage:
    """Own: the sample's position in the stream, which seeds its random choices (webdataset has none)."""
    def stage(src: Iterator) -> Iterator:
        for i, s in enumerate(src):
            s["__index__"] = i
            yield s
    return stage


def skip(count: Callable[[], int]) -> Stage:
    """Drop the samples a resumed run has already trained on (before decoding them). Own: webdataset has
    no resume position."""
    def stage(src: Iterator) -> Iterator:
        return itertools.islice(src, count(), None)
    return stage


def per_sample(fn: Callable[[Sample, np.random.Generator], Sample], key: Callable[[], tuple], tag: int) -> Stage:
    """Apply ``fn(sample, rng)`` with a generator seeded from ``key() + (tag, sample index)``."""
    def stage(src: Iterator) -> Iterator:
        k = key()
        for s in src:
            yield fn(s, _rng(*k, tag, s.index))
    return stage


def chunk(cap: int) -> Stage:
    def stage(src: Iterator) -> Iterator:
        for s in src:
            yield from chunk_bins(s, cap)
    return stage


def collate(batch_size: int, geometry, partial: bool, knn: dict, reader: ShardReader) -> Stage:
    """Group samples into the model's :class:`magnet.batch.Batch` (``knn``: its ``k_bin/k_spot/k_global``);
    ``batch.corrupt_samples``: samples skipped in this loader process since its previous batch."""
    def stage(src: Iterator) -> Iterator:
        while True:
            group = list(itertools.islice(src, batch_size))
            if not group or (len(group) < batch_size and not partial):
                return
            batch = model_collate(group, geometry, **knn)
            batch.corrupt_samples = reader.take()
            yield batch
    return stage


def with_epoch(count: Callable[[], int]) -> Stage:
    """Own: the count is known only in the worker (it depends on the resume point and the worker id),
    where webdataset's with_epoch takes it when the pipeline is built."""
    def stage(src: Iterator) -> Iterator:
        return itertools.islice(src, count())
    return stage


# -- streams ------------------------------------------------------------------------------------


class ShardSet:
    """One bin size's shards: the manifest, checked against what this run expects. ``folds`` is the
    manifest's ``slide -> fold`` map where the set is a cross-validation view (:meth:`for_training`)."""

    def __init__(self, shards: str, bin_um: int, genes: list[str] | None, normalisation: dict | None,
                 bin_input: str = "image", field: int = 0):
        self.manifest = Manifest.load(manifest_path(shards, bin_um))
        check_manifest(self.manifest, genes=genes, normalisation=normalisation)
        # features: the bins' cached frozen features are read and the images are never decoded; their field only
        # when the model reads it (model.field)
        self.skip = (("image",) if bin_input == "features" else ()) + (() if field else ("bin_field",))
        if bin_input == "features" and not self.manifest.encoder.get("bin_features"):
            raise UserError(f"{self.manifest.path}: encoder.bin_features: these shards hold no bin features "
                            f"(model.bin_input=features); re-shard with encoder.bin_features=true")
        stored = len(self.manifest.encoder.get("field_sd_um", ()))
        if field and field != stored:
            raise UserError(f"{self.manifest.path}: encoder.field_sd_um: these shards hold the bin features' field at "
                            f"{stored} scales, model.field reads {field}; re-shard with encoder.field_sd_um or set "
                            f"model.field={stored}")
        self.geometry = self.manifest.geometry
        self.genes = list(self.manifest.genes)
        self.normalisation = self.manifest.normalisation
        self.folds: dict[str, int] | None = None

    @classmethod
    def for_training(cls, data, bin_input: str = "image", field: int = 0) -> ShardSet:
        """The shards a training run with ``data`` (:class:`magnet.train_config.DataConfig`) reads: with
        ``data.fold`` set, the manifest's splits are replaced by that fold's (:func:`fold_view`); ``bin_input``:
        ``model.bin_input``; ``field``: ``model.field``."""
        s = cls(data.shards, data.bin_um, data.genes, data.normalisation, bin_input, field)
        if data.fold is not None:
            s.manifest = fold_view(s.manifest, data.fold, data.folds, data.train_split, data.eval_split)
            s.folds = dict(sorted(s.manifest.folds.items()))
        return s

    def shards(self, split: str) -> list[tuple[str, int]]:
        return self.manifest.shard_files(split)

    def reader(self, policy: str) -> ShardReader:
        """The checked reader of these shards under ``policy`` (``data.on_corrupt``)."""
        return ShardReader(self.manifest, policy, skip=self.skip)


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
        self.position = {"epoch": 0, "batch_in_epoch": 0}

    def stages(self, epoch: int, skip_batches: int = 0) -> list[tuple[str, Stage]]:
        cfg, nw, world, seed = self.cfg, self.n_workers, self.world, self.seed
        rotate = skip_batches % nw

        def done_batches() -> int:  # batches this logical worker yielded before the resume point
            w = _worker(nw, rotate)[0]
            return max(0, -(-(skip_batches - w) // nw))

        def key() -> tuple:
            return seed, epoch, world.rank, _worker(nw, rotate)[0]

        urls = self.urls * self.repeats
        reader = self.set.reader(cfg.on_corrupt)
        stages = [
            ("shard_list", shard_list(urls, repeat=True)),
            ("shuffle_shards", shuffle_shards(seed, epoch, len(urls))),
            ("split_by_node", split_by_node(world)),
            ("split_by_worker", split_by_worker(nw, rotate)),
            ("samples", reader.raw),
            ("shuffle", shuffle(cfg.shuffle_buffer, cfg.shuffle_initial, seed, epoch, world.rank, nw, rotate)),
            ("number", number()),
            ("skip", skip(lambda: done_batches() * cfg.micro_batch)),
            ("decode", reader.decode),
            ("window", per_sample(lambda s, r: window_bins(s, cfg.max_bins, r), key, 2)),
        ]
        if cfg.augment:
            g = self.set.geometry
            stages.append(("augment", per_sample(lambda s, r: augment(s, g, r), key, 3)))
        stages += [
            ("collate", collate(cfg.micro_batch, self.set.geometry, False, self.knn, reader)),
            ("with_epoch", with_epoch(lambda: self.batches_per_worker - done_batches())),
        ]
        return stages

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterable:
        return _loader(Pipeline(self.stages(epoch, skip_batches)), self.cfg)

    def state_dict(self) -> dict[str, int]:
        """The stream's position: batches handed out of the current epoch (saved in checkpoints)."""
        return dict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = {"epoch": int(state["epoch"]), "batch_in_epoch": int(state["batch_in_epoch"])}

    def __iter__(self) -> Iterator:
        """Batches from the position on, epoch after epoch, forever; the position counts each batch handed out."""
        while True:
            for batch in self.epoch(self.position["epoch"], self.position["batch_in_epoch"]):
                self.position["batch_in_epoch"] += 1
                yield batch
            self.position = {"epoch": self.position["epoch"] + 1, "batch_in_epoch": 0}


class EvalStream:
    """Every sample of a split exactly once per rank group, all bins, no augmentation."""

    def __init__(self, shard_set: ShardSet, cfg, world: WorldInfo, split: str, knn: dict):
        self.set, self.cfg, self.world, self.knn = shard_set, cfg, world, knn
        self.urls = [u for u, _ in shard_set.shards(split)]

    def stages(self) -> list[tuple[str, Stage]]:
        nw = max(self.cfg.workers, 1)
        reader = self.set.reader(self.cfg.on_corrupt)
        return [
            ("shard_list", shard_list(self.urls, repeat=False)),
            ("split_by_node", split_by_node(self.world)),
            ("split_by_worker", split_by_worker(nw)),
            ("samples", reader.raw),
            ("decode", reader.decode),
            ("chunk", chunk(self.cfg.max_bins)),
            ("collate", collate(self.cfg.eval_batch, self.set.geometry, True, self.knn, reader)),
        ]

    def __iter__(self):
        return iter(_loader(Pipeline(self.stages()), self.cfg))


def _loader(pipe: Pipeline, cfg) -> Iterator:
    kw = {"prefetch_factor": cfg.prefetch} if cfg.workers > 0 else {}
    loader = DataLoader(pipe, batch_size=None, num_workers=cfg.workers, worker_init_fn=_worker_init,
                        pin_memory=torch.cuda.is_available(), **kw)
    try:
        yield from loader
    except RuntimeError as e:  # a UserError in a worker comes back as its traceback: keep the one-line message
        prefix, last = f"{UserError.__module__}.UserError: ", str(e).strip().splitlines()[-1]
        if not (str(e).startswith("Caught UserError") and last.startswith(prefix)):
            raise
        raise UserError(last[len(prefix):]) from None


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    sys.excepthook = _quiet_when_the_consumer_left


def _quiet_when_the_consumer_left(exc_type, exc, tb) -> None:
    """A worker hands each batch over as a file descriptor, served by multiprocessing's resource_sharer
    thread, which reports its errors through ``sys.excepthook``. When the main process stops mid-handover
    (Ctrl-C, an error), that connection is reset: the batch is moot, and its traceback would bury the run's
    one-line message. Every other error prints as usual."""
    if not (issubclass(exc_type, ConnectionError)
            and any(f.filename.endswith("multiprocessing/resource_sharer.py") for f in traceback.extract_tb(tb))):
        sys.__excepthook__(exc_type, exc, tb)
