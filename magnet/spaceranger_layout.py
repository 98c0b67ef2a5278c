"""Every path and file name of a Space Ranger HD ``outs`` folder, in one place (spatialdata-io keeps its own in
``VisiumHDKeys``): the reader, prediction, the synthetic generator and the SpatialData writer spell none of them.

::

    outs/feature_slice.h5                        2 um counts, one sparse image per gene; masks/square_XXXum
    outs/spatial/                                tissue_{hires,lowres}_image.png, scalefactors_json.json (2 um)
    outs/binned_outputs/square_XXXum/            filtered_feature_bc_matrix.h5
        spatial/                                 tissue_positions.parquet, scalefactors_json.json, the PNGs
    outs/segmented_outputs/                      Space Ranger 4's cells: cell_segmentations.geojson,
                                                 nucleus_segmentations.geojson, filtered_feature_cell_matrix.h5,
                                                 barcode_mappings.parquet, spatial/
"""

from __future__ import annotations

from pathlib import Path


class Outs:
    """A Space Ranger HD ``outs`` folder (``Outs(path).bin_matrix(8)``); the names are class attributes."""

    OUTS = "outs"
    BINNED = "binned_outputs"
    SEGMENTED = "segmented_outputs"
    SPATIAL = "spatial"
    FEATURE_SLICE = "feature_slice.h5"
    MATRIX = "filtered_feature_bc_matrix.h5"
    RAW_MATRIX = "raw_feature_bc_matrix.h5"  # every bin, in tissue or not
    POSITIONS = "tissue_positions.parquet"
    SCALEFACTORS = "scalefactors_json.json"
    IMAGES = ("hires", "lowres")  # tissue_{kind}_image.png, scaled by the scalefactors' tissue_{kind}_scalef
    CELL_SEGMENTATIONS = "cell_segmentations.geojson"
    NUCLEUS_SEGMENTATIONS = "nucleus_segmentations.geojson"
    CELL_MATRIX = "filtered_feature_cell_matrix.h5"
    BARCODE_MAPPINGS = "barcode_mappings.parquet"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def find(cls, path: str | Path) -> "Outs":
        """The ``outs`` folder given as itself or as the folder holding it."""
        path = Path(path)
        inner = path / cls.OUTS
        return cls(inner if not (path / cls.BINNED).is_dir() and inner.is_dir() else path)

    @staticmethod
    def square(bin_um: int) -> str:
        """Name of bin size ``bin_um``'s folder (and of its mask in the feature slice): ``square_008um``."""
        return f"square_{bin_um:03d}um"

    @staticmethod
    def image(spatial: Path, kind: str) -> Path:
        """``spatial/tissue_{kind}_image.png`` (``kind``: one of :attr:`IMAGES`)."""
        return Path(spatial) / f"tissue_{kind}_image.png"

    def binned(self, bin_um: int) -> Path:
        return self.path / self.BINNED / self.square(bin_um)

    def bin_spatial(self, bin_um: int) -> Path:
        return self.binned(bin_um) / self.SPATIAL

    def bin_matrix(self, bin_um: int) -> Path:
        return self.binned(bin_um) / self.MATRIX

    def bin_raw_matrix(self, bin_um: int) -> Path:
        return self.binned(bin_um) / self.RAW_MATRIX

    def bin_positions(self, bin_um: int) -> Path:
        return self.bin_spatial(bin_um) / self.POSITIONS

    def bin_scalefactors(self, bin_um: int) -> Path:
        return self.bin_spatial(bin_um) / self.SCALEFACTORS

    @property
    def spatial(self) -> Path:
        """The slide-level ``spatial/`` (images and scale factors of the 2 um bins)."""
        return self.path / self.SPATIAL

    @property
    def feature_slice(self) -> Path:
        return self.path / self.FEATURE_SLICE

    @property
    def segmented(self) -> Path:
        return self.path / self.SEGMENTED

    @property
    def cell_segmentations(self) -> Path:
        return self.segmented / self.CELL_SEGMENTATIONS

    @property
    def nucleus_segmentations(self) -> Path:
        return self.segmented / self.NUCLEUS_SEGMENTATIONS

    @property
    def cell_matrix(self) -> Path:
        return self.segmented / self.CELL_MATRIX

    @property
    def barcode_mappings(self) -> Path:
        return self.segmented / self.BARCODE_MAPPINGS

    @property
    def segmented_spatial(self) -> Path:
        return self.segmented / self.SPATIAL
