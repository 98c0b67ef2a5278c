"""MagNet building blocks: multi-token cross-attention, graph-attention blocks, level transformer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ContextCrossAttention(nn.Module):
    """Multi-head attention from one query per bin to ``T`` context tokens, masked.

    query (N, D), tokens (N, T, D), mask (N, T) bool (True = attend; token 0 must be valid) -> (N, D).
    Unlike the reference (one key token, so softmax == 1 and the query had no effect), the keys are
    the bin's own tile and its graph neighbours, so the attention weights depend on the query.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        N, T, D = tokens.shape
        h = self.heads
        q = self.q(self.norm_q(query)).view(N, 1, h, D // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(tokens)).view(N, T, 2, h, D // h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(N, D))


class GraphBlock(nn.Module):
    """Pre-norm residual graph attention: ``h + dropout(gelu(GAT(LN(h))))`` with concatenated heads.

    ``graph=False`` replaces the GAT by a node-wise linear layer (the no-graph ablation).
    """

    def __init__(self, dim: int, heads: int, gat_type: str, edge_dim: int | None, dropout: float, graph: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.graph = graph
        if graph:
            from torch_geometric.nn import GATConv, GATv2Conv  # start-up time: about 2 s, only for a bin graph

            conv = {"gat": GATConv, "gatv2": GATv2Conv}[gat_type]
            self.conv = conv(dim, dim // heads, heads=heads, concat=True, dropout=dropout, edge_dim=edge_dim)
        else:
            self.conv = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor | None) -> torch.Tensor:
        x = self.norm(h)
        x = self.conv(x, edge_index, edge_attr) if self.graph else self.conv(x)
        return h + self.drop(F.gelu(x))


class LevelEncoder(nn.Module):
    """One level: stacked :class:`GraphBlock` s, then a transformer over the block outputs.

    Each node's sequence is its ``layers`` block outputs (+ a learned depth embedding); the
    transformer mixes them and the mean over depth is the node's representation (paper, Fig. 2).
    """

    def __init__(self, dim: int, heads: int, layers: int, transformer_layers: int, gat_type: str,
                 edge_dim: int | None, dropout: float, graph: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(
            GraphBlock(dim, heads, gat_type, edge_dim, dropout, graph) for _ in range(layers)
        )
        self.depth = nn.Parameter(torch.zeros(layers, dim))
        nn.init.normal_(self.depth, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, transformer_layers, enable_nested_tensor=False)

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor | None) -> torch.Tensor:
        outs = []
        for block in self.blocks:
            h = block(h, edge_index, edge_attr)
            outs.append(h)
        seq = torch.stack(outs, dim=1) + self.depth
        return self.transformer(seq).mean(dim=1)


def head(dim: int, n_genes: int) -> nn.Sequential:
    """Regression head: LayerNorm + Linear to the genes."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n_genes))
