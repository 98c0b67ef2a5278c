"""The prediction as a SpatialData zarr store (``magnet predict --format spatialdata``), for the scverse
tools (spatialdata-plot, napari-spatialdata), written while the bins are predicted, as the .h5ad is.

Every element lives in the coordinate system named after the slide, in full-resolution pixels: the
system ``spatialdata_io.visium_hd(outs, dataset_id=<slide>)`` puts Space Ranger's data in, so the
measured data read by it and the prediction overlay. ``<slide>`` and bin size ``XXX`` in the names:

* image ``<slide>_full_image``: the full-resolution H&E, multiscale (levels 2x apart), copied chunk by
  chunk from the slide image's tiles (dask; never loaded whole);
* shapes ``<slide>_magnet_square_XXXum``: each bin as a square of its side around its centre, with edges
  along the bin grid (fitted to the bins' array indices and pixel centres);
  table ``magnet_square_XXXum`` annotates them (``region``, ``instance_id`` = the shape's index): ``X``
  the predicted expression, ``layers['measured']`` the measured one (Space Ranger input), obs, var,
  ``obsm['spatial']`` and ``uns['magnet']`` as in the .h5ad, rows in the same (prediction) order;
* shapes ``<slide>_magnet_spots`` and table ``magnet_spots``: the spot-level predictions, one square spot
  cell each (the cells tile every global tile; ``in_tissue``: the cell holds a bin), rows as
  ``uns['magnet']['spot']`` of the .h5ad; shapes ``<slide>_magnet_tiles`` and table ``magnet_tiles``:
  the global-tile predictions. Both only when the model makes them.

The bin table's ``X`` and ``layers['measured']`` are zarr arrays filled block by block with the .h5ad
writer's buffering (:class:`H5adWriter`), so memory holds no bins x genes matrix; the bin squares are
streamed into their parquet file batch by batch (:func:`write_squares`); the table's O(n) parts and the
other elements are written by anndata's and spatialdata's own writers at the end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from magnet.errors import UserError
from magnet.geometry import Geometry
from magnet.predict.anndata_out import ARRAY, H5adWriter, bin_obs
from magnet.predict.slide import SlidePrediction
from magnet.spaceranger_layout import Outs
from sharding.samples import SlideImage

CHUNK_BYTES = 1 << 20  # target size of a chunk of the bin table's X
SHAPE_BATCH = 16384  # bin squares made and written at a time (~0.8 kB each while made)
IMAGE_CHUNK = 1024  # px per side of a chunk of each image level
SMALLEST_LEVEL = 1024  # px: halve the image (at least once) until its longest side is at most this


def names(slide: str, bin_um: int) -> dict[str, str]:
    """Element names of a prediction store."""
    return {"image": f"{slide}_full_image", "bins": f"{slide}_{bin_table(bin_um)}",
            "bin_table": bin_table(bin_um), "spots": f"{slide}_magnet_spots",
            "spot_table": "magnet_spots", "tiles": f"{slide}_magnet_tiles", "tile_table": "magnet_tiles"}


def bin_table(bin_um: int) -> str:
    return f"magnet_{Outs.square(bin_um)}"


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that exists and is not a SpatialData store (it would be replaced)."""
    if not out.exists():
        return
    meta = out / "zarr.json"
    try:
        ok = out.is_dir() and "spatialdata_attrs" in json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"{out}: --out: exists and is not a SpatialData store; refusing to replace it")


def squares(xy: np.ndarray, e_col: np.ndarray, e_row: np.ndarray):
    """Polygons (shapely) of parallelogram cells centred on ``xy`` (n, 2) with edge vectors ``e_col``, ``e_row``."""
    import shapely  # optional extra [spatialdata]

    corners = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5]])
    offsets = corners[:, :1] * e_col + corners[:, 1:] * e_row  # (5, 2)
    return shapely.polygons(xy[:, None, :] + offsets[None])


def write_squares(sdata, name: str, xy: np.ndarray, e_col: np.ndarray, e_row: np.ndarray, cs: dict) -> None:
    """The shapes element ``name`` of squares around ``xy`` (see :func:`squares`) in the backed ``sdata``, made
    SHAPE_BATCH at a time: spatialdata writes the element with the first batch (metadata, parquet schema),
    then the whole set is streamed into its parquet file in row groups. (A GeoDataFrame of every bin, which
    spatialdata's writer needs, costs ~0.8 kB per bin: 350 MB for a 6.5 mm slide at 8 um.)"""
    # start-up time: the CLI imports this module
    import pyarrow as pa
    import pyarrow.parquet as pq
    # optional extra [spatialdata]
    import shapely
    from geopandas import GeoDataFrame
    from spatialdata.models import ShapesModel

    n = len(xy)
    first = np.arange(min(n, SHAPE_BATCH))
    sdata.shapes[name] = ShapesModel.parse(GeoDataFrame(geometry=squares(xy[first], e_col, e_row), index=first),
                                           transformations=cs)
    sdata.write_element(name)
    path = Path(sdata.path) / "shapes" / name / "shapes.parquet"
    schema = pq.read_schema(path)
    geo = json.loads(schema.metadata[b"geo"])
    reach = (np.abs(e_col) + np.abs(e_row)) / 2  # farthest a corner lies from its centre, per axis
    lo, hi = xy.min(0) - reach, xy.max(0) + reach
    geo["columns"]["geometry"]["bbox"] = [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])]
    schema = schema.with_metadata({**schema.metadata, b"geo": json.dumps(geo).encode()})
    index = schema.names[1]  # the GeoDataFrame's index, as pandas stored it
    partial = path.with_name(path.name + ".partial")
    with pq.ParquetWriter(partial, schema) as writer:
        for start in range(0, n, SHAPE_BATCH):
            rows = np.arange(start, min(start + SHAPE_BATCH, n))
            wkb = shapely.to_wkb(squares(xy[rows], e_col, e_row))
            writer.write_table(pa.table({"geometry": wkb, index: rows}, schema=schema))
    os.replace(partial, path)
    del sdata.shapes[name]  # held the first batch only


