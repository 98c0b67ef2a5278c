"""What ``magnet evaluate`` compares: the models (labelled), the genes, and the held-out slides.

A slide's split comes from the samplesheet's ``split`` column, else from the shard manifest each model
was trained from (``data.shards``, when that folder is reachable), else it is ``unseen``. A slide a
model trained on is refused: scores on it say nothing about held-out slides.
"""

from __future__ import annotations

import json
from pathlib import Path

from magnet.errors import UserError
from magnet.predict.model import LoadedModel
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


def load_models(specs: list[str], tracking_uri: str | None, bin_um: list[int] | None) -> dict[str, LoadedModel]:
    """``[LABEL=]MODEL`` -> {label: model}; the label defaults to the model's name (``magnet``, ``stnet``...),
    suffixed by its bin size when two models would share it."""
    from magnet.predict.model import load_model

    loaded = []
    for spec in specs:
        label, _, uri = spec.rpartition("=") if "=" in spec.split(":", 1)[0] else ("", "", spec)
        model = load_model(uri, tracking_uri)
        loaded.append((label or model.python_model.config.model.name, model))
    names = [label for label, _ in loaded]
    out: dict[str, LoadedModel] = {}
    for label, model in loaded:
        if names.count(label) > 1:
            label = f"{label}-{int(model.python_model.bin_um)}um"
        if label in out:
            raise UserError(f"{model.uri}: --model: label '{label}' is used twice; name them LABEL=MODEL")
        out[label] = model
    trained = {int(m.python_model.bin_um) for m in out.values()}
    for label, model in out.items():
        if bin_um and int(model.python_model.bin_um) not in bin_um:
            raise UserError(f"{model.uri}: --bin-um: model '{label}' was trained on {model.python_model.bin_um} um "
                            f"bins, not one of {bin_um}")
    for b in bin_um or ():
        if b not in trained:
            raise UserError(f"--bin-um: no model was trained on {b} um bins (models: "
                            f"{', '.join(f'{k} {int(m.python_model.bin_um)} um' for k, m in out.items())})")
    return out


def manifest_splits(model: LoadedModel) -> dict[str, str]:
    """``slide -> split`` of the shard set the model was trained from ({} when it is not reachable)."""
    from magnet.data.manifest import manifest_path

    data = model.python_model.config.data
    path = manifest_path(data.shards, int(model.python_model.bin_um))
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()).get("splits", {}))
    except (json.JSONDecodeError, AttributeError):
        return {}


def select_slides(samplesheet: str, split: str | None, models: dict[str, LoadedModel]) -> list[tuple[SlideEntry, str]]:
    """(slide, its split) for every slide to score; a training slide of any model is a one-line error."""
    known = {label: manifest_splits(m) for label, m in models.items()}
    out = []
    for entry in read_samplesheet(samplesheet):
        seen = {label: s[entry.slide] for label, s in known.items() if entry.slide in s}
        slide_split = entry.split or next(iter(seen.values()), "unseen")
        if split is not None and slide_split != split:
            continue
        for label, s in seen.items():
            if s == "train":
                raise UserError(f"{samplesheet}: slide: '{entry.slide}' is a training slide of model '{label}' "
                                f"(its shard manifest); evaluate on held-out slides")
        out.append((entry, slide_split))
    if not out:
        raise UserError(f"{samplesheet}: split: no slide {'of split ' + repr(split) + ' ' if split else ''}to evaluate")
    return out
