"""Orchestration: check inputs up front, then inspect and shard slides on workers, then finalise.

1. In the driver (before any worker starts): samplesheet, files, scalefactors, parquet columns,
   image mode and size, gene sets of every matrix, gene file, splits. Bad input fails here in seconds.
2. Per slide, on a worker: read every bin size in full (content checks) and sum gene statistics;
   the training slides' statistics choose the cohort's genes.
3. Per slide, on a worker: tile images, frozen features and samples for every bin size still to
   do, into ``{bin}um/.work/{slide}/`` (renamed into place when complete; re-runs skip those).
4. Driver: parts renamed to ``{bin}um/{split}-NNNNNN.tar`` (numbered per split in slide order),
   then ``manifest.json`` written atomically, then the work folder removed.

Workers are :class:`~sharding.slide.SlideWorker`: each builds the frozen encoder once and serves
slide after slide. With one worker (one slide, or one local core) it runs in the driver's process
and Ray is not started; otherwise one Ray actor per worker (``--address``, or a Ray session already
started, always uses Ray). The last stderr line gives the run's seconds: driver phases, and the
slides' phases summed over slides.

Nothing under a final name is half-written; a re-run with the same inputs and config finishes
what is missing and leaves finished bin sizes alone. "The same inputs" is checked, not assumed: each
bin size's plan hashes the config, genes, splits and every slide's content fingerprint, and the
manifest records each slide's files (``inputs``); finished shards of other inputs (say two slides'
paths swapped in the samplesheet) are refused naming the slide, unfinished work of them is redone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from ray.exceptions import RayTaskError
from tqdm import tqdm

from magnet.config import git_revision, save_config, to_dict
from magnet.errors import UserError
from magnet.format.manifest import Manifest, write_manifest
from magnet.format.schema import FORMAT_VERSION, RAW_COUNTS
from magnet.io import atomic_write_text, check_not_input, remove_stale

from . import tuned_encoder
from .bin_features import encoder_record
from .binned_outputs import BinFiles, check_positions_columns, read_genes, read_mpp
from .config import ShardConfig
from .genes import GeneStats, genes_from_file, normalisation_record, select_genes
from .image import SlideImage
from .pairing import check_pairing
from .ray_cluster import ray_session
from .samplesheet import SPLITS, SlideEntry, read_samplesheet
from .slide import DONE, Clock, SlideWorker
from .splits import assign_splits

WORK = ".work"
SHARD_NAME = re.compile(r"^(train|val|test)-\d{6}\.tar$")


def check_inputs(entries: list[SlideEntry], bin_ums: list[int]) -> tuple[list[str], list[str]]:
    """Cheap checks of every slide at every bin size; the cohort's (gene ids, gene names)."""
    reference = None
    for e in entries:
        mpps = {}
        for b in bin_ums:
            files = BinFiles.of(e.spaceranger, b)
            mpps[b] = read_mpp(files.scalefactors, b)
            if b == bin_ums[0]:
                with SlideImage(e.image) as image:
                    check_pairing(image, files.scalefactors.parent)
            check_positions_columns(files.positions)
            genes = read_genes(files.matrix)
            if reference is None:
                reference = (files.matrix, genes)
            elif genes[0] != reference[1][0]:
                raise UserError(f"{files.matrix}: features/id: gene set differs from {reference[0]} "
                                f"({len(genes[0])} vs {len(reference[1][0])} genes); one cohort needs one gene set")
        first = mpps[bin_ums[0]]
        for b, mpp in mpps.items():
            if abs(mpp - first) > 1e-6 * first:
                raise UserError(f"{BinFiles.of(e.spaceranger, b).scalefactors}: microns_per_pixel: {mpp} differs from "
                                f"{first} at {bin_ums[0]} um for the same image")
    return reference[1]