def grid_axes(rc: np.ndarray, xy: np.ndarray, side: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel vectors of one step along the bin columns and rows: a least-squares affine fit of the centres
    on (array_col, array_row); axis-aligned steps of ``side`` when the bins do not span two dimensions."""
    a = np.column_stack([rc[:, 1], rc[:, 0], np.ones(len(rc))]).astype(np.float64)
    if len(rc) < 3 or np.linalg.matrix_rank(a) < 3:
        return np.array([side, 0.0]), np.array([0.0, side])
    coef = np.linalg.lstsq(a, xy, rcond=None)[0]
    return coef[0], coef[1]


def annotating(obs, region: str):
    """``obs`` with the columns that tie a table's rows to the shapes ``region`` (row i: shape i)."""
    import pandas as pd  # start-up time: the CLI imports this module

    obs["region"] = pd.Categorical.from_codes(np.zeros(len(obs), np.int8), categories=[region])
    obs["instance_id"] = np.arange(len(obs), dtype=np.int64)
    return obs


class SpatialDataWriter(H5adWriter):
    """A bin sink for :func:`magnet.predict.slide.stream_slide` writing the SpatialData store at ``path``
    (created): the bin table's matrices as rows come (the buffering of :class:`H5adWriter`), then
    :meth:`finish` writes the rest."""

    def __init__(self, path: Path, image: Path, bin_um: int, keep: list[int] = ()):
        import zarr  # start-up time: the CLI imports this module
        from spatialdata import SpatialData  # optional extra [spatialdata]

        self.path = Path(path)
        self.image = image
        self.bin_um = bin_um
        SpatialData().write(self.path)  # the root group with the container's format attributes
        self.tables = zarr.open_group(self.path, mode="r+", use_consolidated=False).require_group("tables")
        self.keep = list(keep)
        self.extras, self.libsize = (), None  # the bin table holds X and measured; a count model's rates: the .h5ad
        self.row = 0
        self.buffer = []
        self.buffered = 0

    def __exit__(self, *exc) -> None:
        pass  # zarr keeps no file open

    def open(self, n: int, n_genes: int, measured: bool) -> None:
        self.file = self.tables.create_group(bin_table(self.bin_um))
        f = self.file
        rows = max(1, min(n, CHUNK_BYTES // (4 * n_genes)))
        f.create_array("X", shape=(n, n_genes), dtype=np.float32, chunks=(rows, n_genes)).attrs.update(ARRAY)
        layers = f.create_group("layers")
        layers.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        self.measured = None
        if measured:
            g = layers.create_group("measured")
            g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n, n_genes]})
            for name, dtype in (("data", np.float32), ("indices", np.int32)):
                g.create_array(name, shape=(0,), dtype=dtype, chunks=(1 << 16,))
            g.create_array("indptr", shape=(n + 1,), dtype=np.int64, chunks=(1 << 18,), fill_value=0)
            self.measured = g
        self.nnz = 0
        self.kept_pred = np.empty((n, len(self.keep)), np.float32)
        self.kept_measured = np.empty((n, len(self.keep)), np.float32) if measured else None

    def finish(self, pred: SlidePrediction, genes: list[str], gene_ids: list[str], units: dict, info: dict) -> None:
        """Write the bin table's O(n) parts, the image, every shapes element and the spot and tile tables."""
        import anndata as ad  # start-up time: the CLI imports this module

        with ad.settings.override(auto_shard_zarr_v3=False):  # plain chunks, as the streamed arrays (no warning)
            self._finish(pred, genes, gene_ids, units, info)

    def _finish(self, pred: SlidePrediction, genes: list[str], gene_ids: list[str], units: dict, info: dict) -> None:
        import dask  # optional extra [spatialdata]
        import pandas as pd  # start-up time: the CLI imports this module
        # optional extra [spatialdata]
        from geopandas import GeoDataFrame
        from spatialdata import SpatialData
        from spatialdata.models import ShapesModel
        from spatialdata.transformations import Identity

        self._flush()
        n = len(pred.order)
        if self.row != n:
            raise RuntimeError(f"{n - self.row} of {n} bins were not written")
        el = names(pred.slide, pred.bin_um)
        cs = {pred.slide: Identity()}
        var = pd.DataFrame({"gene_ids": list(gene_ids), "feature_types": "Gene Expression"},
                           index=pd.Index(list(genes), name="gene"))
        magnet = {"units": {k: v for k, v in units.items() if v is not None}, "bin_um": pred.bin_um,
                  "grid": "spaceranger" if pred.from_spaceranger else "tissue_detection", "seconds": pred.seconds,
                  **{k: v for k, v in info.items() if v is not None}}
        self._bin_table(pred, var, magnet, el["bins"])
        shapes, tables = {}, {}
        geom = Geometry(**{k: info["geometry"][k] for k in ("mpp", "global_px", "spot_px", "bin_px")})
        for key, (polygons, table) in level_elements(pred, geom, var, magnet, el).items():
            shapes[el[key]] = ShapesModel.parse(GeoDataFrame(geometry=polygons, index=np.arange(len(polygons))),
                                                transformations=cs)
            tables[el[f"{key[:-1]}_table"]] = table
        with SlideImage(self.image) as slide_image, dask.config.set(scheduler="synchronous"):  # one chunk at a time
            sdata = SpatialData(images={el["image"]: multiscale(slide_image, cs)}, shapes=shapes, tables=tables)
            sdata.path = self.path
            sdata.write_element(list(sdata.images) + list(sdata.shapes) + list(sdata.tables))
        b, o = pred.bins, pred.order
        write_squares(sdata, el["bins"], b.xy[o], *grid_axes(b.rc[o], b.xy[o], pred.bin_um / pred.mpp_full), cs)
        sdata.write_consolidated_metadata()

    def _bin_table(self, pred: SlidePrediction, var, magnet: dict, region: str) -> None:
        """The bin table's O(n) parts through anndata's element writer (X and measured are on disk already)."""
        from anndata.io import write_elem  # start-up time: the CLI imports this module
        from spatialdata._io.format import CurrentTablesFormat  # optional extra [spatialdata]

        f = self.file
        keys = {"region": region, "region_key": "region", "instance_key": "instance_id"}
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        write_elem(f, "obs", annotating(bin_obs(pred), region))
        write_elem(f, "var", var)
        write_elem(f, "obsm", {"spatial": np.ascontiguousarray(pred.bins.xy[pred.order], dtype=np.float64)})
        for name in ("varm", "obsp", "varp"):
            write_elem(f, name, {})
        write_elem(f, "uns", {"magnet": magnet, "spatialdata_attrs": keys})
        # what spatialdata's table writer adds to the group
        f.attrs.update({"spatialdata-encoding-type": "ngff:regions_table", **keys,
                        "version": CurrentTablesFormat().spatialdata_format_version})


