"""``magnet predict --samplesheet``: a cohort on Ray, one ``.h5ad`` per slide plus ``summary.csv``.

Each worker is a Ray actor that loads the model once and then predicts slide after slide with the
single-slide function (:func:`magnet.predict.output.predict_to_file`), so a cohort's files equal the
single-slide command's. Actors take a GPU each when the cluster has GPUs (``cohort.gpus_per_worker``),
else ``cohort.cpus_per_worker`` CPUs. A slide already written (``DIR/{slide}.h5ad``, renamed into place
only when complete) is skipped and left untouched when its ``{slide}.config.yaml`` shows it was made alike
(the same model weights, bin size and settings that change predictions; else the run is refused in one
line), unless ``--overwrite`` (every slide predicted again); a slide that fails is recorded with a one-line
reason and the others go on. Workers get absolute paths and the tracking URI the driver resolved, never
their own defaults. A registry alias is pinned to its version once, so every worker loads the same model.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import sys
import time
from pathlib import Path

import yaml

from magnet.config import to_dict
from magnet.errors import UserError
from magnet.io import atomic_write_text, remove_stale
from magnet.predict.config import PredictConfig
from magnet.predict.model import load_model
from magnet.predict.output import predict_to_file
from magnet.registry.tracking import absolute_tracking_uri, resolve_tracking_uri
from sharding.samples import SlideEntry, ray_session, read_samplesheet

SUMMARY_COLUMNS = ("slide", "bins", "seconds", "status", "error")


def one_line(e: BaseException) -> str:
    """The reason a slide failed, one line: a UserError as it is, anything else as ``Type: first line``."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    line = text if isinstance(e, UserError) else f"{type(e).__name__}: {text}".rstrip(": ")
    return line[:300]


class SlideWorker:
    """A Ray actor: the model is loaded once, in ``__init__``; ``predict`` never raises (a failed slide is a row)."""

    def __init__(self, spec: str, tracking_uri: str | None, source: dict, cfg: PredictConfig):
        import torch  # start-up time: the CLI imports this module

        self.cfg = dataclasses.replace(cfg, progress=False, threads=cfg.threads or cfg.cohort.cpus_per_worker)
        torch.set_num_threads(self.cfg.threads)
        self.model = load_model(spec, tracking_uri)
        self.model.source = source  # the user's URI and the pinned version, as the single-slide command records

    def predict(self, entry: SlideEntry, bin_um: int, out: str, chosen: list[str], maps_dir: str | None) -> dict:
        t0 = time.perf_counter()
        row = {"slide": entry.slide, "bins": 0, "seconds": 0.0, "status": "failed", "error": ""}
        try:
            if not entry.image.is_file():
                raise UserError(f"{entry.image}: image: file not found")
            if not entry.spaceranger.is_dir():
                raise UserError(f"{entry.spaceranger}: spaceranger: folder not found")
            s = predict_to_file(self.model, entry.image, bin_um, self.cfg, Path(out), spaceranger=entry.spaceranger,
                                chosen=chosen, maps_dir=Path(maps_dir) / entry.slide if maps_dir else None,
                                slide=entry.slide)
            row.update(bins=s["bins"], status="predicted")
        except Exception as e:  # any slide's failure is reported in the summary; the cohort goes on
            row.update(error=one_line(e), user_error=isinstance(e, UserError))
        row["seconds"] = round(time.perf_counter() - t0, 2)
        return row


def _finished(out: Path) -> dict:
    """Bins and seconds of an ``.h5ad`` written by an earlier run; any other file there is a one-line error (it is
    no finished slide, and it is not ours to replace)."""
    import h5py  # start-up time: the CLI imports this module

    try:
        with h5py.File(out, "r") as f:
            return {"bins": int(f["X"].shape[0]), "seconds": float(f["uns/magnet/seconds/total"][()])}
    except (OSError, KeyError, TypeError, ValueError) as e:
        why = "not an HDF5 file" if isinstance(e, OSError) else "no X or uns/magnet/seconds/total"
        raise UserError(f"{out}: --out: not a slide written by magnet predict ({why}); move it away or choose "
                        f"another --out") from None


# settings that change how fast a slide is predicted, not its file (PredictConfig's comments)
SPEED_ONLY = ("batch_size", "batch_bins", "device", "fold_bn", "channels_last", "encoder_px", "mmap_threshold_mb",
              "compile", "threads", "tiles_per_block", "progress", "cohort")


def check_made_alike(out: Path, source: dict, bin_um: int, cfg: PredictConfig) -> None:
    """Refuse to keep a slide's file of an earlier run made otherwise than this run would make it: by other model
    weights (sha256), at another bin size, or with a setting that changes predictions; as recorded beside it
    (``{slide}.config.yaml``, written with the file)."""
    record = out.parent / f"{out.stem}.config.yaml"
    made = yaml.safe_load(record.read_text()) if record.is_file() else None
    hint = "; pass --overwrite to predict every slide again, or choose another --out"
    if not isinstance(made, dict):
        raise UserError(f"{record}: missing, so {out.name} cannot be kept as made by this model{hint}")

    def model_name(src: dict) -> str:
        name = (f"models:/{src['registered_model']}/{src['version']}" if "version" in src
                else src.get("uri", "an unknown model"))
        return f"{name} (weights sha256 {str(src.get('weights_sha256', 'not recorded'))[:12]})"

    old = made.get("model") or {}
    if old.get("weights_sha256") != source["weights_sha256"]:
        raise UserError(f"{record}: model: {out.name} was predicted by {model_name(old)}, this run's model is "
                        f"{model_name(source)}{hint}")
    if made.get("bin_um") != bin_um:
        raise UserError(f"{record}: bin_um: {out.name} was predicted at {made.get('bin_um')} um, this run at "
                        f"{bin_um} um{hint}")
    then, now = made.get("config") or {}, to_dict(cfg)
    for key in sorted(set(now) - set(SPEED_ONLY)):
        if then.get(key) != now[key]:
            raise UserError(f"{record}: {key}: {out.name} was predicted with {then.get(key)!r}, this run gives "
                            f"{now[key]!r}{hint}")


