"""The pretrained encoder's fast inference path and its exact ×2 upsampling of stride-16 features.

* The folded backbone (batch norms folded into the convolutions, channels-last, 1×1
  convolutions as matrix products, even kernels instead of asymmetric padding) and the
  reordered head give the reference modules' results to float32 rounding, at any size.
* The checkpoint format is unchanged (same state-dict keys, strict loading) and the folded
  copy follows the weights it was built from.
* Stride-16 features are upsampled by exactly 2 whatever the image size, so tiles and the
  whole image agree as well at 400×632 (sides not multiples of 16) as at 400×640.
"""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from pedenet.config import PEDENetConfig
from pedenet.encoders import PretrainedEncoder, upsample_to_grid
from pedenet.gmm import GMMAccumulator
from pedenet.model import PEDENetNetwork

# float32 rounding of differently ordered sums; measured ~1e-5 of the features' spread
TOL = 1e-4


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    enc = PretrainedEncoder(16).eval()
    with torch.no_grad():
        enc.feature_mean.normal_()
        enc.feature_std.uniform_(0.5, 2.0)
    return enc


def _both_paths(enc, fn):
    enc.use_folded_backbone = False
    try:
        ref = fn()
    finally:
        del enc.use_folded_backbone  # back to the class default (folded)
    return ref, fn()