def level_elements(pred: SlidePrediction, geom: Geometry, var, magnet: dict, el: dict) -> dict:
    """{"spots"|"tiles": (square polygons, table)} for the levels the model predicts (spot cells tile a tile)."""
    # start-up time: the CLI imports this module
    import anndata as ad
    import pandas as pd
    from spatialdata.models import TableModel  # optional extra [spatialdata]

    scale = geom.mpp / pred.mpp_full  # full-res px per model px
    levels = {"spots": (pred.spot_pred, pred.spot_xy, geom.global_px / geom.spots_per_side * scale,
                        {"in_tissue": pred.spot_tissue.astype(np.int64),
                         "magnet_tile": np.repeat(np.arange(len(pred.tile_grid)), geom.n_spots)}),
              "tiles": (pred.global_pred, pred.global_xy, geom.global_px * scale,
                        {"grid_x": pred.tile_grid[:, 0], "grid_y": pred.tile_grid[:, 1]})}
    out = {}
    for key, (values, xy, size, columns) in levels.items():
        if np.isnan(values).all():
            continue  # the model has no head at this level
        obs = annotating(pd.DataFrame(columns, index=np.arange(len(xy)).astype(str)), el[key])
        adata = ad.AnnData(X=values, obs=obs, var=var, obsm={"spatial": np.asarray(xy, np.float64)},
                           uns={"magnet": magnet})
        out[key] = (squares(xy, np.array([size, 0.0]), np.array([0.0, size])),
                    TableModel.parse(adata, region=el[key], region_key="region", instance_key="instance_id"))
    return out


def multiscale(slide_image: SlideImage, cs: dict):
    """The slide's full-resolution image as a lazy multiscale image, halved until it fits SMALLEST_LEVEL."""
    from spatialdata.models import Image2DModel  # optional extra [spatialdata]

    full = slide_image.full_resolution()
    k = 1
    while max(full.shape[1:]) / 2**k > SMALLEST_LEVEL:
        k += 1
    return Image2DModel.parse(full, dims=("c", "y", "x"), c_coords=["r", "g", "b"], scale_factors=[2] * k,
                              chunks=(3, IMAGE_CHUNK, IMAGE_CHUNK), transformations=cs)