def _write_summary(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _pinned(spec: str, source: dict) -> str:
    """``models:/NAME@ALIAS`` as ``models:/NAME/VERSION`` (the alias could move while the cohort runs)."""
    if spec.startswith("models:/") and "registered_model" in source and "version" in source:
        return f"models:/{source['registered_model']}/{source['version']}"
    return spec


def _worker_options(ray, cfg: PredictConfig, n_todo: int) -> tuple[int, dict]:
    c = cfg.cohort
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    if gpus >= c.gpus_per_worker:
        fit, opts = int(gpus // c.gpus_per_worker), {"num_gpus": c.gpus_per_worker, "num_cpus": c.cpus_per_worker}
    else:
        fit, opts = int(resources.get("CPU", 1) // c.cpus_per_worker), {"num_cpus": c.cpus_per_worker}
    return max(1, min(n_todo, c.workers or fit)), opts


def predict_cohort(samplesheet: Path, model_spec: str, tracking_uri: str | None, model, bin_um: int,
                   cfg: PredictConfig, out_dir: Path, address: str | None, chosen: list[str],
                   maps_dir: Path | None, overwrite: bool = False) -> list[dict]:
    """Predict every slide of ``samplesheet`` not yet in ``out_dir`` (``overwrite``: every slide, each file replaced
    when its new one is complete); return the summary rows (samplesheet order)."""
    entries = read_samplesheet(samplesheet, check_paths=False)
    out_dir = out_dir.absolute()  # workers get absolute paths and the tracking URI this process resolved,
    maps_dir = maps_dir.absolute() if maps_dir else None  # never their own folder's or environment's defaults
    tracking_uri = absolute_tracking_uri(resolve_tracking_uri(tracking_uri))
    if Path(model_spec).exists():
        model_spec = str(Path(model_spec).absolute())
    out_dir.mkdir(parents=True, exist_ok=True)
    for e in entries:  # temporary files of a killed run on this host (each worker also cleans its slide's)
        remove_stale(out_dir, f"{e.slide}.h5ad")
    rows: dict[str, dict] = {}
    todo = []
    for e in entries:
        out = out_dir / f"{e.slide}.h5ad"
        if out.is_file() and not overwrite:
            finished = _finished(out)  # a foreign file first: it is not ours, whatever its record says
            check_made_alike(out, model.source, bin_um, cfg)
            rows[e.slide] = {"slide": e.slide, **finished, "status": "skipped", "error": ""}
        else:
            todo.append(e)
    print(f"predict: {out_dir}: " + ("--overwrite: every slide predicted again" if overwrite else
                                     f"{len(entries) - len(todo)} of {len(entries)} slides already done, "
                                     f"{len(todo)} to do"), file=sys.stderr)
    if todo:
        with ray_session(address, cfg.cohort.num_cpus, cfg.cohort.object_store_mb, cfg.progress) as ray:
            rows.update(_run_workers(ray, todo, _pinned(model_spec, model.source), tracking_uri, model.source,
                                     bin_um, cfg, out_dir, chosen, maps_dir))
    ordered = [rows[e.slide] for e in entries]
    _write_summary(out_dir / "summary.csv", ordered)
    return ordered


def _run_workers(ray, todo: list[SlideEntry], spec, tracking_uri, source, bin_um, cfg, out_dir, chosen,
                 maps_dir) -> dict[str, dict]:
    """Hand slides to actors one at a time as each finishes; a worker that dies fails its slide and is replaced."""
    # start-up time: the CLI imports this module
    from ray.exceptions import RayActorError
    from tqdm import tqdm

    n_workers, opts = _worker_options(ray, cfg, len(todo))
    actor = ray.remote(**opts)(SlideWorker)

    def start():
        return actor.remote(spec, tracking_uri, source, cfg)

    queue = list(reversed(todo))
    running: dict = {}
    rows: dict[str, dict] = {}

    def submit(w) -> None:
        e = queue.pop()
        ref = w.predict.remote(e, bin_um, str(out_dir / f"{e.slide}.h5ad"), list(chosen),
                               str(maps_dir) if maps_dir else None)
        running[ref] = (w, e)

    workers = [start() for _ in range(n_workers)]
    for w in workers:
        if queue:
            submit(w)
    started, bins = time.perf_counter(), 0
    with tqdm(total=len(todo), unit="slide", desc=f"predict ({n_workers} workers)", disable=not cfg.progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            w, e = running.pop(ref)
            try:
                row = ray.get(ref)
            except RayActorError as err:  # the worker process died (or could not load the model)
                row = {"slide": e.slide, "bins": 0, "seconds": 0.0, "status": "failed",
                       "error": f"worker died: {one_line(err)}"}
                ray.kill(w)
                w = start()
            rows[e.slide] = row
            bins += row["bins"]
            failed = sum(r["status"] == "failed" for r in rows.values())
            bar.set_postfix(bins=bins, bins_s=f"{bins / max(time.perf_counter() - started, 1e-9):.0f}",
                            failed=failed, last=e.slide)
            bar.update(1)
            if row["status"] == "failed":
                bar.write(f"predict: {e.slide}: failed: {row['error']}", file=sys.stderr)
            if queue:
                submit(w)
    return rows
