"""Batch/collate and the models: shapes, gradients, graph equivariance, overfitting, bf16, compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_samples import TINY_GEOMETRY, VirtualSlide

from magnet.batch import collate
from magnet.config import load_config
from magnet.data.transforms import chunk_bins
from magnet.errors import UserError
from magnet.losses import LossConfig, compute_loss
from magnet.models.config import ModelConfig
from magnet.models.factory import create_model, model_names
from magnet.models.layers import ContextCrossAttention, LevelEncoder

G, F, K = 16, 32, 4


def tiny_cfg(name="magnet", **kw) -> ModelConfig:
    base = dict(name=name, encoder="test_resnet", width=32, heads=4, gat_layers=2, k_bin=4, k_spot=K, k_global=K,
                dropout=0.0)
    return ModelConfig(**{**base, **kw})


def make_batch(n_samples=3, n_tiles=30, slides=("s0",), seed=0):
    samples = []
    for i, name in enumerate(slides):
        vs = VirtualSlide(n_tiles, geometry=TINY_GEOMETRY, n_genes=G, feat_dim=F, k=K, slide=name, seed=seed + i)
        samples += vs.samples(n_samples, seed=seed)
    return samples, collate(samples, TINY_GEOMETRY, k_bin=4, k_spot=K, k_global=K)


@pytest.fixture
def one_thread():
    """Training loops on a shared 2-core machine: one intra-op thread avoids oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def batch():
    return make_batch(n_samples=2, slides=("s0", "s1"))


def test_collate_fields_follow_the_samples(batch):
    samples, b = batch
    S, k1 = TINY_GEOMETRY.n_spots, K + 1
    n = sum(len(s["bin_xy"]) for s in samples)
    assert (b.num_bins, b.num_spots, b.num_globals, b.num_samples, b.num_genes) == (n, 4 * k1 * S, 4 * k1, 4, G)
    assert b.bin_img.dtype == torch.uint8 and b.bin_img.shape == (n, 3, 32, 32)
    # first bin's patch is the crop of the stored image centred on its centre
    x, y = np.rint(samples[0]["bin_xy"][0] - 16).astype(int)
    assert np.array_equal(b.bin_img[0].permute(1, 2, 0).numpy(), samples[0]["image"][y:y + 32, x:x + 32])
    np.testing.assert_allclose(b.bin_expr[:len(samples[0]["bin_xy"])].numpy(), samples[0]["bin_expr"].astype(np.float32))
    # index maps: bin -> spot -> global are consistent, and point into the bin's own sample
    assert torch.equal(b.spot_glob[b.bin_spot], b.bin_glob)
    assert torch.equal(b.glob_sample[b.bin_glob], b.bin_sample)
    assert b.glob_centre[b.bin_glob].all() and b.spot_centre[b.bin_spot].all()
    # slide positions in um from the tile grid
    gx, gy = samples[0].meta.gx, samples[0].meta.gy
    expect = (np.array([gx, gy]) * 64 - 16 + samples[0]["bin_xy"][0]) * 0.5
    np.testing.assert_allclose(b.bin_pos[0].numpy(), expect, rtol=1e-6)
    # context tokens: own node first, every valid token inside the bin's own sample
    assert torch.equal(b.ctx_spot[:, 0], b.bin_spot) and torch.equal(b.ctx_glob[:, 0], b.bin_glob)
    assert b.ctx_spot.shape == (n, 1 + K) and b.ctx_spot_mask[:, 0].all()
    tok_sample = b.glob_sample[b.spot_glob[b.ctx_spot]]
    assert (tok_sample == b.bin_sample[:, None])[b.ctx_spot_mask].all()
    np.testing.assert_allclose(b.ctx_glob_offset[:, 0].numpy(), (b.glob_pos[b.bin_glob] - b.bin_pos).numpy(), atol=1e-3)


def test_graphs_are_sparse_spatial_and_never_cross_samples_or_slides(batch):
    _, b = batch
    for name in ("spot", "glob"):
        ei = getattr(b, f"{name}_edge_index")
        sample = b.glob_sample[b.spot_glob] if name == "spot" else b.glob_sample
        assert (sample[ei[0]] == sample[ei[1]]).all() and ei.shape[1] <= K * len(sample)


