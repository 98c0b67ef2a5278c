"""What ``magnet evaluate`` compares: the models (labelled), the genes, and the held-out slides.

A slide's split comes from the samplesheet's ``split`` column, else from the slides recorded with each
model (``model_meta.json``: split and fingerprint of every slide of its shard set; for models written
before that record, the shard manifest of ``data.shards`` when that folder is reachable), else it is
``unseen``. A slide a model trained on is refused: scores on it say nothing about held-out slides. So is
a slide under another name whose image or count matrix has a training slide's fingerprint
(``sharding/fingerprint.py``).

Cross-validation: models sharing a label that were each trained with ``data.fold`` (one per fold) form
one entry of the table, ``{fold: model}``; each slide is scored by the model that held out its fold (the
model's recorded ``data.folds``); its split reads ``fold<k>`` unless the samplesheet's ``split`` column
gives one. A slide every fold model trained on is refused, and so is a slide in none of their folds. A
model without a fold is ``{None: model}``.

Replicates (models trained alike but for the seed): ``--model LABEL=URI1,URI2,URI3``, or one label given
several times, each model without a fold and all at one bin size. Each replicate is an entry of its own,
labelled ``LABEL#1``, ``LABEL#2``...; the report adds mean ± sd over them (:func:`replicate_of`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from magnet.errors import UserError
from magnet.format.manifest import Manifest, manifest_path
from magnet.predict.model import LoadedModel, load_model
from sharding.samplesheet import SlideEntry, read_samplesheet


def parse_genes(text: str | None) -> list[str] | None:
    """``A,B,C`` or a file with one gene per line (``#`` comments); None = the first model's genes."""
    if text is None:
        return None
    p = Path(text)
    names = [g.strip() for g in (p.read_text().splitlines() if p.is_file() else text.split(","))]
    names = [g for g in names if g and not g.startswith("#")]
    if not names:
        raise UserError(f"{text}: --genes: no gene given")
    if len(set(names)) != len(names):
        raise UserError(f"{text}: --genes: a gene is listed twice")
    return names


Models = dict[str, dict[int | None, LoadedModel]]  # label -> {data.fold (None: no fold): model}


REPLICATE = "#"  # LABEL#k: the k-th replicate of LABEL


def replicate_of(label: str) -> str:
    """The label of the replicate group (``magnet#2 (context zeroed)`` -> ``magnet (context zeroed)``)."""
    return re.sub(rf"{REPLICATE}\d+", "", label)


def fold_of(model: LoadedModel) -> int | None:
    return model.python_model.config.data.fold


def each_model(models: Models) -> Iterator[tuple[str, int | None, LoadedModel]]:
    for label, group in models.items():
        for fold, model in group.items():
            yield label, fold, model


def load_models(specs: list[str], tracking_uri: str | None, bin_um: list[int] | None) -> Models:
    """``[LABEL=]MODEL`` -> {label: {fold: model}}; the label defaults to the model's name (``magnet``,
    ``stnet``...). Models of one label each trained on another ``data.fold`` (same bin size) are one
    cross-validation entry; other models sharing a label are suffixed by their bin size."""
    groups: dict[str, list[LoadedModel]] = {}
    given: dict[tuple[str, str], str] = {}  # (label, weights fingerprint) -> the model that had them first
    for spec in specs:
        label, _, uris = spec.partition("=") if "=" in spec.split(":", 1)[0] else ("", "", spec)
        if REPLICATE in label or "(" in label:
            raise UserError(f"{spec}: --model: a label holds neither '{REPLICATE}' nor '(' (they mark replicates "
                            f"and controls)")
        for uri in uris.split(","):
            if not uri.strip():
                raise UserError(f"{spec}: --model: an empty model in the list")
            model = load_model(uri.strip(), tracking_uri)
            name = label or model.python_model.config.model.name
            if (name, model.weights) in given:  # under two labels a model may be compared with itself
                raise UserError(f"{spec}: --model: {uri.strip()} has the weights of {given[name, model.weights]} "
                                f"(model.safetensors); one model given twice is not two replicates")
            given[name, model.weights] = uri.strip()
            groups.setdefault(name, []).append(model)
    out: Models = {}
    for label, group in groups.items():
        folds = [fold_of(m) for m in group]
        if len(group) > 1 and None not in folds:
            _check_fold_group(label, group)
            out[label] = {fold_of(m): m for m in sorted(group, key=fold_of)}
            continue
        if len(group) > 1 and set(folds) == {None} and len({int(m.python_model.bin_um) for m in group}) == 1:
            for i, model in enumerate(group, 1):  # replicates
                out[f"{label}{REPLICATE}{i}"] = {None: model}
            continue
        for model in group:
            name = f"{label}-{int(model.python_model.bin_um)}um" if len(group) > 1 else label
            if name in out:
                raise UserError(f"{model.uri}: --model: label '{name}' is used twice; name them LABEL=MODEL")
            out[name] = {fold_of(model): model}
    trained = {int(m.python_model.bin_um) for _, _, m in each_model(out)}
    for label, _, model in each_model(out):
        if bin_um and int(model.python_model.bin_um) not in bin_um:
            raise UserError(f"{model.uri}: --bin-um: model '{label}' was trained on {model.python_model.bin_um} um "
                            f"bins, not one of {bin_um}")
    for b in bin_um or ():
        if b not in trained:
            raise UserError(f"--bin-um: no model was trained on {b} um bins (models: "
                            f"{', '.join(f'{k} {int(m.python_model.bin_um)} um' for k, _, m in each_model(out))})")
    return out


def _check_fold_group(label: str, group: list[LoadedModel]) -> None:
    """One model per fold, one bin size, one fold assignment."""
    first, seen = group[0], {}
    for model in group:
        fold, bin_um = fold_of(model), int(model.python_model.bin_um)
        if bin_um != int(first.python_model.bin_um):
            raise UserError(f"{model.uri}: --model: fold models of '{label}' were trained on {bin_um} um and "
                            f"{int(first.python_model.bin_um)} um bins ({first.uri}); give one bin size per label "
                            f"(or name them LABEL=MODEL)")
        if fold in seen:
            raise UserError(f"{model.uri}: --model: '{label}' is given twice for fold {fold} (also {seen[fold].uri}); "
                            f"give one model per fold")
        seen[fold] = model
        if model.python_model.config.data.folds != first.python_model.config.data.folds:
            raise UserError(f"{model.uri}: data.folds: fold model of '{label}' was trained on other folds than "
                            f"{first.uri}; cross-validate on one shard set")


def _shard_manifest(model: LoadedModel):
    """The manifest of the shards the model trained on (its ``data.shards``), None when not reachable."""
    path = manifest_path(model.python_model.config.data.shards, int(model.python_model.bin_um))
    return Manifest.load(path) if path.is_file() else None


def training_view(model: LoadedModel) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """``slide -> split`` as the model saw it, and ``training slide -> fingerprint`` (``sharding/fingerprint.py``),
    from the slides recorded with the model (``model_meta.json``), else (models written before that) from one read
    of its shard manifest. Splits: for a fold model (``data.fold=k``), ``train`` for the slides of the other folds
    and ``fold<k>`` for its own (its recorded ``data.folds``); else the shard set's splits. Both {} for an older
    model whose manifest is not there; one that is there but unreadable is an error."""
    from magnet.data.manifest_view import fold_roles  # start-up time: the CLI imports this module

    data = model.python_model.config.data
    slides = model.slides  # slide -> split, fingerprint
    if not slides:
        manifest = _shard_manifest(model)
        slides = manifest.slides if manifest is not None else {}
    splits = {s: r["split"] for s, r in slides.items()}
    if data.fold is not None:
        splits = fold_roles(data.folds or {}, data.fold, f"fold{data.fold}", "train")
    return splits, {s: slides[s]["fingerprint"] for s, role in splits.items() if role == "train" and s in slides}


def _same_content(samplesheet: str, entry: SlideEntry, label: str, mine: dict[str, str],
                  trained: dict[str, dict[str, str]]) -> None:
    """Refuse ``entry`` (fingerprint ``mine``) when its image or count matrix is that of a training slide of
    another name."""
    for other, theirs in sorted(trained.items()):
        same = [part for part in ("image", "matrix") if theirs[part] == mine[part]]
        if same and other != entry.slide:
            raise UserError(f"{samplesheet}: slide: '{entry.slide}' has the {' and '.join(same)} of '{other}', a "
                            f"training slide of model '{label}' (fingerprints recorded with it); evaluate on "
                            f"held-out slides")


def select_slides(samplesheet: str, split: str | None,
                  models: Models) -> list[tuple[SlideEntry, str, dict[str, int | None]]]:
    """(slide, its split, ``{label: fold of the model that scores it}``) for every slide to score; a
    training slide of a model (of every model of a fold entry) is a one-line error."""
    from sharding.fingerprint import slide_fingerprints  # start-up time: the CLI imports this module

    views = {label: {fold: training_view(m) for fold, m in group.items()} for label, group in models.items()}
    known = {label: {fold: v[0] for fold, v in group.items()} for label, group in views.items()}
    trained = {label: {fold: v[1] for fold, v in group.items()} for label, group in views.items()}
    out = []
    for entry in read_samplesheet(samplesheet):
        seen, scorer = {}, {}
        for label, group in known.items():
            held = [f for f, s in group.items() if s.get(entry.slide, "train") != "train"]
            scorer[label] = held[0] if held else next(iter(group))
            if entry.slide in group[scorer[label]]:
                seen[label] = group[scorer[label]][entry.slide]
        slide_split = entry.split or next(iter(seen.values()), "unseen")
        if split is not None and slide_split != split:
            continue
        for label, group in known.items():
            if None not in group and label not in seen:
                raise UserError(f"{samplesheet}: slide: '{entry.slide}' is in no fold of model '{label}' (its "
                                f"data.folds); a cross-validated model scores the slides of its folds")
        for label, s in seen.items():
            if s == "train":
                every = " (every fold's)" if None not in known[label] else ""
                raise UserError(f"{samplesheet}: slide: '{entry.slide}' is a training slide of model '{label}'{every} "
                                f"(as recorded with it); evaluate on held-out slides")
        mine: dict[int, dict[str, str]] = {}  # bin size -> this slide's fingerprint, computed once
        for label, fold in scorer.items():
            if trained[label][fold]:
                bin_um = int(models[label][fold].python_model.bin_um)
                if bin_um not in mine:
                    mine[bin_um] = slide_fingerprints(entry.image, entry.spaceranger, [bin_um])[bin_um]
                _same_content(samplesheet, entry, label, mine[bin_um], trained[label][fold])
        out.append((entry, slide_split, scorer))
    if not out:
        raise UserError(f"{samplesheet}: split: no slide {'of split ' + repr(split) + ' ' if split else ''}to evaluate")
    return out
