"""Predict one slide tile by tile on the samples the sharding stage writes to its shards
(:func:`sharding.samples.slide_samples`), so the model sees samples built exactly as its training shards were.

The iterator reads each tile once, computes its frozen-encoder features and keeps its encoded image (a tile's
neighbourhood needs its neighbours' features); then per tile: its sample is cut into chunks of ``max_bins`` bins,
``batch_size`` chunks are collated, run through the model, and the bin outputs handed to a sink as they come
(``magnet predict``: straight into the .h5ad; ``magnet evaluate``: RAM). Memory holds one block of tile images,
the slide's features (float16, T x (S+1) x F), spot/global outputs (T x (S+1) x G) and O(n) bin index arrays.
"""

from __future__ import annotations

import ctypes
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from magnet.data.transforms import chunk_bins
from magnet.errors import UserError
from magnet.format.codec import decode_image
from magnet.format.sample import Sample
from magnet.predict.config import PredictConfig
from magnet.predict.model import LoadedModel
from magnet.spaceranger_layout import Outs
from sharding.samples import (BinFiles, Bins, EncoderConfig, FeatureExtractor, GeneConfig, Level, SampleConfig,
                              ShardConfig, SlideImage, TileSample, check_pairing, read_bins, read_genes, read_mpp,
                              slide_samples)


@dataclasses.dataclass
class SlidePrediction:
    """Bins in input order (Space Ranger matrix order, or grid order for image-only input)."""

    slide: str
    bin_um: int
    mpp_full: float
    bins: Bins  # barcodes, rc, xy (full-res px)
    from_spaceranger: bool
    has_measured: bool  # the Space Ranger matrix holds every model gene
    order: np.ndarray  # int64 (n,) input bins in the order the sink received them (tile by tile)
    bin_tile: np.ndarray  # int64 (n,) row of the tile in global_*
    bin_spot: np.ndarray  # int64 (n,) row of the bin's spot cell in spot_*
    spot_pred: np.ndarray  # float32 (T*S, G), NaN where the model has no spot head
    spot_xy: np.ndarray  # float64 (T*S, 2) full-res px
    spot_tissue: np.ndarray  # bool (T*S,) the cell holds at least one bin
    global_pred: np.ndarray  # float32 (T, G)
    global_xy: np.ndarray  # float64 (T, 2) full-res px
    tile_grid: np.ndarray  # int64 (T, 2) gx, gy
    seconds: dict  # wall seconds of read, features, predict, total; cpu: CPU seconds of the process over the total
    bin_pred: np.ndarray | None = None  # float32 (n, G), from predict_slide only
    measured: np.ndarray | None = None  # float32 (n, G) normalised like the training data, predict_slide only
    bin_extra: dict | None = None  # the model's per-bin extras (rate, libsize: pyfunc bin_extras), predict_slide only


def shard_config(model: LoadedModel, cfg: PredictConfig):
    """The sharding config that rebuilds the model's training samples (geometry, K, normalisation, encoder)."""
    g = model.python_model.geometry
    norm = model.python_model.normalisation
    enc = model.encoder
    weights, seed = enc.get("weights"), 0
    if isinstance(weights, str) and weights.startswith("random-seed-"):
        weights, seed = None, int(weights[len("random-seed-"):])
    elif isinstance(weights, str) and weights.startswith("sha256:"):
        if not cfg.encoder_weights:
            raise UserError(f"{model.uri}: encoder.weights: the shards' encoder was the local file {weights}; "
                            f"pass encoder_weights=FILE")
        from magnet.models.encoder import weights_id  # start-up time: the CLI imports this module

        if weights_id(cfg.encoder_weights, 0) != weights:
            raise UserError(f"{cfg.encoder_weights}: encoder_weights: sha256 differs from the model's {weights}")
        weights = cfg.encoder_weights
    genes = GeneConfig(normalisation=norm["method"], target_sum=float(norm.get("target_sum", 10000.0)))
    sample = SampleConfig(mpp=g.mpp, global_px=g.global_px, spot_px=g.spot_px, bin_px=g.bin_px,
                          image_format=cfg.image_format, jpeg_quality=cfg.jpeg_quality, k_neighbours=model.k_neighbours)
    features = model.python_model.config.model.bin_input == "features"
    if features and not enc.get("bin_features"):
        raise UserError(f"{model.uri}: encoder.bin_features: the model reads cached bin features but its shards' "
                        f"encoder record has none")
    field = model.python_model.config.model.field
    if field and len(enc.get("field_sd_um", ())) != field:
        raise UserError(f"{model.uri}: encoder.field_sd_um: the model reads the bin features' field at {field} scales "
                        f"but its shards' encoder record has {len(enc.get('field_sd_um', ()))}")
    encoder = EncoderConfig(name=enc["name"], weights=weights, input_px=int(enc.get("input_px", 224)),
                            precision=enc.get("precision", "fp32"), bin_features=features,
                            bin_input_px=int(enc.get("bin_input_px", 0)), kwargs=dict(enc.get("kwargs", {})),
                            field_sd_um=list(enc.get("field_sd_um", ())) if field else [])
    return ShardConfig(seed=seed, shard=sample, genes=genes, encoder=encoder)


