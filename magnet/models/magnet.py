"""MagNet (Zhu et al., MIDL 2025) with sparse graphs: cost depends on the batch, not the slide.

Per step, for a :class:`magnet.batch.Batch`:

1. bin patches -> timm encoder (trained end to end), or their cached frozen features (``model.bin_input``,
   :mod:`magnet.models.bin_input`) -> projection to ``width``; with ``model.field``, plus a projection of the
   bins' feature field (member ``bin_field``: the slide's cached bin features around the bin, Gaussian-weighted at
   several scales, sharding/feature_field.py), frozen like the context levels;
2. per context level (spot, global): frozen tile features (stop-grad), standardised with the
   training split's statistics (:mod:`magnet.models.init`) -> projection = node
   embeddings; each bin cross-attends to its own tile and that tile's graph neighbours (tokens =
   node embedding + encoded offset from the bin), added residually to the bin embedding;
3. per level (bin, spot, global): stacked GAT blocks on the level's sparse graph, a transformer
   over the block outputs, mean over depth (:class:`~magnet.models.layers.LevelEncoder`);
4. fusion: the bin representation plus an MLP of [bin, its spot node, its global node];
5. separate heads per level. The bin prediction is a linear read-out of the encoder (ST-Net's head,
   created from the same random state, so identical at init) plus the fused head, whose last layer
   starts at zero: at step 0 MagNet predicts what ST-Net predicts, and the graphs and context levels
   add what lowers the loss. In training, a share ``context_drop`` of the bins get the local read-out
   alone (the fused head's term dropped, not rescaled), so the read-out stays a complete single-scale
   predictor and the fused head learns the correction that context brings, not a second copy of the
   local morphology (demo validation: the fused head had taken over part of the cell-type markers,
   which then generalised worse than ST-Net's).

``paper=True`` (``model.name=magnet_paper``) is the paper's form: the bin prediction is the bin head on
the fused multi-level representation alone (no local read-out, default initialisation, no
context_drop).

Ablations switch off the spot level, the global level, or every graph (GAT -> node-wise linear;
the cross-attention keeps its neighbour tokens, which come from the data, not from a GNN).
"""

from __future__ import annotations

import torch
from torch import nn

from magnet.geometry import Geometry
from magnet.models.config import ModelConfig
from magnet.models.bin_input import bin_input_modules, embed_bins, field_input
from magnet.models.init import FeatureScaler
from magnet.models.layers import ContextCrossAttention, LevelEncoder, head
from magnet.models.predictions import Predictions
from magnet.models.register import register_model