def test_bin_graph_links_the_bins_of_each_sample_alone():
    """Adjacent tiles of one slide and the chunks of one tile in one batch: each bin's sources are its 4
    nearest bins of its own sample, the edges a sample gets alone, whatever else the batch holds."""
    vs = VirtualSlide(9, geometry=TINY_GEOMETRY, n_genes=G, feat_dim=F, k=K, bins_per_tile=24)
    samples = [vs.sample(0), vs.sample(1)] + chunk_bins(vs.sample(4), 8)  # tiles 0, 1 touch; 3 chunks of tile 4
    b = collate(samples, TINY_GEOMETRY, k_bin=4, k_spot=K, k_global=K)
    src, dst = b.bin_edge_index
    assert (b.bin_sample[src] == b.bin_sample[dst]).all() and (src != dst).all()
    assert torch.bincount(dst, minlength=b.num_bins).eq(4).all()
    pos, sample = b.bin_pos.double(), b.bin_sample
    for i in range(b.num_bins):  # brute force
        d = (pos - pos[i]).norm(dim=1)
        d[(sample != sample[i]) | (torch.arange(b.num_bins) == i)] = float("inf")
        assert set(src[dst == i].tolist()) == set(torch.topk(-d, 4).indices.tolist())
    np.testing.assert_allclose(b.bin_edge_attr.numpy(), (b.bin_pos[src] - b.bin_pos[dst]).numpy(), atol=1e-3)
    start = 0
    for s in samples:
        alone = collate([s], TINY_GEOMETRY, k_bin=4, k_spot=K, k_global=K).bin_edge_index
        mine = b.bin_sample[dst] == b.bin_sample[start]
        assert torch.equal(b.bin_edge_index[:, mine] - start, alone)
        start += s.n_bins


def test_absent_neighbours_are_masked_and_have_no_edges():
    vs = VirtualSlide(3, geometry=TINY_GEOMETRY, n_genes=G, feat_dim=F, k=K)  # 3 tiles < K + 1
    b = collate(vs.samples(2), TINY_GEOMETRY, k_bin=4, k_spot=K, k_global=K)
    assert b.glob_mask.view(2, K + 1).sum(1).tolist() == [3, 3]
    absent = ~b.glob_mask
    assert not absent[b.glob_edge_index].any() and not absent[b.spot_glob[b.spot_edge_index]].any()
    assert not b.spot_mask[absent[b.spot_glob]].any()
    assert b.ctx_glob_mask.sum(1).eq(3).all()


def test_collate_rejects_a_malformed_sample():
    samples = VirtualSlide(10, geometry=TINY_GEOMETRY, n_genes=G, feat_dim=F, k=K).samples(2)
    samples[1] = samples[1].replace(spot_feat=samples[1]["spot_feat"][:, :, :5])
    with pytest.raises(UserError, match="spot_feat"):
        collate(samples, TINY_GEOMETRY, k_spot=K, k_global=K)


@pytest.mark.parametrize("name", [n for n in model_names() if n != "ridge"])  # ridge: features only (below)
def test_every_model_gives_shapes_and_dtypes(batch, name):
    _, b = batch
    model = create_model(tiny_cfg(name), G, F, TINY_GEOMETRY)
    pred = model(b)
    assert pred.bin.shape == (b.num_bins, G) and pred.bin.dtype == torch.float32
    has = {"spot": name not in ("stnet", "magnet_no_spot"), "glob": name not in ("stnet", "magnet_no_global")}
    for level, n in (("spot", b.num_spots), ("glob", b.num_globals)):
        p = getattr(pred, level)
        assert (p is not None) == has[level]
        if p is not None:
            assert p.shape == (n, G) and torch.isfinite(p).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = compute_loss(model(b), b, LossConfig())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("name", ["magnet", "magnet_no_graph", "magnet_paper", "stnet", "mean"])
def test_frozen_features_get_no_gradient_and_every_parameter_trains(batch, name):
    _, b = batch
    b = b.to("cpu")
    b.spot_feat.requires_grad_(True)
    b.glob_feat.requires_grad_(True)
    model = create_model(tiny_cfg(name), G, F, TINY_GEOMETRY).train()
    loss, _ = compute_loss(model(b), b, LossConfig())
    loss.backward()
    assert b.spot_feat.grad is None and b.glob_feat.grad is None
    # MagNet's fused bin head starts at zero, so what feeds it gets gradient from the second step on
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    model.zero_grad()
    compute_loss(model(b), b, LossConfig())[0].backward()
    params = dict(model.named_parameters())
    assert all(p.requires_grad for p in params.values())
    assert not [n for n, p in params.items() if p.grad is None], "parameters outside the graph"
    # timm zero-inits each residual block's last norm, so some encoder grads start at exactly 0
    dead = [n for n, p in params.items() if not n.startswith("encoder.") and not p.grad.abs().sum() > 0]
    assert not dead, f"parameters with zero gradient: {dead}"
    if hasattr(model, "encoder"):
        assert next(model.encoder.parameters()).grad.abs().sum() > 0  # the stem trains


