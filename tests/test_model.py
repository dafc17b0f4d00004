"""Networks and mixture: dense = per-patch embedding, energy = reference mixture, geometry."""

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from pedenet.config import PEDENetConfig
from pedenet.encoders import PretrainedEncoder, ScratchEncoder
from pedenet.gmm import GaussianMixture, GMMAccumulator, gmm_params, ridge_of
from pedenet.model import DIRECTIONS, PEDENetNetwork
from pedenet.training import _lp_pairs, effective_rank


@pytest.mark.parametrize("patch_size,stride", [(32, 4), (64, 8)])
def test_scratch_dense_embedding_equals_each_cropped_patch(patch_size, stride):
    torch.manual_seed(0)
    enc = ScratchEncoder(embedding_dim=16, patch_size=patch_size).double().eval()
    x = torch.rand(1, 3, patch_size + 5 * stride + 3, patch_size + 4 * stride + 1, dtype=torch.float64)
    with torch.no_grad():
        dense = enc(x)
        assert dense.shape[-2:] == (6, 5)
        for i in range(dense.shape[-2]):
            for j in range(dense.shape[-1]):
                crop = x[..., i * stride: i * stride + patch_size, j * stride: j * stride + patch_size]
                single = enc(crop)
                assert single.shape[-2:] == (1, 1)
                torch.testing.assert_close(dense[..., i, j], single[..., 0, 0], rtol=1e-10, atol=1e-10)


def test_scratch_receptive_field_is_the_patch():
    """Changing a pixel outside a patch leaves that patch's embedding unchanged."""
    torch.manual_seed(0)
    enc = ScratchEncoder(8, 32).eval()
    x = torch.rand(1, 3, 64, 64)
    y = x.clone()
    y[..., 32, 32] += 1.0  # outside patch (0,0) = pixels [0,32)×[0,32), inside patch at (8,8) cells
    with torch.no_grad():
        a, b = enc(x), enc(y)
    assert torch.equal(a[..., 0, 0], b[..., 0, 0])
    assert not torch.equal(a[..., 8, 8], b[..., 8, 8])


def test_pretrained_encoder_loads_imagenet_weights_and_is_frozen():
    enc = PretrainedEncoder(embedding_dim=16)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"proj.weight", "proj.bias"}
    # ImageNet weights, not a random init: the stem's batch-norm statistics are not the defaults
    assert not torch.allclose(enc.stem[1].running_var, torch.ones_like(enc.stem[1].running_var))
    x = torch.rand(2, 3, 96, 128)
    out = enc(x)
    assert out.shape == (2, 16, 12, 16)
    enc.train()
    assert not enc.blocks.training  # backbone batch norms stay in eval mode


def test_pretrained_features_do_not_depend_on_the_batch_or_the_mode():
    """A freshly built encoder (train mode) gives per-image, deterministic features."""
    torch.manual_seed(0)
    enc = PretrainedEncoder(embedding_dim=8)  # not switched to eval by the caller
    x = torch.rand(2, 3, 64, 64)
    alone = enc.raw_features(x[:1])
    batched = enc.raw_features(x)
    again = enc.raw_features(x[:1])
    torch.testing.assert_close(batched[:1], alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, alone, rtol=0, atol=0)


def test_pca_initialization_decorrelates_features():
    enc = PretrainedEncoder(embedding_dim=4)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(5000, 152, generator=g) @ torch.randn(152, 152, generator=g)
    enc.init_projection(feats)
    z = enc.proj(feats[:, :, None, None])[:, :, 0, 0].detach().double()
    cov = torch.cov(z.T)
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 1e-3 * cov.diag().max()
    assert z.mean(0).abs().max() < 1e-3 * cov.diag().max().sqrt()
    assert torch.all(cov.diag()[:-1] >= cov.diag()[1:])  # ordered principal axes


def _random_mixture(k=3, d=4, seed=0):
    rng = np.random.default_rng(seed)
    phi = rng.dirichlet(np.ones(k))
    mu = rng.normal(size=(k, d)) * 3
    a = rng.normal(size=(k, d, d))
    cov = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(d)
    return phi, mu, cov