class Workers:
    """The run's :class:`SlideWorker` s: one in this process (``ray`` None), or one Ray actor per worker
    slot, killed on :meth:`close`. :meth:`map` calls a worker method once per slide, handing slides out as
    workers free up; the first failure is raised (a UserError as is) and :meth:`close` stops the rest."""

    def __init__(self, cfg: ShardConfig, ray=None, n_slides: int = 1):
        self.ray, self.local, self.actors = ray, None, []
        if ray is None:
            self.local = SlideWorker(cfg)
            return
        slots, opts = worker_slots(cfg, ray.cluster_resources())
        actor = ray.remote(**opts)(SlideWorker)
        self.actors = [actor.remote(cfg, in_ray=True) for _ in range(max(1, min(n_slides, slots)))]

    def map(self, method: str, calls: dict[str, tuple], bar=None) -> dict:
        """``{name: worker.method(*args)}`` for ``calls`` ``{name: args}``; ``bar(name, result)`` after each."""
        out = {}
        if self.local is not None:
            for name, args in calls.items():
                out[name] = getattr(self.local, method)(*args)
                if bar is not None:
                    bar(name, out[name])
            return out
        queue, running = list(reversed(calls.items())), {}

        def submit(actor) -> None:
            name, args = queue.pop()
            running[getattr(actor, method).remote(*args)] = (name, actor)

        for actor in self.actors[:len(queue)]:
            submit(actor)
        try:
            while running:
                (ref,), _ = self.ray.wait(list(running), num_returns=1)
                name, actor = running.pop(ref)
                out[name] = self.ray.get(ref)
                if bar is not None:
                    bar(name, out[name])
                if queue:
                    submit(actor)
        except RayTaskError as e:
            if isinstance(e.cause, UserError):
                raise UserError(str(e.cause)) from None
            raise
        return out

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


def worker_slots(cfg: ShardConfig, resources: dict) -> tuple[int, dict]:
    """(how many workers fit, their Ray options) on a cluster with ``resources``: each takes ``cpus_per_task``
    CPUs, and ``gpus_per_task`` of a GPU when the encoder may run on GPUs and the cluster has them."""
    r = cfg.ray
    cpu_slots = int(resources.get("CPU", 1) // r.cpus_per_task)
    gpus = resources.get("GPU", 0) if r.device != "cpu" else 0
    if gpus >= r.gpus_per_task:
        return min(cpu_slots, int(gpus // r.gpus_per_task)), {"num_cpus": r.cpus_per_task, "num_gpus": r.gpus_per_task}
    if r.device == "cuda":
        raise UserError(f"config: ray.device: cuda, but the Ray cluster has {gpus:g} GPUs "
                        f"(ray.gpus_per_task {r.gpus_per_task:g} each); use ray.device=auto or cpu")
    return cpu_slots, {"num_cpus": r.cpus_per_task}


@contextlib.contextmanager
def workers(cfg: ShardConfig, address: str | None, n_slides: int):
    """:class:`Workers` for ``n_slides``: in this process when one local worker does (no Ray started)."""
    local_slots = (cfg.ray.num_cpus or os.cpu_count() or 1) // cfg.ray.cpus_per_task
    if address is None and not _ray_started() and min(n_slides, local_slots) <= 1:
        if cfg.ray.device == "cuda":
            if not torch.cuda.is_available():
                raise UserError("config: ray.device: cuda, but this machine has no CUDA device; "
                                "use ray.device=auto or cpu")
        yield Workers(cfg)
        return
    weights = cfg.encoder.weights
    if weights and Path(weights).is_file():  # a local checkpoint, found by workers in any folder
        cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, weights=str(Path(weights).absolute())))
    with ray_session(address, cfg.ray.num_cpus, cfg.ray.object_store_mb, cfg.ray.progress) as ray:
        pool = Workers(cfg, ray, n_slides)
        try:
            yield pool
        finally:
            pool.close()


def _ray_started() -> bool:
    """A Ray session of this process (the caller's own, reused); Ray is not imported to find out."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _check_distinct(samplesheet, fingerprints: dict[str, dict[str, str]]) -> None:
    """One slide under two names (a copy of its image or count matrix) could land in two splits: refused."""
    seen: dict[tuple[str, str], str] = {}
    for slide, fp in sorted(fingerprints.items()):
        for part in ("image", "matrix"):
            other = seen.setdefault((part, fp[part]), slide)
            if other != slide:
                raise UserError(f"{samplesheet}: slide: '{other}' and '{slide}' have the same {part} (by content, "
                                f"sharding/fingerprint.py); one slide under two names could land in two splits")


def _plan(cfg: ShardConfig, bin_um: int, gene_ids: list[str], splits: dict, folds: dict, inputs: dict) -> str:
    """The hash of what the shards are made from: config, genes, splits and each slide's content (its
    fingerprint; the paths are recorded in ``inputs`` but a moved cohort is the same input)."""
    doc = {"format_version": FORMAT_VERSION, "bin_um": bin_um, "config": _recorded_config(cfg),
           "gene_ids": gene_ids, "splits": splits, "folds": folds,
           "slides": {s: rec["fingerprint"] for s, rec in inputs.items()}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _paths(entry: SlideEntry, samplesheet) -> dict[str, str]:
    """The slide's files as the samplesheet names them (relative to its folder): the same for a moved cohort."""
    base = Path(samplesheet).resolve().parent
    return {col: os.path.relpath(Path(getattr(entry, col)).resolve(), base) for col in ("image", "spaceranger")}