@pytest.mark.parametrize("size", [(256, 256), (103, 300), (41, 120), (64, 97)])
def test_folded_path_matches_reference_modules(encoder, size):
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        raw_ref, raw = _both_paths(encoder, lambda: encoder.raw_features(x))
        emb_ref, emb = _both_paths(encoder, lambda: encoder(x))
        emb_split = encoder.head(encoder.frozen_features(x))
    assert raw.shape == raw_ref.shape == (2, 152, size[0] // 8, size[1] // 8)
    assert emb.shape == emb_ref.shape == (2, 16, size[0] // 8, size[1] // 8)
    assert raw.is_contiguous() and emb.is_contiguous()
    assert float((raw - raw_ref).abs().max()) <= TOL * float(raw_ref.std())
    assert float((emb - emb_ref).abs().max()) <= TOL * float(emb_ref.std())
    assert float((emb_split - emb_ref).abs().max()) <= TOL * float(emb_ref.std())


def test_folded_path_outside_inference_mode_and_with_gradients(encoder):
    """The reordered head is differentiable in the projection (training never needs it, but
    ``encoder(x)`` must stay a valid function of the trainable weights)."""
    x = torch.rand(1, 3, 64, 64)
    emb = encoder(x)
    emb.sum().backward()
    assert encoder.proj.weight.grad is not None and encoder.proj.weight.grad.abs().sum() > 0
    encoder.proj.weight.grad = None
    encoder.proj.bias.grad = None
    assert all(p.grad is None for p in encoder.blocks.parameters())


def test_state_dict_unchanged_and_folded_copy_follows_the_weights(encoder):
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        encoder(x)  # builds the folded copy
    fresh = PretrainedEncoder(16, load_weights=False).eval()
    assert list(encoder.state_dict()) == list(fresh.state_dict())
    with torch.no_grad():
        before = fresh(x)  # folded copy of the unloaded weights
        fresh.load_state_dict(encoder.state_dict(), strict=True)
        after = fresh(x)
        assert not torch.allclose(before, after)
        assert torch.allclose(after, encoder(x), rtol=0, atol=1e-6)
        # an in-place change of a backbone buffer is picked up as well
        fresh.blocks[2]._bn1.running_mean.add_(0.5)
        ref, fast = _both_paths(fresh, lambda: fresh.raw_features(x))
    assert float((fast - ref).abs().max()) <= TOL * float(ref.std())
    assert float((fast - encoder.raw_features(x)).abs().max()) > 10 * TOL * float(ref.std())


def test_folded_copy_is_reused_and_follows_device_and_dtype_moves():
    with torch.inference_mode():  # parameters created here are inference tensors (no version)
        enc = PretrainedEncoder(8, load_weights=False).eval()
        first = enc._folded()
        assert enc._folded() is first
    assert enc._folded() is first
    enc.double()
    assert enc._folded() is not first and enc._folded().stem.weight.dtype == torch.float64


def test_copies_and_pickles_leave_the_folded_copy_out(encoder):
    with torch.no_grad():
        encoder(torch.rand(1, 3, 64, 64))
    assert "_folded_cache" in encoder.__dict__
    other = copy.deepcopy(encoder)
    assert "_folded_cache" not in other.__dict__
    buf = io.BytesIO()
    torch.save(encoder, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), encoder(x), rtol=0, atol=1e-6)
        assert torch.allclose(other(x), encoder(x), rtol=0, atol=1e-6)


def test_backbone_stays_in_eval_mode():
    net = PEDENetNetwork(PEDENetConfig(encoder="pretrained", embedding_dim=8, n_components=2),
                         load_weights=False)
    net.train()
    enc = net.encoder
    assert enc.proj.training
    assert not enc.stem.training and not any(m.training for m in enc.blocks.modules())


def test_upsampling_is_exactly_two():
    f16 = torch.randn(2, 5, 6, 7)
    ref = F.interpolate(f16, size=(12, 14), mode="bilinear", align_corners=False)
    assert torch.equal(upsample_to_grid(f16, 2, 12, 14), ref)  # even counts: the former result
    up = upsample_to_grid(f16, 2, 13, 15)  # odd counts: the same values plus a repeated last row/column
    assert up.shape == (2, 5, 13, 15)
    assert torch.equal(up[..., :12, :14], ref)
    assert torch.equal(up[..., 12, :14], ref[..., 11, :]) and torch.equal(up[..., :12, 14], ref[..., :, 13])


def _network(feature_blocks=(4, 10)) -> PEDENetNetwork:
    torch.manual_seed(0)
    net = PEDENetNetwork(PEDENetConfig(encoder="pretrained", embedding_dim=16, n_components=3, image_size=0,
                                       feature_blocks=feature_blocks)).eval()
    with torch.no_grad():
        z = net.embed(torch.rand(1, 3, 96, 96)).permute(0, 2, 3, 1).reshape(-1, 16)
        acc = GMMAccumulator(3, 16)
        acc.add(z, net.membership(z))
    net.mixture = acc.finalize()
    return net


@pytest.mark.parametrize("size", [(400, 640), (400, 632)])
def test_tiled_agrees_with_untiled_also_off_multiples_of_16(size):
    """632 px gives 79 stride-8 and 39 stride-16 cells: interpolating to the stride-8 size
    (factor 79/39) made tiles and the whole image differ by ~6e-2 of the energy's spread;
    with the exact factor 2 they agree to ~1e-4, as at 640 px."""
    net = _network()
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(1, 3, size[0] // 8, size[1] // 8, generator=g), size=size,
                      mode="bilinear").contiguous()
    with torch.no_grad():
        full = net.patch_energy(x)
        tiled = net.patch_energy(x, max_tile=400)
    assert len(net.tile_plan(size[1], 400)) > 1
    assert tiled.shape == full.shape == (1, size[0] // 8, size[1] // 8)
    spread = float(full.max() - full.min())
    assert float((tiled - full).abs().max()) <= 1e-3 * spread


@pytest.mark.parametrize("width", [1408, 1384])
def test_tiled_agrees_with_untiled_with_stride_32_blocks(width):
    """The default blocks 4, 10, 14, 15 reach stride 32: tiles start on multiples of 32 px and
    keep 320 px of context; a width that is not a multiple of 32 (1384 = 43·32 + 8) pads the
    ×4-upsampled stride-32 features by repetition, as the whole image does."""
    net = _network((4, 10, 14, 15))
    g = torch.Generator().manual_seed(1)
    x = F.interpolate(torch.rand(1, 3, 256 // 8, width // 8, generator=g), size=(256, width),
                      mode="bilinear").contiguous()
    with torch.no_grad():
        full = net.patch_energy(x)
        tiled = net.patch_energy(x, max_tile=900)
    assert len(net.tile_plan(width, 900)) > 1
    assert all(a % 32 == 0 for a, _, _, _ in net.tile_plan(width, 900))
    assert tiled.shape == full.shape == (1, 256 // 8, width // 8)
    spread = float(full.max() - full.min())
    assert float((tiled - full).abs().max()) <= 3e-3 * spread  # measured 1.9e-3: the deep blocks' context reaches past 320 px


def test_upsampling_to_grid_is_exactly_four_for_stride_32():
    f32 = torch.randn(1, 3, 4, 5)
    ref = F.interpolate(f32, size=(16, 20), mode="bilinear", align_corners=False)
    assert torch.equal(upsample_to_grid(f32, 4, 16, 20), ref)
    up = upsample_to_grid(f32, 4, 19, 21)  # 3 and 1 missing rows/columns repeat the last one
    assert up.shape == (1, 3, 19, 21) and torch.equal(up[..., :16, :20], ref)
    assert torch.equal(up[..., 18, :20], ref[..., 15, :]) and torch.equal(up[..., :16, 20], ref[..., :, 19])