@pytest.mark.parametrize("name", ["magnet", "magnet_no_spot", "magnet_no_global", "magnet_no_graph"])
def test_magnet_starts_from_the_single_scale_prediction(batch, name):
    _, b = batch
    torch.manual_seed(3)
    stnet = create_model(tiny_cfg("stnet"), G, F, TINY_GEOMETRY).eval()
    torch.manual_seed(3)
    magnet = create_model(tiny_cfg(name), G, F, TINY_GEOMETRY).eval()
    with torch.no_grad():
        assert torch.equal(magnet(b).bin, stnet(b).bin)  # the context levels add only what training finds
        magnet.heads["bin"][-1].weight.normal_()
        assert not torch.allclose(magnet(b).bin, stnet(b).bin)
        # in training, a share context_drop of the bins get the local read-out alone
        magnet.train(), stnet.train()
        local_only = (magnet(b).bin == stnet(b).bin).all(1).float().mean()
        assert 0.25 < local_only < 0.75  # context_drop 0.5


def test_magnet_paper_predicts_bins_from_the_fused_representation(batch):
    """The paper's form: no local read-out, the bin prediction depends on the context from step 0, and
    training keeps every bin's context (no context_drop), whatever model.context_drop says."""
    _, b = batch
    torch.manual_seed(3)
    paper = create_model(tiny_cfg("magnet_paper", context_drop=0.5), G, F, TINY_GEOMETRY)
    torch.manual_seed(3)
    magnet = create_model(tiny_cfg("magnet"), G, F, TINY_GEOMETRY)
    assert paper.local_head is None and paper.context_drop == 0.0
    assert paper.output_biases()[0] is paper.heads["bin"][-1].bias
    names = {n for n, _ in paper.named_parameters()}
    assert names == {n for n, _ in magnet.named_parameters()} - {"local_head.weight", "local_head.bias"}
    other = collate_shuffled_context(b)
    with torch.no_grad():
        paper.eval(), magnet.eval()
        assert not torch.allclose(paper(b).bin, paper(other).bin)  # context moves the bin prediction at init
        assert torch.equal(magnet(b).bin, magnet(other).bin)  # magnet's context head starts at zero
        paper.train()
        torch.manual_seed(0)
        first = paper(b).bin
        torch.manual_seed(1)
        assert torch.equal(first, paper(b).bin)  # dropout 0 and no context_drop: training is deterministic
    paper.train()
    loss, _ = compute_loss(paper(b), b, LossConfig())
    loss.backward()
    assert paper.heads["bin"][-1].weight.grad.abs().sum() > 0 and paper.node_proj["spot"].weight.grad.abs().sum() > 0


def collate_shuffled_context(b):
    """The same batch with each context level's frozen features permuted across its nodes."""
    import copy

    other = copy.copy(b)
    g = torch.Generator().manual_seed(0)
    other.spot_feat = b.spot_feat[torch.randperm(b.spot_feat.shape[0], generator=g)]
    other.glob_feat = b.glob_feat[torch.randperm(b.glob_feat.shape[0], generator=g)]
    return other


@pytest.mark.parametrize("gat_type", ["gat", "gatv2"])
def test_level_encoder_is_equivariant_to_node_permutation(gat_type):
    torch.manual_seed(0)
    n, d = 12, 16
    enc = LevelEncoder(d, 4, 2, 1, gat_type, edge_dim=2, dropout=0.0).eval()
    x = torch.randn(n, d)
    ei = torch.stack([torch.randint(0, n, (40,)), torch.randint(0, n, (40,))])
    ea = torch.randn(40, 2)
    perm = torch.randperm(n)
    inv = torch.argsort(perm)  # node i of the original is node inv[i] of the permuted graph
    out = enc(x, ei, ea)
    out_p = enc(x[perm], inv[ei], ea)
    torch.testing.assert_close(out_p, out[perm], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(enc(x, ei[:, :20], ea[:20]), out)  # the edges matter


def test_cross_attention_depends_on_the_bin_embedding():
    torch.manual_seed(0)
    att = ContextCrossAttention(16, 4, dropout=0.0).eval()
    q = torch.randn(5, 16)
    tokens = torch.randn(5, 6, 16)
    mask = torch.ones(5, 6, dtype=torch.bool)
    q2 = q + torch.randn(5, 16)
    assert (att(q, tokens, mask) - att(q2, tokens, mask)).abs().amax(1).gt(1e-4).all()
    # the reference's defect, reproduced by a single key token: the output ignores the query
    one = torch.zeros(5, 6, dtype=torch.bool)
    one[:, 0] = True
    torch.testing.assert_close(att(q, tokens, one), att(q2, tokens, one))
    # masked tokens have no effect
    tokens2 = tokens.clone()
    tokens2[:, 3:] += 5.0
    mask[:, 3:] = False
    torch.testing.assert_close(att(q, tokens, mask), att(q, tokens2, mask))


def test_tiny_magnet_overfits_one_batch(one_thread):
    torch.manual_seed(0)
    _, b = make_batch(n_samples=2, slides=("s0",))
    model = create_model(tiny_cfg(), G, F, TINY_GEOMETRY).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    cfg = LossConfig()
    first = None
    for _ in range(50):
        loss, _ = compute_loss(model(b), b, cfg)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        last, _ = compute_loss(model(b), b, cfg)
    assert last.item() < 0.1 * first, (first, last.item())


def test_encoder_weights_load_from_a_local_file(tmp_path):
    import timm

    src = timm.create_model("test_resnet", num_classes=0)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    path = tmp_path / "enc.pth"
    torch.save(src.state_dict(), path)
    model = create_model(tiny_cfg(encoder_weights=str(path)), G, F, TINY_GEOMETRY)
    mine = model.encoder.backbone.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in src.state_dict().items())
    assert model.encoder.weights_id.startswith("sha256:")