def _what_differs(recorded: dict, inputs: dict) -> str:
    """The first slide whose content differs from the one recorded (``inputs`` of a manifest), else the rest."""
    for slide in sorted(set(recorded) | set(inputs)):
        old, new = recorded.get(slide), inputs.get(slide)
        if old is None or new is None:
            return f"slide '{slide}' is {'new' if old is None else 'no longer in the samplesheet'}"
        for part, path in (("image", "image"), ("matrix", "spaceranger")):
            if old["fingerprint"][part] != new["fingerprint"][part]:
                return (f"slide '{slide}': its {part} is not the one the shards were made from ({path} was "
                        f"{old[path]}, now {new[path]})")
    return "the config, genes or splits differ"


def _recorded_config(cfg: ShardConfig) -> dict:
    """The config that determines the shards (the ``ray`` section only schedules the work)."""
    d = to_dict(cfg)
    d.pop("ray")
    if not d["encoder"]["field_sd_um"]:  # no field: the record (and the plan) of shards written before it existed
        d["encoder"].pop("field_sd_um")
    return d


def _prepare(bin_dir: Path, plan: str, inputs: dict) -> bool:
    """Make ``bin_dir`` ready for ``plan`` (of ``inputs``); False when it is already complete for it."""
    manifest, work = bin_dir / "manifest.json", bin_dir / WORK
    if manifest.is_file():
        done = Manifest.load(manifest)
        if done.extra.get("plan") == plan:
            return False
        raise UserError(f"{manifest}: plan: shards of other inputs or config are there "
                        f"({_what_differs(done.extra.get('inputs', {}), inputs)}); choose another --out")
    if (work / "plan.json").is_file() and json.loads((work / "plan.json").read_text())["plan"] != plan:
        shutil.rmtree(work)  # our own unfinished work for other inputs: start over
        for f in bin_dir.iterdir():
            if SHARD_NAME.match(f.name):
                f.unlink()
    work.mkdir(parents=True, exist_ok=True)
    remove_stale(work)  # a slide folder left by a killed task on this host
    atomic_write_text(work / "plan.json", json.dumps({"plan": plan}))
    return True


def _finalise(bin_dir: Path, records: list[dict], manifest: dict) -> Manifest:
    work = bin_dir / WORK
    counter = dict.fromkeys(SPLITS, 0)
    shards = []
    for rec in sorted(records, key=lambda r: r["slide"]):
        for part in rec["parts"]:
            name = f"{rec['split']}-{counter[rec['split']]:06d}.tar"
            counter[rec["split"]] += 1
            src, dst = work / rec["slide"] / part["part"], bin_dir / name
            if src.is_file():
                os.replace(src, dst)
            elif not dst.is_file():
                raise UserError(f"{dst}: missing and {src} gone; delete {bin_dir} and re-run")
            shards.append({"name": name, "split": rec["split"], "slide": rec["slide"],  # one slide per shard
                           **{k: part[k] for k in ("n_samples", "n_bins", "bytes", "sha256")}})
    manifest["shards"] = sorted(shards, key=lambda s: s["name"])
    typed = Manifest.from_dict(manifest, bin_dir / "manifest.json")
    write_manifest(typed.path, typed.to_dict())
    shutil.rmtree(work)
    return typed