def test_energy_matches_scipy_mixture():
    phi, mu, cov = _random_mixture()
    ridge = 1e-3
    mix = GaussianMixture(torch.tensor(phi), torch.tensor(mu), torch.tensor(cov), ridge)
    z = np.random.default_rng(1).normal(size=(50, 4)) * 4
    reg = cov + ridge_of(torch.tensor(cov), ridge).numpy()[:, None, None] * np.eye(4)
    dens = sum(phi[k] * multivariate_normal(mu[k], reg[k]).pdf(z) for k in range(3))
    np.testing.assert_allclose(mix.energy(torch.tensor(z)).numpy(), -np.log(dens), rtol=1e-9)
    post = np.stack([phi[k] * multivariate_normal(mu[k], reg[k]).pdf(z) for k in range(3)], 1) / dens[:, None]
    np.testing.assert_allclose(mix.responsibilities(torch.tensor(z)).numpy(), post, rtol=1e-7, atol=1e-12)


def test_energy_is_finite_far_from_the_data():
    phi, mu, cov = _random_mixture()
    mix = GaussianMixture(torch.tensor(phi), torch.tensor(mu), torch.tensor(cov))
    z = torch.full((3, 4), 1e4, dtype=torch.float64)
    e = mix.energy(z)
    assert torch.isfinite(e).all() and (e > 1e6).all()


def test_gmm_params_are_weighted_moments():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, 3, generator=g, dtype=torch.float64)
    gamma = torch.softmax(torch.randn(400, 2, generator=g, dtype=torch.float64), 1)
    phi, mu, cov = gmm_params(z, gamma)
    for k in range(2):
        w = gamma[:, k].numpy()
        np.testing.assert_allclose(mu[k].numpy(), np.average(z.numpy(), axis=0, weights=w), rtol=1e-9)
        np.testing.assert_allclose(cov[k].numpy(), np.cov(z.numpy().T, aweights=w, bias=True), rtol=1e-8)
    np.testing.assert_allclose(phi.numpy(), gamma.mean(0).numpy(), rtol=1e-9)


def test_accumulator_over_batches_equals_one_batch():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1000, 5, generator=g, dtype=torch.float64) * 2 + 1
    gamma = torch.softmax(torch.randn(1000, 3, generator=g, dtype=torch.float64), 1)
    acc = GMMAccumulator(3, 5)
    for part in range(0, 1000, 137):
        acc.add(z[part: part + 137], gamma[part: part + 137])
    mix = acc.finalize(ridge=0.0)
    phi, mu, cov = gmm_params(z, gamma)
    torch.testing.assert_close(mix.phi, phi, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mix.mu, mu, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mix.cov, cov, rtol=1e-8, atol=1e-10)


def test_accumulator_hard_labels_equal_one_hot_memberships():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(500, 4, generator=g) * 3 - 1
    labels = torch.randint(0, 3, (500,), generator=g)
    hard, soft = GMMAccumulator(3, 4), GMMAccumulator(3, 4)
    for part in range(0, 500, 97):
        hard.add_hard(z[part: part + 97], labels[part: part + 97])
    soft.add(z, torch.nn.functional.one_hot(labels, 3).double())
    a, b = hard.finalize(ridge=0.0), soft.finalize(ridge=0.0)
    for x, y in ((a.phi, b.phi), (a.mu, b.mu), (a.cov, b.cov)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)
    # the component means are the means of the rows of each label
    torch.testing.assert_close(a.mu[2], z[labels == 2].double().mean(0), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        hard.add_hard(z[:2], torch.tensor([0, 3]))


def test_accumulator_handles_an_unused_component():
    z = torch.randn(200, 3, dtype=torch.float64)
    gamma = torch.zeros(200, 2, dtype=torch.float64)
    gamma[:, 0] = 1.0
    mix = GMMAccumulator(2, 3)
    mix.add(z, gamma)
    out = mix.finalize()
    assert torch.isfinite(out.energy(z)).all()
    assert float(out.phi[1]) == 0.0


def test_lp_pairs_are_at_the_labelled_direction():
    d, h, w = 2, 20, 20
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    emb = torch.stack([ys, xs]).float()  # embedding = its own coordinates
    za, zb, label = _lp_pairs(emb, 500, dist=4, jit=1, gen=torch.Generator().manual_seed(0))
    delta = zb - za
    expected = DIRECTIONS[label].float() * 4
    assert (delta - expected).abs().max() <= 1.0
    assert set(label.tolist()) == set(range(8))


def test_lp_distance_is_in_patch_sizes():
    from pedenet.training import _lp_geometry

    assert _lp_geometry(PEDENetConfig(), stride=8) == (4, 1)  # patch 32 = 4 cells of 8 px
    assert _lp_geometry(PEDENetConfig(lp_distance=2.0), stride=8) == (8, 2)
    assert _lp_geometry(PEDENetConfig(lp_distance=0.1), stride=8) == (1, 0)  # at least one cell
    # checkpoints saved before the setting existed train and load as before: adjacent patches
    assert PEDENetConfig.from_dict({"encoder": "scratch"}).lp_distance == 1.0
    with pytest.raises(ValueError, match="lp_distance must be > 0"):
        PEDENetConfig(lp_distance=0)


def test_effective_rank_known_values():
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(20000, 8, generator=g)
    assert effective_rank(iso) == pytest.approx(8.0, rel=0.01)
    line = torch.randn(1000, 1, generator=g) * torch.ones(1, 8)
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-6)


