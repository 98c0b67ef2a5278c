"""Frozen-encoder features of the spot tiles and the global tile of each stored tile image."""

from __future__ import annotations

import numpy as np

from magnet.geometry import Geometry

from .config import EncoderConfig


def spot_boxes(geom: Geometry) -> list[tuple[int, int]]:
    """Top-left (x, y) of each spot tile crop in the stored image (cell j = row * s + col)."""
    return [(int(round(cx - geom.spot_px / 2)), int(round(cy - geom.spot_px / 2))) for cx, cy in geom.spot_centres()]


class FeatureExtractor:
    """``(image_px, image_px, 3)`` uint8 tile images -> spot (S, F) and global (F,) float16 features."""

    def __init__(self, cfg: EncoderConfig, geom: Geometry, seed: int, threads: int):
        import torch

        from magnet.models.encoder import Encoder

        torch.set_num_threads(max(1, threads))
        self.torch = torch
        self.cfg, self.geom = cfg, geom
        self.encoder = Encoder(cfg.name, cfg.weights, seed=seed).eval()
        self.dim = self.encoder.num_features
        self.boxes = spot_boxes(geom)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(batch), self.cfg.batch_size):
                x = torch.from_numpy(batch[i:i + self.cfg.batch_size]).permute(0, 3, 1, 2).float().div_(255)
                out.append(self.encoder(x).float().numpy())
        return np.concatenate(out).astype(np.float16)

    def __call__(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Features of a list of tile images: spot (N, S, F) and global (N, F)."""
        g, m, p = self.geom.global_px, self.geom.margin, self.geom.spot_px
        spots = np.stack([im[y:y + p, x:x + p] for im in images for x, y in self.boxes])
        glob = np.stack([im[m:m + g, m:m + g] for im in images])
        if self.cfg.input_px and self.cfg.input_px != g:
            import torch.nn.functional as F

            t = self.torch.from_numpy(glob).permute(0, 3, 1, 2).float()
            t = F.interpolate(t, size=(self.cfg.input_px,) * 2, mode="bilinear", antialias=True, align_corners=False)
            glob = t.round_().clamp_(0, 255).to(self.torch.uint8).permute(0, 2, 3, 1).numpy()
        spot_feat = self._run(spots).reshape(len(images), len(self.boxes), self.dim)
        return spot_feat, self._run(glob)