def shard_cohort(samplesheet: str | Path, bin_ums: list[int], out: str | Path, cfg: ShardConfig,
                 address: str | None = None) -> dict[int, dict]:
    """Shard a cohort; return ``{bin_um: manifest}``."""
    clock = Clock()
    entries = read_samplesheet(samplesheet)
    out = Path(out)
    weights = cfg.encoder.weights if cfg.encoder.weights and ":" not in cfg.encoder.weights else None  # a file
    check_not_input(out, "--out", [("--samplesheet", samplesheet), ("genes.gene_file", cfg.genes.gene_file),
                                   ("encoder.weights", weights)]
                    + [(f"slide {e.slide}: {col}", getattr(e, col)) for e in entries
                       for col in ("spaceranger", "image")])
    bin_ums = sorted(set(bin_ums))
    splits, folds = assign_splits(entries, cfg.split, cfg.seed, str(samplesheet))
    stats_bin = cfg.genes.selection_bin_um if cfg.genes.selection != "file" else None
    read_bins_at = sorted(set(bin_ums) | ({stats_bin} if stats_bin else set()))
    gene_ids, gene_names = check_inputs(entries, read_bins_at)
    if cfg.genes.selection == "file":
        genes_from_file(Path(cfg.genes.gene_file), gene_ids, gene_names)
    out = Path(out).absolute()  # the work folders handed to workers
    cfg, weights_source = tuned_encoder.resolve(cfg, out)  # a trained model's bin encoder, as a weights file
    if cfg.encoder.weights and not Path(cfg.encoder.weights).is_file() and ":" not in cfg.encoder.weights:
        raise UserError(f"config: encoder.weights: file not found: {cfg.encoder.weights}")
    by_slide = {e.slide: e for e in entries}
    slide_phases: dict[str, float] = {}
    clock.lap("checks")
    with workers(cfg, address, len(entries)) as pool:
        clock.lap("workers_start")
        found = pool.map("inspect", {e.slide: (e, read_bins_at, len(gene_ids), stats_bin) for e in entries})
        clock.lap("inspect")
        _check_distinct(samplesheet, {s: found[s]["fingerprint"][read_bins_at[0]] for s in found})
        stats = GeneStats(len(gene_ids), cfg.genes)
        for slide in sorted(found):
            if splits[slide] == "train" and found[slide]["stats"] is not None:
                stats.merge(found[slide]["stats"])
        genes = select_genes(gene_ids, gene_names, stats, cfg.genes)
        todo: dict[str, list[int]] = {}
        bin_dirs = {b: out / f"{b}um" for b in bin_ums}
        inputs = {b: {s: {**_paths(by_slide[s], samplesheet), "fingerprint": found[s]["fingerprint"][b]}
                      for s in sorted(found)} for b in bin_ums}
        plans = {b: _plan(cfg, b, [gene_ids[i] for i in genes], splits, folds, inputs[b]) for b in bin_ums}
        for b in bin_ums:
            if not _prepare(bin_dirs[b], plans[b], inputs[b]):
                print(f"shard: {bin_dirs[b]}: up to date", file=sys.stderr)
                continue
            missing = [e.slide for e in entries if not (bin_dirs[b] / WORK / e.slide / DONE).is_file()]
            print(f"shard: {bin_dirs[b]}: {len(entries) - len(missing)} of {len(entries)} slides already done, "
                  f"{len(missing)} to do", file=sys.stderr)
            for slide in missing:
                todo.setdefault(slide, []).append(b)
        if todo:
            save_config(cfg, out / "shard_config.yaml")
        work = {b: str(bin_dirs[b] / WORK) for b in bin_ums}
        done = pool.map("shard", {s: (by_slide[s], splits[s], bs, work, genes) for s, bs in sorted(todo.items())},
                        _overall_bar(cfg.ray.progress, len(todo)))
        clock.lap("slides")
        for records in done.values():
            for phase, seconds in next(iter(records.values()))["phases"].items():
                slide_phases[phase] = slide_phases.get(phase, 0.0) + seconds
    clock.lap("workers_stop")
    manifests = {}
    for b in bin_ums:
        manifest_path = bin_dirs[b] / "manifest.json"
        if not (bin_dirs[b] / WORK).is_dir():
            manifests[b] = Manifest.load(manifest_path)
            continue
        records = [json.loads((bin_dirs[b] / WORK / e.slide / DONE).read_text()) for e in entries]
        fingerprints = {s: found[s]["fingerprint"][b] for s in found}
        doc = _manifest(cfg, b, genes, gene_ids, gene_names, splits, folds, records, by_slide, plans[b],
                        stats.n_bins, fingerprints, weights_source)
        doc["inputs"] = inputs[b]
        manifests[b] = _finalise(bin_dirs[b], records, doc)
    clock.lap("finalise")
    print("shard: seconds: " + json.dumps({**clock.rounded(), "slide_phases": {k: round(v, 3) for k, v in
                                                                               slide_phases.items()}}), file=sys.stderr)
    return manifests