def test_network_patch_energy_shape():
    cfg = PEDENetConfig(encoder="scratch", embedding_dim=8, n_components=2)
    net = PEDENetNetwork(cfg).eval()
    x = torch.rand(1, 3, 64, 80)
    with pytest.raises(RuntimeError, match="fit"):
        net.patch_energy(x)
    emb = net.embed(x)
    z = emb.permute(0, 2, 3, 1).reshape(-1, 8)
    acc = GMMAccumulator(2, 8)
    acc.add(z, net.membership(z))
    net.mixture = acc.finalize()
    e = net.patch_energy(x)
    assert e.shape == (1, 9, 13) and e.dtype == torch.float64


def test_feature_blocks_set_channels_and_grid():
    """Each block choice gives its channel count on the same stride-8 grid (stride-16 and
    stride-32 outputs upsampled by exact factors)."""
    x = torch.rand(1, 3, 96, 128)
    for blocks, channels in (((4, 10), 152), ((4, 10, 14, 15), 664), ((3, 7, 15), 440)):
        enc = PretrainedEncoder(8, load_weights=False, feature_blocks=blocks)
        assert enc.n_features == channels
        assert enc.raw_features(x).shape == (1, channels, 12, 16)
        assert len(enc.blocks) == blocks[-1] + 1
    for bad in ((10, 14), (4, 4), (14, 4), (4, 16), (), (4.5, 10), 4):
        with pytest.raises(ValueError, match="feature_blocks|stride-8"):
            PEDENetConfig(feature_blocks=bad)


def test_checkpoint_without_feature_blocks_loads_with_the_old_blocks(tmp_path):
    """Checkpoints saved before ``feature_blocks`` existed used blocks 4 and 10: loading one
    must rebuild that encoder (not today's default) and give the same maps."""
    import pedenet
    from pedenet.checkpoint import load_checkpoint, save_checkpoint

    rng = np.random.default_rng(0)
    images = [rng.random((64, 64, 3), dtype=np.float32) for _ in range(4)]
    model = pedenet.PEDENet(steps=0, calibration_fraction=0, feature_blocks=(4, 10), embedding_dim=8,
                            n_components=2, image_size=64, image_score_fraction=0).fit(images, progress=False)
    model.save(tmp_path / "new.pt")
    data = load_checkpoint(tmp_path / "new.pt")
    del data["config"]["feature_blocks"]
    del data["config"]["image_score_fraction"]  # nor had the image score a setting: it was the maximum
    save_checkpoint(tmp_path / "old.pt", data)
    old = pedenet.load(tmp_path / "old.pt")
    assert old.config.feature_blocks == (4, 10) != PEDENetConfig().feature_blocks
    assert old.config.image_score_fraction == 0 != PEDENetConfig().image_score_fraction
    np.testing.assert_array_equal(old.anomaly_map(images[0]), model.anomaly_map(images[0]))
    pred = old.predict(images)
    assert pred.scores.tolist() == [float(m.max()) for m in pred.maps]
