"""Export a fitted model as one self-contained network: image tensor → anomaly map and score.

:class:`AnomalyMapModule` holds the encoder, the fixed mixture (inverse Cholesky factors and
log-normalizers as buffers) and the map post-processing of :func:`pedenet.scoring.grid_to_map`,
as plain tensor operations that ONNX and TorchScript can record:

input ``image``: float32 B×3×H×W, RGB, values in [0, 1] (no mean/std normalization: the
model does its own). H = W = ``image_size`` when the model resizes (``image_size`` > 0; resize
with :func:`pedenet.scoring.to_tensor` — bilinear, antialiased — to get pedenet's own
results); any H, W ≥ the encoder's minimum (the patch size, 32 px) when ``image_size`` = 0;
with ``keep_aspect`` the shorter side = ``image_size`` and the longer one follows the aspect
ratio (:func:`pedenet.scoring.processed_size`).

outputs: ``anomaly_map`` float32 B×H×W (energy, −log density; higher = more anomalous) at the
input's resolution, and ``score`` float32 B (the image score of
:func:`pedenet.scoring.image_score`: the mean of the map's largest ``image_score_fraction``
of pixels, a top-k whose k = round(f·H·W) is computed from the input's shape inside the
graph, so it stays exact for any input size; or the map's maximum when the fraction is 0;
with ``image_score_border`` b > 0, the pixels within floor(b·H) rows / floor(b·W) columns
of the edge are left out of the score, also sized inside the graph).

Steps (identical to ``PEDENet.anomaly_map`` for an input already at the processed size):
patch embeddings → energy E(z) = −logsumexp_k(log φ_k − ½ log|Σ_k| − D/2 log 2π −
½‖L_k⁻¹(z − μ_k)‖²) in the precision the model scores with (default "auto": the products
in float32 and the log-sum-exp in float64 where the mixture's check allows it,
:meth:`pedenet.gmm.GaussianMixture.score_energy`; else float64) → bilinear interpolation from the patch centres
(offset + stride·i), clamped at the borders → separable Gaussian smoothing with σ =
``smoothing_sigma`` px, radius int(4σ + 0.5), replicated borders (scipy's mode="nearest").

``pedenet export RUN_DIR --format onnx|torchscript --out FILE`` writes it (:func:`export_model`).
ONNX: opset 17, the TorchScript-based exporter (``dynamo=False``: needs no onnxscript); the
batch axis is dynamic, and so are H and W when ``image_size`` = 0 or ``keep_aspect``. Model facts (image size,
σ, stride, normal-score quantiles, calibrated thresholds, pedenet version) are stored as metadata (ONNX
``metadata_props`` / TorchScript extra file ``pedenet.json``). TorchScript is a traced module
(``torch.jit.trace``; sizes stay dynamic, tested); torch 2.13 marks ``torch.jit`` as deprecated,
so prefer ONNX for new deployments (it is also the fastest CPU path, docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .scoring import gaussian_kernel
from .visualization import color_range

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17


class AnomalyMapModule(nn.Module):
    """A fitted PEDENet network as image → (anomaly map, score); see the module docstring.

    Args:
        network: a fitted :class:`pedenet.model.PEDENetNetwork` (mixture set; its memory bank,
            if any, is not exported: :func:`export_model` refuses such models).
        smoothing_sigma: σ of the map smoothing in pixels (the config's ``smoothing_sigma``).
        energy_dtype: precision of the energy: ``"auto"`` (default) as ``PEDENet.anomaly_map``
            scores: mixed (Mahalanobis products in float32, normalizers and log-sum-exp in
            float64) when the mixture's ``scoring_dtype`` is float32, else float64;
            ``torch.float64``; or ``torch.float32`` throughout (the energy of an anomalous
            patch can reach 10⁴–10⁶ and float32 then loses small differences between normal
            patches). The encoder always runs in float32.
        score_fraction: the config's ``image_score_fraction`` (0: score = map maximum).
        score_border: the config's ``image_score_border`` (0: every pixel is scored).
    """

    def __init__(self, network, smoothing_sigma: float, energy_dtype: torch.dtype | str = "auto",
                 score_fraction: float = 0.0, score_border: float = 0.0):
        super().__init__()
        self.score_fraction = float(score_fraction)
        self.score_border = float(score_border)
        if network.mixture is None:
            raise ValueError("the network has no fitted mixture: fit or load a model first")
        self.encoder = copy.deepcopy(network.encoder).cpu().eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        mix = network.mixture
        if energy_dtype == "auto":
            product_dtype, sum_dtype = mix.scoring_dtype, torch.float64
        elif energy_dtype in (torch.float32, torch.float64):
            product_dtype = sum_dtype = energy_dtype
        else:
            raise ValueError(f"energy_dtype must be 'auto', torch.float32 or torch.float64, not {energy_dtype!r}")
        chol_inv = mix.chol_inv.detach().cpu().double()  # K×D×D, L⁻¹ (precomputed by the mixture)
        self.register_buffer("mu", mix.mu.detach().cpu().to(product_dtype))  # K×D
        self.register_buffer("chol_inv_t", chol_inv.transpose(1, 2).contiguous().to(product_dtype))
        self.register_buffer("log_norm", mix.log_norm.detach().cpu().to(sum_dtype))  # K
        self.stride = float(network.stride)
        self.offset = float(network.offset)
        self.sigma = float(smoothing_sigma)
        if self.sigma > 0:
            k = torch.from_numpy(gaussian_kernel(self.sigma)).float()
            self.radius = (len(k) - 1) // 2
            self.register_buffer("kernel_x", k.reshape(1, 1, 1, -1).clone())
            self.register_buffer("kernel_y", k.reshape(1, 1, -1, 1).clone())
        else:
            self.radius = 0

    def energy(self, emb: torch.Tensor) -> torch.Tensor:
        """B×D×h×w embeddings → B×h×w energy (the dtype of ``log_norm``)."""
        z = emb.flatten(2).transpose(1, 2).to(self.mu.dtype)  # B×N×D
        diff = z.unsqueeze(1) - self.mu.unsqueeze(0).unsqueeze(2)  # B×K×N×D
        y = torch.matmul(diff, self.chol_inv_t.unsqueeze(0))  # B×K×N×D: (L⁻¹(z−μ))ᵀ
        maha = (y * y).sum(-1).to(self.log_norm.dtype)  # B×K×N
        log_p = self.log_norm.reshape(1, -1, 1) - 0.5 * maha
        energy = -torch.logsumexp(log_p, dim=1)  # B×N
        return energy.reshape(emb.shape[0], emb.shape[2], emb.shape[3])

    def _axis(self, n_out: torch.Tensor | int, n_grid: torch.Tensor | int, like: torch.Tensor):
        """Indices lo, hi and weight of hi for bilinear interpolation along one axis."""
        centres = torch.arange(n_out, dtype=like.dtype, device=like.device) + 0.5
        hi_clip = (torch.ones((), dtype=like.dtype) * n_grid) - 1.0
        g = torch.minimum(torch.clamp((centres - self.offset) / self.stride, min=0.0), hi_clip)
        lo = torch.floor(g)
        frac = g - lo
        lo_i = lo.to(torch.int64)
        hi_i = torch.minimum(lo_i + 1, hi_clip.to(torch.int64))
        return lo_i, hi_i, frac

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.encoder(image)
        grid = self.energy(emb)  # B×h×w
        h_out, w_out = image.shape[2], image.shape[3]
        lo, hi, f = self._axis(h_out, grid.shape[1], grid)
        rows = grid.index_select(1, lo) * (1.0 - f).reshape(1, -1, 1) + grid.index_select(1, hi) * f.reshape(1, -1, 1)
        lo, hi, f = self._axis(w_out, grid.shape[2], grid)
        amap = rows.index_select(2, lo) * (1.0 - f).reshape(1, 1, -1) + rows.index_select(2, hi) * f.reshape(1, 1, -1)
        amap = amap.to(torch.float32).unsqueeze(1)  # B×1×H×W
        if self.sigma > 0:
            r = self.radius
            amap = F.conv2d(F.pad(amap, (r, r, 0, 0), mode="replicate"), self.kernel_x)
            amap = F.conv2d(F.pad(amap, (0, 0, r, r), mode="replicate"), self.kernel_y)
        amap = amap.squeeze(1)
        return amap, self.score(amap)

    def score(self, amap: torch.Tensor) -> torch.Tensor:
        """B×H×W maps → B image scores (float32), as :func:`pedenet.scoring.image_score`."""
        # sizes are computed from the traced shape, so that they follow the input size after
        # export (a Python int would be frozen at the tracing size)
        if self.score_border > 0:
            # the edge band gets -inf, so that max / top-k see only the inner pixels
            shape = torch._shape_as_tensor(amap)
            h, w = shape[1].to(torch.float64), shape[2].to(torch.float64)
            bh, bw = torch.floor(h * self.score_border), torch.floor(w * self.score_border)
            rows = torch.arange(amap.shape[1], dtype=torch.float64, device=amap.device)
            cols = torch.arange(amap.shape[2], dtype=torch.float64, device=amap.device)
            inner = ((rows >= bh) & (rows < h - bh)).unsqueeze(1) & ((cols >= bw) & (cols < w - bw)).unsqueeze(0)
            amap = amap.masked_fill(~inner.unsqueeze(0), float("-inf"))
            n = (h - 2.0 * bh) * (w - 2.0 * bw)  # pixels scored
        else:
            n = torch._shape_as_tensor(amap.flatten(1))[1].to(torch.float64)
        flat = amap.flatten(1)
        if self.score_fraction <= 0:
            return flat.amax(dim=1)
        k = torch.clamp(torch.round(n * self.score_fraction), min=1.0).to(torch.int64)
        top = torch.topk(flat, k, dim=1).values  # B×k, the largest pixels
        return top.double().mean(1).float()


def _metadata(model) -> dict:
    return {
        "pedenet_version": __version__,
        "image_size": int(model.config.image_size),
        "keep_aspect": bool(model.config.keep_aspect),
        "smoothing_sigma": float(model.config.smoothing_sigma),
        "stride": float(model.network.stride),
        "offset": float(model.network.offset),
        "encoder": model.config.encoder,
        "input": "float32 Bx3xHxW RGB in [0, 1]; H = W = image_size (keep_aspect: the shorter "
                 "side = image_size, aspect kept; any size >= patch_size when image_size is 0); "
                 "no normalization (done inside)",
        "outputs": "anomaly_map float32 BxHxW (energy), score float32 B (mean of the map's largest "
                   "image_score_fraction of pixels; its maximum when 0; pixels within "
                   "floor(image_score_border x side) of the edge left out)",
        "image_score_fraction": float(model.config.image_score_fraction),
        "image_score_border": float(model.config.image_score_border),
        "normal_quantiles": dict(model.normal_quantiles),
        # pedenet's overlay colour scale (energy at the coldest and hottest colour):
        # pedenet.visualization.color_range, from the held-out maps when there are enough
        "color_range": list(color_range(model)),
        # decisions outside Python: flag an image when score > image_threshold, mark pixels
        # with anomaly_map > pixel_threshold in flagged images (None: no calibration)
        "thresholds": model.thresholds(),
    }


def build_module(model, energy_dtype: torch.dtype | str = "auto") -> AnomalyMapModule:
    """The :class:`AnomalyMapModule` of a fitted :class:`pedenet.PEDENet` (CPU, eval mode)."""
    net = model._require_fitted()
    return AnomalyMapModule(net, model.config.smoothing_sigma, energy_dtype,
                            model.config.image_score_fraction,
                            model.config.image_score_border).eval()


def example_input(model) -> torch.Tensor:
    """A 1×3×S×S input of the right size (S = image_size, or 256 when image_size is 0)."""
    size = int(model.config.image_size) or 256
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def check_exportable(model, run: str | os.PathLike = "RUN_DIR") -> None:
    """Raise ValueError, naming ``run`` (the run folder, for the advice) in the message, when
    ``model`` is scored by distance: its memory bank is not part of the exported network."""
    if model.config.scoring != "mixture":
        raise ValueError(f"the model scores patches by {model.config.scoring} to a memory bank "
                         "(fitted with --scoring distance), which export does not support: "
                         f"`pedenet rescore {run} --scoring mixture --out NEW_RUN` makes an "
                         "exportable copy (no training), or score with pedenet predict")


def export_model(model, path: str | os.PathLike, fmt: str = "onnx",
                 energy_dtype: torch.dtype | str = "auto") -> Path:
    """Write ``model`` (a fitted :class:`pedenet.PEDENet`) as an ONNX or TorchScript file.

    Args:
        path: output file (parent folders are created; an existing file is replaced).
        fmt: ``"onnx"`` (run with onnxruntime) or ``"torchscript"`` (``torch.jit.load``).
        energy_dtype: see :class:`AnomalyMapModule`.

    Returns the path. Raises ValueError for an unknown format, a model fitted with scoring
    "distance" (its memory bank is not part of the exported network), or a ``path`` named
    ``model.pt`` or ``resume.pt`` (a run's checkpoint names: the export would replace the
    checkpoint, or be read as one later); IsADirectoryError when ``path`` is a folder.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_exportable(model)
    path = Path(path)
    if path.name.casefold() in ("model.pt", "resume.pt"):
        suffix = ".onnx" if fmt == "onnx" else ".ts"
        raise ValueError(f"{path}: is named as a pedenet checkpoint; export to another name, "
                         f"e.g. {path.with_name('model' + suffix)}")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; give a file name, e.g. "
                                f"{path / ('model.onnx' if fmt == 'onnx' else 'model.ts')}")
    tmp = path.with_name(path.name + ".tmp")
    try:  # fail early, naming the file the user gave (not the temporary one)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb"):
            pass
    except OSError as exc:
        raise OSError(f"{path}: cannot write the exported model there ({exc.strerror or exc}); "
                      "choose another --out") from exc
    module = build_module(model, energy_dtype)
    x = example_input(model)
    meta = _metadata(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and legacy-exporter notices
            if fmt == "torchscript":
                with torch.no_grad():
                    traced = torch.jit.trace(module, (x,), check_trace=False)
                torch.jit.save(traced, str(tmp), _extra_files={"pedenet.json": json.dumps(meta)})
            else:
                dynamic_hw = not model.config.image_size or model.config.keep_aspect
                _export_onnx(module, x, tmp, dynamic_hw=dynamic_hw, meta=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def import_onnx():
    """The ``onnx`` module. Raises ImportError naming the install command when it is missing."""
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("ONNX export needs the onnx package, which is not installed: "
                          "pip install 'pedenet[export]' (onnx and onnxruntime)") from exc
    return onnx


def _export_onnx(module: nn.Module, x: torch.Tensor, path: Path, dynamic_hw: bool, meta: dict) -> None:
    onnx = import_onnx()
    axes = {"image": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}}
    if dynamic_hw:
        axes["image"].update({2: "height", 3: "width"})
        axes["anomaly_map"].update({1: "height", 2: "width"})
    with torch.no_grad():
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=["anomaly_map", "score"],
                          dynamic_axes=axes, do_constant_folding=True)
    proto = onnx.load(str(path))
    # the declared output shapes: with a fixed input size the exporter's shape inference names
    # the map's axes after internal nodes ('batch', 'batch', 'Squeeze...'); state them
    h, w = (("height", "width") if dynamic_hw else (int(x.shape[2]), int(x.shape[3])))
    declared = {"anomaly_map": ("batch", h, w), "score": ("batch",)}
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        for size in declared[output.name]:
            dim = dims.add()
            if isinstance(size, int):
                dim.dim_value = size
            else:
                dim.dim_param = size
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata written by :func:`export_model` (ONNX or TorchScript file)."""
    path = Path(path)
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        out = {}
        for p in proto.metadata_props:
            try:
                out[p.key] = json.loads(p.value)
            except ValueError:
                out[p.key] = p.value
        return out
    except Exception:  # noqa: BLE001 - not an ONNX file: try TorchScript
        extra = {"pedenet.json": ""}
        torch.jit.load(str(path), _extra_files=extra)
        return json.loads(extra["pedenet.json"])