class MagNet(nn.Module):
    def __init__(self, cfg: ModelConfig, n_genes: int, feat_dim: int, geometry: Geometry, *,
                 spot: bool = True, glob: bool = True, graph: bool = True, paper: bool = False):
        super().__init__()
        D = cfg.width
        self.encoder, self.bin_scale, n_local = bin_input_modules(cfg, feat_dim)
        # the local read-out: first draw after the encoder, as ST-Net's head
        self.local_head = None if paper else nn.Linear(n_local, n_genes)
        self.bin_proj = nn.Linear(n_local, D)
        self.levels = tuple(name for name, on in (("spot", spot), ("glob", glob)) if on)
        # offsets in um are divided by the level's tile side, so positions enter the model as O(1)
        self.scale = {"bin": geometry.bin_px * geometry.mpp, "spot": geometry.spot_px * geometry.mpp,
                      "glob": geometry.global_px * geometry.mpp}
        self.edge_features = cfg.edge_features
        self.context_drop = 0.0 if paper else cfg.context_drop
        edge_dim = 2 if cfg.edge_features else None
        self.feat_scale = nn.ModuleDict({name: FeatureScaler(feat_dim) for name in self.levels})  # magnet.models.init
        self.field_proj = None
        if cfg.field:  # the feature field of the bin (member bin_field), on the context path like the levels
            self.feat_scale["field"] = FeatureScaler(cfg.field * feat_dim)
            self.field_proj = nn.Linear(cfg.field * feat_dim, D)
        self.node_proj = nn.ModuleDict({name: nn.Linear(feat_dim, D) for name in self.levels})
        self.token_pos = nn.ModuleDict({name: nn.Linear(2, D) for name in self.levels})
        self.cross = nn.ModuleDict({name: ContextCrossAttention(D, cfg.heads, cfg.dropout) for name in self.levels})
        self.level = nn.ModuleDict({
            name: LevelEncoder(D, cfg.heads, cfg.gat_layers, cfg.transformer_layers, cfg.gat_type, edge_dim,
                               cfg.dropout, graph)
            for name in ("bin",) + self.levels
        })
        n_parts = 1 + len(self.levels)
        self.fuse_norm = nn.ModuleList(nn.LayerNorm(D) for _ in range(n_parts))
        self.fuse = nn.Sequential(nn.Linear(n_parts * D, D), nn.GELU(), nn.Linear(D, D))
        self.heads = nn.ModuleDict({name: head(D, n_genes) for name in ("bin",) + self.levels})
        if not paper:
            nn.init.zeros_(self.heads["bin"][-1].weight)
            nn.init.zeros_(self.heads["bin"][-1].bias)

    def output_biases(self) -> list[nn.Parameter]:
        """The biases that set each level's output offset (:func:`magnet.models.init.init_from_statistics`)."""
        bin_bias = self.heads["bin"][-1].bias if self.local_head is None else self.local_head.bias
        return [bin_bias] + [self.heads[name][-1].bias for name in self.levels]

    def _edge_attr(self, batch, name: str) -> torch.Tensor | None:
        return getattr(batch, f"{name}_edge_attr") / self.scale[name] if self.edge_features else None

    def forward(self, batch) -> Predictions:
        local = embed_bins(self.encoder, self.bin_scale, batch)
        x = self.bin_proj(local)
        if self.field_proj is not None:
            x = x + self.field_proj(self.feat_scale["field"](field_input(batch)))
        nodes = {}
        for name in self.levels:
            feat = self.feat_scale[name](getattr(batch, f"{name}_feat").detach())  # frozen: stop-grad
            nodes[name] = self.node_proj[name](feat)
            idx = getattr(batch, f"ctx_{name}")
            offset = getattr(batch, f"ctx_{name}_offset") / self.scale[name]
            tokens = nodes[name][idx] + self.token_pos[name](offset)
            x = x + self.cross[name](x, tokens, getattr(batch, f"ctx_{name}_mask"))
        reps = {"bin": self.level["bin"](x, batch.bin_edge_index, self._edge_attr(batch, "bin"))}
        for name in self.levels:
            reps[name] = self.level[name](nodes[name], getattr(batch, f"{name}_edge_index"),
                                          self._edge_attr(batch, name))
        parts = [reps["bin"]] + [reps[name][getattr(batch, f"bin_{name}")] for name in self.levels]
        fused = reps["bin"] + self.fuse(torch.cat([n(p) for n, p in zip(self.fuse_norm, parts)], dim=-1))
        out = {name: self.heads[name](reps[name]) for name in self.levels}
        context = self.heads["bin"](fused)
        if self.training and self.context_drop > 0:
            context = context * (torch.rand(context.shape[0], 1, device=context.device) >= self.context_drop).to(context.dtype)
        bin_pred = context if self.local_head is None else self.local_head(local) + context
        return Predictions(bin=bin_pred, spot=out.get("spot"), glob=out.get("glob"))



@register_model("magnet")
def magnet(cfg: ModelConfig, n_genes: int, feat_dim: int, geometry: Geometry) -> MagNet:
    return MagNet(cfg, n_genes, feat_dim, geometry)


@register_model("magnet_no_spot")
def magnet_no_spot(cfg: ModelConfig, n_genes: int, feat_dim: int, geometry: Geometry) -> MagNet:
    return MagNet(cfg, n_genes, feat_dim, geometry, spot=False)


@register_model("magnet_no_global")
def magnet_no_global(cfg: ModelConfig, n_genes: int, feat_dim: int, geometry: Geometry) -> MagNet:
    return MagNet(cfg, n_genes, feat_dim, geometry, glob=False)


@register_model("magnet_no_graph")
def magnet_no_graph(cfg: ModelConfig, n_genes: int, feat_dim: int, geometry: Geometry) -> MagNet:
    return MagNet(cfg, n_genes, feat_dim, geometry, graph=False)


@register_model("magnet_paper")
def magnet_paper(cfg: ModelConfig, n_genes: int, feat_dim: int, geometry: Geometry) -> MagNet:
    """The paper's form: the bin prediction comes from the fused multi-level representation alone."""
    return MagNet(cfg, n_genes, feat_dim, geometry, paper=True)