MAX_UPSAMPLE = 2.0  # an image coarser than this many model pixels per image pixel holds too little detail to predict from
MAX_SIDE_MM = 80.0  # a glass slide is 75 x 25 mm: a longer side means the pixel size is wrong


def check_extent(image: SlideImage, mpp_full: float, model_mpp: float, where: str) -> None:
    """Refuse a pixel size that makes the slide larger than a glass slide or coarser than the model's pixels, before
    any bin grid, thumbnail or tile array is allocated: a typo there (50 for 0.50) would otherwise grow memory
    with the square of the mistake. ``where`` names where the pixel size came from (``file: field``)."""
    w, h = image.size
    side_mm = max(w, h) * mpp_full / 1000
    if side_mm > MAX_SIDE_MM:
        raise UserError(f"{where}: {mpp_full:g} um/px makes the {w} x {h} px image {side_mm:.0f} mm long, "
                        f"more than a glass slide ({MAX_SIDE_MM:.0f} mm); is the pixel size mistyped?")
    if mpp_full > MAX_UPSAMPLE * model_mpp:
        raise UserError(f"{where}: {mpp_full:g} um/px is coarser than {MAX_UPSAMPLE:g}x the model's "
                        f"{model_mpp:g} um/px; the model needs a full-resolution scan (is the pixel size mistyped?)")


def _gene_index(matrix: Path, genes: list[str]) -> np.ndarray | None:
    """Matrix indices of the model's genes (by name, else id); None when any is absent."""
    ids, names = read_genes(matrix)
    by_id = {g: i for i, g in enumerate(ids)}
    by_name: dict[str, int] = {}
    for i, g in enumerate(names):
        by_name.setdefault(g, i)
    index = [by_name.get(g, by_id.get(g)) for g in genes]
    return None if any(i is None for i in index) else np.asarray(index, np.int64)