def test_model_config_loads_and_rejects_bad_keys(tmp_path):
    (tmp_path / "m.yaml").write_text("width: 64\nheads: 8\ngat_type: gatv2\n")
    cfg = load_config(ModelConfig, tmp_path / "m.yaml", ["name=stnet"])
    assert (cfg.width, cfg.heads, cfg.gat_type, cfg.name) == (64, 8, "gatv2", "stnet")
    with pytest.raises(UserError, match="widht"):
        load_config(ModelConfig, None, ["widht=3"])
    with pytest.raises(UserError, match="heads"):
        load_config(ModelConfig, None, ["width=30", "heads=8"])
    with pytest.raises(UserError, match="name"):
        load_config(ModelConfig, None, ["name=transformer"])


def test_batch_moves_and_pins(batch):
    _, b = batch
    moved = b.to("cpu")
    assert torch.equal(moved.bin_img, b.bin_img) and moved.slides == b.slides
    if torch.cuda.is_available():
        assert b.pin_memory().bin_expr.is_pinned()


@pytest.mark.slow
def test_torch_compile_matches_eager(batch, one_thread):
    _, b = batch
    torch.manual_seed(0)
    model = create_model(tiny_cfg(), G, F, TINY_GEOMETRY).eval()
    with torch.no_grad():
        eager = model(b)
        compiled = torch.compile(model, dynamic=True, fullgraph=True)(b)  # fullgraph: no graph breaks
    torch.testing.assert_close(compiled.bin, eager.bin, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled.spot, eager.spot, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["magnet", "stnet", "ridge"])
def test_models_on_cached_bin_features_need_no_image(name):
    """model.bin_input=features: samples without their image, the bins' frozen features in bin_feat."""
    import dataclasses

    rng = np.random.default_rng(0)
    samples = VirtualSlide(10, geometry=TINY_GEOMETRY, n_genes=G, feat_dim=F, k=K).samples(2)
    samples = [dataclasses.replace(s, arrays={**{k: v for k, v in s.arrays.items() if k != "image"},
                                              "bin_feat": rng.normal(size=(s.n_bins, F)).astype(np.float16)})
               for s in samples]
    b = collate(samples, TINY_GEOMETRY, k_bin=4, k_spot=K, k_global=K)
    assert b.bin_img is None and b.bin_feat.shape == (b.num_bins, F)
    torch.manual_seed(0)
    model = create_model(tiny_cfg(name, bin_input="features"), G, F, TINY_GEOMETRY).eval()
    if name == "ridge":
        with torch.no_grad():
            model.proj.normal_(), model.weight.normal_()
    else:
        assert model.encoder is None  # no CNN in the step
    with torch.no_grad():
        pred = model(b).bin
        assert pred.shape == (b.num_bins, G) and torch.isfinite(pred).all()
        other = dataclasses.replace(b, bin_feat=b.bin_feat.flip(0))
        assert not torch.allclose(model(other).bin, pred)  # the prediction reads the bins' features
    with pytest.raises(UserError, match="bin_feat: missing"):
        model(dataclasses.replace(b, bin_feat=None))
    if name == "ridge":
        with pytest.raises(ValueError, match="bin_input=features"):
            tiny_cfg("ridge")