def _manifest(cfg, bin_um, genes, gene_ids, gene_names, splits, folds, records, by_slide, plan, n_stat_bins,
              fingerprints, weights_source=None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "bin_um": bin_um,
        "genes": [gene_names[i] for i in genes],
        "gene_ids": [gene_ids[i] for i in genes],
        "normalisation": normalisation_record(cfg.genes),
        "gene_selection": {"method": cfg.genes.selection, "n_genes": len(genes),
                           "bin_um": cfg.genes.selection_bin_um if cfg.genes.selection != "file" else None,
                           "gene_file": cfg.genes.gene_file, "training_slides": sorted(s for s in splits
                                                                                         if splits[s] == "train"),
                           "training_bins": n_stat_bins},
        "geometry": cfg.shard.geometry().to_dict(),
        "k_neighbours": cfg.shard.k_neighbours,
        "encoder": encoder_record(cfg.encoder, records[0]["feat_dim"], records[0]["encoder_weights"], weights_source),
        "image": {"format": cfg.shard.image_format, "jpeg_quality": cfg.shard.jpeg_quality},
        "splits": dict(sorted(splits.items())),
        "folds": dict(sorted(folds.items())),
        "slides": {r["slide"]: {"split": r["split"], "fold": folds[r["slide"]], "patient": by_slide[r["slide"]].patient,
                                "tiles": r["tiles"], "bins": r["bins"], "bins_in_tiles": r["bins_in_tiles"],
                                "bins_in_tissue": r["bins_in_tissue"], "fingerprint": fingerprints[r["slide"]]}
                   for r in sorted(records, key=lambda r: r["slide"])},
        "seed": cfg.seed,
        # optional members (magnet/format/schema.py) that every sample holds: count losses need them
        "raw_counts": RAW_COUNTS if cfg.shard.keep_counts else None,
        "config": _recorded_config(cfg),
        "git_revision": git_revision(),
        "plan": plan,
    }


def _overall_bar(progress: bool, n_slides: int):
    if not progress or n_slides == 0:
        return None
    bar = tqdm(total=n_slides, desc="slides", unit="slide")
    started, totals = time.perf_counter(), {"tiles": 0, "bins": 0}

    def update(slide: str, records: dict) -> None:
        for rec in records.values():
            totals["tiles"] += rec["tiles"]
            totals["bins"] += rec["bins"]
        dt = max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(tiles_s=f"{totals['tiles'] / dt:.1f}", bins_s=f"{totals['bins'] / dt:.0f}", last=slide)
        bar.update(1)
        if bar.n == bar.total:
            bar.close()

    return update


def summary(manifest: Manifest) -> dict:
    """Slides, tiles, bins, genes, bytes and bytes per bin of one bin size's shards."""
    n_bins = sum(s.n_bins for s in manifest.shards)
    n_bytes = sum(s.bytes for s in manifest.shards)
    return {"bin_um": manifest.bin_um, "slides": len(manifest.slides),
            "tiles": sum(s.n_samples for s in manifest.shards), "bins": n_bins,
            "genes": len(manifest.genes), "shards": len(manifest.shards), "bytes": n_bytes,
            "bytes_per_bin": round(n_bytes / max(n_bins, 1), 1)}