def fixed_mmap_threshold(nbytes: int) -> None:
    """Have glibc serve allocations of ``nbytes`` and more by mmap, returned to the OS when freed, and keep up to
    ``2 * nbytes`` of free memory at the top of its heap. By default glibc raises the mmap threshold as large
    blocks are freed; the forward pass's batch-wide arrays, whose sizes change from batch to batch (a tile's
    last chunk is smaller), then come from the heap and fragment it: RSS crept up by ~0.3 GB over a slide (flat
    with a fixed threshold). But a block above the threshold is page-faulted anew at every allocation: at
    256 KB the bin encoder ran at 0.55x the speed it has when its activations are reused from the heap
    (``mmap_threshold_mb``). No-op where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 2 * nbytes)  # M_TRIM_THRESHOLD


def _device(cfg: PredictConfig):
    import torch  # start-up time: the CLI imports this module

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("config: device: cuda requested but no CUDA device is available")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and use_cuda)
    return device, bf16


class _Runner:
    """Batches of decoded chunks through the model's ``predict_batch`` on the configured device."""

    def __init__(self, model: LoadedModel, cfg: PredictConfig):
        self.pm = model.python_model
        self.device, self.bf16 = _device(cfg)
        self.pm.model.to(self.device)
        from magnet.models.inference import for_inference  # start-up time: the CLI imports this module

        px = self.pm.geometry.bin_px
        pieces = max(1, cfg.encoder_px // px**2) if cfg.encoder_px and self.device.type == "cpu" else 0
        self.prepared = for_inference(self.pm.model, fold_bn=cfg.fold_bn, channels_last=cfg.channels_last,
                                      compile=cfg.compile, encoder_batch=pieces, input_px=px)

    def __call__(self, batch) -> dict[str, np.ndarray]:
        return self.pm.predict_batch(batch, bf16=self.bf16)


class InMemory:
    """A bin sink holding every bin's prediction in RAM, in input order: 2 x (n, G) float32 (``magnet evaluate``
    needs them whole; ``magnet predict`` streams into the .h5ad instead)."""

    bin_pred: np.ndarray | None = None
    measured: np.ndarray | None = None

    def open(self, n: int, n_genes: int, measured: bool) -> None:
        self.n = n
        self.bin_pred = np.full((n, n_genes), np.nan, np.float32)
        self.measured = np.full((n, n_genes), np.nan, np.float32) if measured else None
        self.extra = {}

    def write(self, idx: np.ndarray, pred: np.ndarray, measured: np.ndarray | None, extra: dict) -> None:
        self.bin_pred[idx] = pred
        if self.measured is not None:
            self.measured[idx] = measured
        for name, values in extra.items():
            if name not in self.extra:
                self.extra[name] = np.full((self.n,) + values.shape[1:], np.nan, np.float32)
            self.extra[name][idx] = values


def predict_slide(model: LoadedModel, image_path: Path, bin_um: int, cfg: PredictConfig, *,
                  spaceranger: Path | None = None, mpp: float | None = None, slide: str | None = None,
                  samples_out: list | None = None) -> SlidePrediction:
    """:func:`stream_slide` into RAM: the prediction with ``bin_pred`` and ``measured`` filled, in input order."""
    sink = InMemory()
    pred = stream_slide(model, image_path, bin_um, cfg, sink, spaceranger=spaceranger, mpp=mpp, slide=slide,
                        samples_out=samples_out)
    return dataclasses.replace(pred, bin_pred=sink.bin_pred, measured=sink.measured, bin_extra=sink.extra)


def stream_slide(model: LoadedModel, image_path: Path, bin_um: int, cfg: PredictConfig, sink, *,
                 spaceranger: Path | None = None, mpp: float | None = None, slide: str | None = None,
                 samples_out: list | None = None) -> SlidePrediction:
    """Predict every bin of the slide. ``spaceranger`` (an ``outs`` folder) gives the bins; else ``mpp``
    (the image's um/px) and bins are laid over detected tissue. Bin outputs go to ``sink`` as they are made:
    ``sink.open(n, n_genes, measured)`` once, then ``sink.write(idx, pred, measured, extra)`` with ``idx`` (input
    bin indices) running through ``order`` of the result, tile after tile; the result holds the rest
    (``bin_pred``/``measured`` left None). ``samples_out``, when a list, receives the collated batches and
    their outputs (for checks)."""
    # start-up time: the CLI imports this module
    import torch
    from tqdm import tqdm

    from magnet.batch import collate  # torch and PyG: when a slide is predicted, not at the CLI's start-up

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    fixed_mmap_threshold(int(cfg.mmap_threshold_mb * 2**20))
    t0, cpu0 = time.perf_counter(), time.process_time()
    scfg = shard_config(model, cfg)
    geom = scfg.shard.geometry()
    slide = slide or Path(image_path).name.split(".")[0]
    runner = _Runner(model, cfg)
    with SlideImage(image_path) as image:
        lv, measured = _level(image, Path(image_path), bin_um, model.genes, scfg, cfg, spaceranger, mpp)
        t_read = time.perf_counter()
        extractor = FeatureExtractor(scfg.encoder, geom, scfg.seed, cfg.threads or torch.get_num_threads(),
                                     runner.device)
        T = len(lv.tiles.grid)
        with (tqdm(total=2 * T, unit="tile", desc=f"predict {slide}", disable=not cfg.progress, file=sys.stderr,
                   dynamic_ncols=True) as bar,
              slide_samples(slide, image, {bin_um: lv}, scfg, extractor, block=cfg.tiles_per_block,
                            progress=bar.update) as samples):
            t_feat = time.perf_counter()
            control = None
            if cfg.context != "keep":
                from magnet.predict.context import ContextControl  # start-up time: the CLI imports this module

                control = ContextControl(cfg.context, lv.tiles.grid, *samples.features(bin_um), geom,
                                         cfg.context_seed)
            batches = _Batches(model, cfg, runner, collate, geom, lv, sink, measured, control, samples_out)
            for item in samples.samples(bin_um, "predict"):
                batches.add(item)
                bar.update(1)
            batches.flush()
    t_pred = time.perf_counter()
    seconds = {"read": round(t_read - t0, 3), "features": round(t_feat - t_read, 3),
               "predict": round(t_pred - t_feat, 3), "total": round(t_pred - t0, 3),
               "cpu": round(time.process_time() - cpu0, 3)}  # CPU seconds of the process, all threads
    return batches.prediction(slide, bin_um, spaceranger is not None, seconds)


def _level(image: SlideImage, image_path: Path, bin_um: int, genes: list[str], scfg, cfg: PredictConfig,
           spaceranger: Path | None, mpp: float | None) -> tuple[Level, bool]:
    """The slide's bins of ``bin_um`` and whether their measured expression holds every model gene: Space
    Ranger's (``spaceranger``), else laid over the tissue of the image of ``mpp`` um/px."""
    geom = scfg.shard.geometry()
    if spaceranger is None:
        from magnet.predict.image_only import tissue_bins  # start-up time: the CLI imports this module

        mpp_full = float(mpp)
        check_extent(image, mpp_full, geom.mpp, f"{image_path}: --mpp")
        bins, _ = tissue_bins(image, mpp_full, bin_um, cfg.tissue_level_um, cfg.tissue_min_fraction, len(genes))
        if not len(bins.libsize):
            raise UserError(f"{image_path}: image: no tissue detected (saturation threshold found no H&E)")
        return Level(bins, mpp_full, scfg), False
    files = BinFiles.of(Outs.find(spaceranger).path, bin_um)
    mpp_full = read_mpp(files.scalefactors, bin_um)
    check_extent(image, mpp_full, geom.mpp, f"{files.scalefactors}: microns_per_pixel")
    check_pairing(image, files.scalefactors.parent)
    index = _gene_index(files.matrix, genes)
    bins = read_bins(files, image.size, index)
    if index is None:
        import scipy.sparse as sp  # start-up time: the CLI imports this module

        bins.counts = sp.csr_matrix((len(bins.libsize), len(genes)), dtype=np.float32)
    return Level(bins, mpp_full, scfg), index is not None


class _Batches:
    """A slide's samples through the model: each cut into chunks of ``max_bins`` bins, ``batch_size`` chunks
    collated per forward pass; bin outputs go to the sink, spot and global outputs are summed per tile (a tile's
    few chunks) and averaged by :meth:`prediction`."""

    def __init__(self, model: LoadedModel, cfg: PredictConfig, runner: _Runner, collate, geom, lv: Level, sink,
                 measured: bool, control, samples_out: list | None):
        pm = model.python_model
        self.runner, self.collate, self.geom, self.lv = runner, collate, geom, lv
        self.sink, self.measured = sink, measured
        self.control, self.samples_out, self.k = control, samples_out, pm.config.model
        self.extras = pm.bin_extras  # per-bin outputs beside the prediction (a count model's rate, libsize)
        self.max_bins = cfg.max_bins or pm.config.data.max_bins
        self.batch_size = cfg.batch_size or max(pm.config.data.eval_batch, cfg.batch_bins // self.max_bins)
        T, S, G = len(lv.tiles.grid), geom.n_spots, len(model.genes)
        self.n, self.written = len(lv.bins.libsize), 0
        sink.open(self.n, G, measured)
        self.spot_sum = np.zeros((T, S, G), np.float32)
        self.glob_sum = np.zeros((T, G), np.float32)
        self.n_chunks = np.zeros(T, np.int64)
        self.has = {"spot": False, "global": False}
        self.pending: list[tuple[Sample, np.ndarray, int]] = []

    def add(self, item: TileSample) -> None:
        features = "bin_feat" in item.sample.arrays  # a features model reads the bins' cached features, no image
        sample = item.sample if features else item.sample.replace(image=decode_image(item.image))
        start = 0
        for chunk in chunk_bins(sample, self.max_bins):
            self.pending.append((chunk, item.bins[start:start + chunk.n_bins], item.tile))
            start += chunk.n_bins
            if len(self.pending) >= self.batch_size:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        chunks = [c for c, _, _ in self.pending]
        k = self.k
        batch = self.collate(chunks, self.geom, k_bin=k.k_bin, k_spot=k.k_spot, k_global=k.k_global)
        if self.control is not None:
            batch = self.control(batch)
        out = self.runner(batch)
        if self.samples_out is not None:
            self.samples_out.append((batch, out))
        start = 0
        for c, idx, t in self.pending:
            rows = slice(start, start + len(idx))
            self.sink.write(idx, out["bin"][rows], c["bin_expr"].astype(np.float32) if self.measured else None,
                            {k: out[k][rows] for k in self.extras})
            start += len(idx)
            self.written += len(idx)
            self.n_chunks[t] += 1
        G = self.glob_sum.shape[1]
        if "spot" in out:
            self.has["spot"] = True
            centre = batch.spot_centre.numpy().reshape(len(chunks), -1)
            spot = out["spot"].reshape(len(chunks), -1, G)
            for j, (_, _, t) in enumerate(self.pending):
                self.spot_sum[t] += spot[j][centre[j]]
        if "global" in out:
            self.has["global"] = True
            glob = out["global"].reshape(len(chunks), -1, G)
            for j, (_, _, t) in enumerate(self.pending):
                self.glob_sum[t] += glob[j, 0]
        self.pending.clear()

    def prediction(self, slide: str, bin_um: int, from_spaceranger: bool, seconds: dict) -> SlidePrediction:
        if self.written != self.n:
            raise RuntimeError(f"{self.n - self.written} bins were not predicted (a bin outside every tile)")
        geom, lv, tiles, n = self.geom, self.lv, self.lv.tiles, self.n
        T, S, G = self.spot_sum.shape
        chunks = np.maximum(self.n_chunks, 1).astype(np.float32)
        spot_pred, global_pred = self.spot_sum, self.glob_sum  # in place: no second T x S x G array
        spot_pred /= chunks[:, None, None]
        global_pred /= chunks[:, None]
        if not self.has["spot"]:
            spot_pred[:] = np.nan
        if not self.has["global"]:
            global_pred[:] = np.nan
        scale = geom.mpp / lv.mpp_full  # full-res px per model px
        origin = tiles.grid * geom.global_px - geom.margin
        spot_xy = ((origin[:, None, :] + geom.spot_centres()[None]) * scale).reshape(T * S, 2)
        tile_of = np.full(n, -1, np.int64)
        tile_of[tiles.bin_order] = np.repeat(np.arange(T), np.diff(tiles.bin_start))
        return SlidePrediction(
            slide=slide, bin_um=bin_um, mpp_full=lv.mpp_full, bins=lv.bins, from_spaceranger=from_spaceranger,
            has_measured=self.measured, order=tiles.bin_order, bin_tile=tile_of,
            bin_spot=tile_of * S + tiles.spot.astype(np.int64),
            spot_pred=spot_pred.reshape(T * S, G), spot_xy=spot_xy, spot_tissue=lv.spot_mask.reshape(-1),
            global_pred=global_pred, global_xy=(tiles.grid + 0.5) * geom.global_px * scale, tile_grid=tiles.grid,
            seconds=seconds)
