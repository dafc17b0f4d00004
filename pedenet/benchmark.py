"""``pedenet benchmark``: speed and memory figures of this machine (see docs/benchmarks.md).

Sections (each also written to the JSON file):

* ``inference``: single-image latency (p50/p95 of ``PEDENet.anomaly_map`` on an in-memory
  array, preprocessing and map included, after 3 s of warm-up calls: the steady state) and
  batched throughput (``PEDENet.predict``,
  batch 16) at 256×256 (the model's ``image_size``) and at native MTD-like sizes
  (103×300, 400×632), processed at that size (``image_size`` 0) whatever the model's
  ``image_size`` (a model fitted at 256 resizes them in ``predict``: its cost is the 256 row);
* ``exported`` (not with ``--quick``; not for a model scored by distance, which export does
  not support): latency of the exported model (``pedenet export``) on one image in
  onnxruntime and as TorchScript;
* ``scratch_patch_vs_dense`` (and ``scratch_patch_vs_dense_64``): the scratch encoder (32 px
  patches, stride 4; 64 px, stride 8) applied to every patch of a 256×256 image cut out with
  ``unfold`` (in batches of 512 patches) versus one dense pass over the image (the same
  embeddings, checked), with the work of each (``work_ratio``: the speed-up at equal
  GFLOP/s) and the GFLOP/s each achieves;
* ``scoring``: the energy under the K-component Gaussian mixture (``score_energy``, the
  inference path: mixed precision where the mixture's check allows) versus exact nearest-neighbour
  distance to a memory bank of all training embeddings (PatchCore/SPADE style,
  :func:`pedenet.memory_bank.nearest_distance`, the scorer of ``scoring="distance"``) and to
  a 10% random coreset, per test image (1024 embeddings,
  D = the default embedding_dim; synthetic Gaussian embeddings) for 100 / 1000 / 10 000 training images;
  the mixture is estimated from each bank (``mixture_from_bank``);
* ``scoring_flatness``: the GMM scoring time of those mixtures, timed in interleaved rounds
  (medians), and the ratio of 10 000 to 100 training images;
* ``training``: optimizer steps per second of ``PEDENet.fit``;
* ``flops``: multiply-accumulates of the encoder's convolutions and linear layers counted with
  forward hooks on a 256×256 image (through the encoder's reference modules: the folded
  inference path calls no ``nn.Conv2d``), the energy's analytic count, and the achieved
  GFLOP/s against the GFLOP/s of a large 3×3 convolution measured in the same run (the
  ceiling), for: the PyTorch encoder (folded backbone, the default, and the reference
  modules it replaces), the exported model in onnxruntime (mixture models; ``pedenet export`` ONNX file,
  image → map, the same FLOPs per image as PyTorch end to end; batch 1 and the batch
  ``predict`` uses), and PyTorch end to end (``predict`` throughput).

Peak RSS per section: the process's resident-set high-water mark (``VmHWM``), reset before
each section through ``/proc/self/clear_refs`` where Linux allows it, else
``resource.getrusage`` (then it is the process peak so far); the reset also resets
``getrusage``'s ``ru_maxrss`` (and what ``/usr/bin/time`` reports), so the process peak is
given as the largest section peak. Without RUN_DIR the model is an
untrained default (``PEDENet(steps=0)``: pretrained encoder, PCA reduction, EM mixture) fitted
on 8 built-in texture images; speed does not depend on training.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import platform
import resource
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import __version__
from .config import PEDENetConfig
from .memory_bank import nearest_distance

NATIVE_SIZES = ((103, 300), (400, 632))
SCORING_TRAIN_IMAGES = (100, 1000, 10_000)
SCRATCH_PATCH_SIZES = (32, 64)  # both patch sizes the scratch encoder supports
EMBEDDINGS_PER_IMAGE = 1024
EMBEDDING_DIM = PEDENetConfig().embedding_dim  # the default D (128)


# --------------------------------------------------------------------------- measuring


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Resident-set high-water mark of this process in MiB (since the last reset)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if platform.system() == "Darwin" else rss / 1024.0


class _Section:
    """Context manager: resets the RSS peak on entry, records it (MiB) on exit."""

    def __init__(self, out: dict):
        self.out = out

    def __enter__(self):
        self.out["peak_rss_resettable"] = _reset_peak()
        self.t0 = time.perf_counter()
        return self.out

    def __exit__(self, *exc):
        self.out["peak_rss_mb"] = round(peak_rss_mb(), 1)
        self.out["section_seconds"] = round(time.perf_counter() - self.t0, 2)
        return False


def _times(fn: Callable[[], object], repeats: int, warmup: int = 1) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return np.asarray(out)


def _warm_up(fn: Callable[[], object], seconds: float, min_calls: int = 1) -> int:
    """Call ``fn`` for at least ``seconds`` (and ``min_calls`` times); return the number of calls.

    The first calls after a model is built run slower (page faults on fresh memory, kernels'
    first use): in one quiet measurement the untrained default's first 30 256×256 calls
    had p50 74 ms and the next 50 p50 55 ms."""
    t0, n = time.perf_counter(), 0
    while n < min_calls or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n


def _best(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    return float(_times(fn, repeats, warmup=warmup).min())


def count_macs(module: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every Conv2d and Linear in ``module`` for input ``x`` (hooks)."""
    total = 0

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        with torch.inference_mode():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return total


def conv_ceiling_gflops(quick: bool) -> dict:
    """GFLOP/s of a large 3×3 convolution (256→256 channels on 64×64, batch 1)."""
    conv = nn.Conv2d(256, 256, 3, padding=1).eval()
    x = torch.rand(1, 256, 64, 64)
    flops = 2 * 64 * 64 * 256 * 256 * 9
    with torch.inference_mode():
        t = _best(lambda: conv(x), repeats=2 if quick else 5)
    return {"shape": "conv 3x3, 256->256 channels, 1x256x64x64, float32", "gflop": flops / 1e9,
            "seconds": t, "gflops": flops / t / 1e9}


# --------------------------------------------------------------------------- model


@contextlib.contextmanager
def _quiet_calibration():
    """Hide the warning that the 2 held-out images of the benchmark's 8-image models cannot
    reach the default false-alarm rate: it is about those toy models, not the user's."""
    from .calibration import CalibrationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        yield


def default_model(progress: bool = False):
    """An untrained default PEDENet (steps 0) fitted on 8 built-in grass images (160 px).

    ``de_init="random"``: the EM initialization of the membership network (scikit-learn EM
    on 100 000 embeddings, ~30-90 s on 2 cores) is skipped; it changes no speed figure."""
    from .builtin import make_builtin_dataset
    from .estimator import PEDENet

    with tempfile.TemporaryDirectory(prefix="pedenet-bench-") as tmp:
        root = make_builtin_dataset(Path(tmp) / "ds", categories=("grass",), n_train=8,
                                    n_test_good=1, n_test_defect=1, size=160)
        images = sorted((root / "grass" / "train" / "good").glob("*.png"))
        with _quiet_calibration():
            return PEDENet(steps=0, de_init="random").fit(images, progress=progress)


def _with_image_size(model, image_size: int):
    """A shallow copy of ``model`` whose config says ``image_size`` (same network)."""
    other = copy.copy(model)
    other.config = dataclasses.replace(model.config, image_size=image_size)
    return other


# --------------------------------------------------------------------------- sections


def bench_inference(model, size: tuple[int, int], image_size: int, quick: bool,
                    batch_size: int = 16) -> dict:
    m = model if model.config.image_size == image_size else _with_image_size(model, image_size)
    rng = np.random.default_rng(0)
    n_lat = 3 if quick else 30
    n_thr = batch_size if quick else 4 * batch_size
    if size[0] * size[1] > 200_000:  # large native images: fewer repeats
        n_lat = 2 if quick else 12
        n_thr = batch_size // 4 if quick else 2 * batch_size
    images = [rng.random((*size, 3), dtype=np.float32) for _ in range(min(n_thr, 8))]
    from .inference import BATCH_PIXELS

    effective = max(1, min(batch_size, BATCH_PIXELS["cpu"] // (size[0] * size[1])))
    out = {"input_size": list(size), "image_size": image_size, "batch_size": batch_size,
           "effective_batch": effective}
    with _Section(out):
        out["latency_warmup_calls"] = _warm_up(lambda: m.anomaly_map(images[0]), 0.2 if quick else 3.0)
        lat = _times(lambda: m.anomaly_map(images[0]), n_lat, warmup=0)
        batch = [images[i % len(images)] for i in range(n_thr)]
        if not quick:
            m.predict(batch[:batch_size], batch_size=batch_size)  # warm-up
        t0 = time.perf_counter()
        m.predict(batch, batch_size=batch_size)
        t = time.perf_counter() - t0
    out.update({
        "latency_ms_p50": float(np.percentile(lat, 50) * 1e3),
        "latency_ms_p95": float(np.percentile(lat, 95) * 1e3),
        "latency_repeats": int(n_lat),
        "images_per_s": n_thr / t,
        "throughput_images": int(n_thr),
    })
    return out


def bench_scratch_patchwise(quick: bool, size: int = 256, chunk: int = 512,
                            patch_size: int = 32) -> dict:
    """The scratch encoder on a ``size``×``size`` image: one dense pass against every patch
    cut out with ``unfold`` and encoded in batches of ``chunk`` (the Patch SVDD way).

    Besides the times (best of N, milliseconds) it counts the work of each (multiply-
    accumulates of the convolutions, :func:`count_macs`): ``work_ratio`` is the speed-up the
    dense pass would have at equal GFLOP/s, so ``ratio_patchwise_over_dense`` = work ratio ×
    (dense GFLOP/s / patch-by-patch GFLOP/s). The work ratio is fixed by the architecture
    (10.5× for 32 px patches at stride 4 on 256×256: neighbouring patches share most of
    their early layers; 17.9× for 64 px at stride 8)."""
    from .encoders import ScratchEncoder

    torch.manual_seed(0)
    enc = ScratchEncoder(EMBEDDING_DIM, patch_size).eval()
    p, s = enc.patch_size, enc.stride
    x = torch.rand(1, 3, size, size)

    def dense():
        return enc(x)

    def patchwise():
        patches = torch.nn.functional.unfold(x, kernel_size=p, stride=s)  # 1×(3·p·p)×L
        patches = patches[0].T.reshape(-1, 3, p, p)
        return torch.cat([enc(patches[i:i + chunk]) for i in range(0, len(patches), chunk)])

    out = {"image": [size, size], "patch_size": p, "stride": s, "patch_batch": chunk}
    with _Section(out), torch.inference_mode():
        d = dense()
        pw = patchwise()
        n = d.shape[-2] * d.shape[-1]
        diff = (pw.reshape(d.shape[-2], d.shape[-1], -1).permute(2, 0, 1) - d[0]).abs().max().item()
        t_dense = _best(dense, 3 if quick else 10, warmup=0)
        t_patch = _best(patchwise, 1 if quick else 3, warmup=0)
    dense_gflop = 2 * count_macs(enc, x) / 1e9
    patch_gflop = 2 * count_macs(enc, torch.rand(1, 3, p, p)) * n / 1e9
    out.update({"n_patches": int(n), "dense_ms": t_dense * 1e3, "patchwise_ms": t_patch * 1e3,
                "ratio_patchwise_over_dense": t_patch / t_dense, "max_abs_difference": diff,
                "dense_gflop": dense_gflop, "patchwise_gflop": patch_gflop,
                "work_ratio": patch_gflop / dense_gflop,
                "dense_gflops_achieved": dense_gflop / t_dense,
                "patchwise_gflops_achieved": patch_gflop / t_patch})
    return out


def mixture_from_bank(bank: torch.Tensor, means: torch.Tensor, ridge: float = 1e-3,
                      chunk: int = 1 << 20):
    """A mixture estimated from a memory bank: each row joins its nearest mean (hard memberships).

    Args:
        bank: N×D float32 embeddings. means: K×D component means to assign the rows to.
    Returns:
        a :class:`pedenet.gmm.GaussianMixture` of K components (weights, means and
        covariances of the rows of each component, sums in float64).
    """
    from .gmm import GMMAccumulator

    m = means.float()
    m_sq = m.square().sum(1)
    acc = GMMAccumulator(*m.shape)
    for i in range(0, len(bank), chunk):
        x = bank[i:i + chunk]
        acc.add_hard(x, torch.addmm(m_sq[None], x, m.T, alpha=-2.0).argmin(1))
    return acc.finalize(ridge)


def bench_flatness(mixtures: dict, quick: bool) -> dict:
    """Scoring time per image against training-set size, measured interleaved.

    ``mixtures`` maps a number of training images to the mixture estimated from their
    embeddings (:func:`mixture_from_bank`). Each round times every mixture once (best of 3,
    in an order that alternates between rounds), so that a slow minute of a shared machine
    hits every size alike; the figures are the medians over the rounds.
    """
    g = torch.Generator().manual_seed(2)
    query = torch.randn(EMBEDDINGS_PER_IMAGE, EMBEDDING_DIM, generator=g)
    sizes = sorted(mixtures)
    rounds = 3 if quick else 15
    times: dict[int, list[float]] = {n: [] for n in sizes}
    with torch.inference_mode():
        for n in sizes:
            mixtures[n].score_energy(query)  # warm-up
        for r in range(rounds):
            for n in (sizes if r % 2 == 0 else sizes[::-1]):
                times[n].append(_best(lambda: mixtures[n].score_energy(query), 3, warmup=0))
    med = {n: float(np.median(t)) for n, t in times.items()}
    per_round = [times[sizes[-1]][r] / times[sizes[0]][r] for r in range(rounds)]
    return {"rounds": rounds, "n_train_images": sizes,
            "gmm_ms_per_image_median": [med[n] * 1e3 for n in sizes],
            "ratio_largest_over_smallest": med[sizes[-1]] / med[sizes[0]],
            "ratio_per_round_median": float(np.median(per_round))}


def bench_scoring(model, n_train_images: int, quick: bool):
    """GMM energy against nearest-neighbour distance for ``n_train_images`` training images.

    Returns (figures, the mixture estimated from the synthetic bank by
    :func:`mixture_from_bank` around the model's means: what :func:`bench_flatness` times).
    """
    from .gmm import GaussianMixture

    mix = model.network.mixture if model is not None else None
    d = EMBEDDING_DIM
    if mix is None or mix.mu.shape[1] != d:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(10, d, d, generator=g, dtype=torch.float64) / d ** 0.5
        mix = GaussianMixture(torch.full((10,), 0.1, dtype=torch.float64),
                              torch.randn(10, d, generator=g, dtype=torch.float64), a @ a.transpose(1, 2))
    k = mix.mu.shape[0]
    g = torch.Generator().manual_seed(1)
    query = torch.randn(EMBEDDINGS_PER_IMAGE, d, generator=g)
    n_bank = n_train_images * EMBEDDINGS_PER_IMAGE
    out = {"n_train_images": n_train_images, "bank_size": n_bank, "embedding_dim": d,
           "query_embeddings": EMBEDDINGS_PER_IMAGE, "n_components": int(k)}
    with _Section(out), torch.inference_mode():
        bank = torch.randn(n_bank, d, generator=g)
        coreset = bank[torch.randperm(n_bank, generator=g)[: max(1, n_bank // 10)]]
        # squared norms without a bank-sized temporary
        bank_sq = torch.linalg.vector_norm(bank, dim=1).square_()
        core_sq = torch.linalg.vector_norm(coreset, dim=1).square_()
        # one timed run (after a small warm-up) for the large banks: they take seconds
        reps = 3 if (not quick and n_train_images <= 100) else 1
        fitted = mixture_from_bank(bank, mix.mu)
        nearest_distance(query, bank[:16384], bank_sq[:16384])
        t_gmm = _best(lambda: fitted.score_energy(query), 3 if quick else 10)
        t_nn = _best(lambda: nearest_distance(query, bank, bank_sq), reps, warmup=0)
        t_core = _best(lambda: nearest_distance(query, coreset, core_sq), reps, warmup=0)
    out.update({
        "gmm_ms_per_image": t_gmm * 1e3,
        "nn_ms_per_image": t_nn * 1e3,
        "nn_coreset10_ms_per_image": t_core * 1e3,
        "ratio_nn_over_gmm": t_nn / t_gmm,
        "ratio_coreset10_over_gmm": t_core / t_gmm,
        "bank_mb": n_bank * d * 4 / 2 ** 20,
        "coreset10_mb": len(coreset) * d * 4 / 2 ** 20,
        "gmm_parameters_kb": (k * d * d + k * d + k) * 8 / 1024,
    })
    del bank, coreset, bank_sq, core_sq
    return out, fitted


def bench_training(quick: bool) -> dict:
    from .builtin import make_builtin_dataset
    from .estimator import PEDENet

    steps = 5 if quick else 50
    out = {"steps": steps, "batch_size": 8, "encoder": "pretrained", "image_size": 256,
           "train_images": 8, "timed": "the optimizer steps of PEDENet.fit (history "
           "timings.train_seconds); feature caching and the mixture fit excluded"}
    with tempfile.TemporaryDirectory(prefix="pedenet-bench-") as tmp:
        root = make_builtin_dataset(Path(tmp) / "ds", categories=("grass",), n_train=8,
                                    n_test_good=1, n_test_defect=1, size=160)
        images = sorted((root / "grass" / "train" / "good").glob("*.png"))
        with _Section(out), _quiet_calibration():
            model = PEDENet(steps=steps, batch_size=8, de_init="random").fit(images, progress=False)
    secs = float(model.history.get("timings", {}).get("train_seconds", float("nan")))
    out.update({"train_seconds": secs, "steps_per_s": steps / secs})
    return out


@contextlib.contextmanager
def reference_encoder(encoder: nn.Module):
    """Run ``encoder`` through its reference modules inside the block (the pretrained
    encoder's folded backbone calls no ``nn.Conv2d``, so forward hooks would miss it); a no-op
    for encoders without a folded path."""
    if not hasattr(encoder, "use_folded_backbone"):
        yield encoder
        return
    own = "use_folded_backbone" in vars(encoder)
    old = encoder.use_folded_backbone
    encoder.use_folded_backbone = False
    try:
        yield encoder
    finally:
        if own:
            encoder.use_folded_backbone = old
        else:
            del encoder.use_folded_backbone


def _exportable(model) -> bool:
    from .export import check_exportable

    try:
        check_exportable(model)
    except ValueError:
        return False
    return True


def _onnxruntime_seconds(model, size: int, batches: tuple[int, ...], quick: bool) -> dict | None:
    """Best seconds per image of the exported ONNX model (image → map) in onnxruntime, CPU
    provider with torch's thread count, for each batch size; None without onnxruntime/onnx,
    or for a model scored by distance (which export does not support)."""
    if not _exportable(model):
        return None
    try:
        import onnx  # noqa: F401 - needed by the export
        import onnxruntime as ort
    except ImportError:
        return None
    from .export import export_model

    with tempfile.TemporaryDirectory(prefix="pedenet-bench-") as tmp:
        path = export_model(model, Path(tmp) / "m.onnx", "onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = {}
    rng = np.random.default_rng(0)
    for b in batches:
        feed = {"image": rng.random((b, 3, size, size), dtype=np.float32)}
        out[b] = _best(lambda: sess.run(None, feed), 1 if quick else 5, warmup=1 if quick else 2) / b
    return out


def bench_flops(model, inference_256: dict | None, quick: bool) -> dict:
    net = model.network
    size = int(model.config.image_size) or 256
    x = torch.rand(1, 3, size, size)
    with reference_encoder(net.encoder):
        enc_macs = count_macs(net.encoder, x)
    with torch.inference_mode():
        emb = net.embed(x)
    n_cells = emb.shape[-2] * emb.shape[-1]
    k, d = net.mixture.mu.shape
    # per cell and component: z − μ (D), triangular solve (D(D+1)/2), squared norm (D)
    energy_macs = n_cells * k * (d * (d + 1) // 2 + 2 * d)
    out = {"image": [size, size], "encoder_gflop": 2 * enc_macs / 1e9,
           "energy_gflop": 2 * energy_macs / 1e9, "counted": "2 x multiply-accumulates of "
           "Conv2d/Linear layers (forward hooks) + analytic energy; activations, batch norm, "
           "pooling, interpolation and map smoothing not counted"}
    from .inference import BATCH_PIXELS

    nb = max(1, min(16, BATCH_PIXELS["cpu"] // (size * size)))  # the batch predict uses
    batch = x.repeat(nb, 1, 1, 1)
    reps, warm = (1, 1) if quick else (5, 2)
    with torch.inference_mode():
        t_enc = _best(lambda: net.encoder(batch), reps, warmup=warm) / nb
        with reference_encoder(net.encoder):
            t_ref = _best(lambda: net.encoder(batch), reps, warmup=warm) / nb
    ceiling = conv_ceiling_gflops(quick)
    total = out["encoder_gflop"] + out["energy_gflop"]
    out.update({
        "gflop_per_image": total,
        "encoder_batch": nb,
        "encoder_path": "folded backbone" if hasattr(net.encoder, "use_folded_backbone") else "modules",
        "encoder_ms_per_image": t_enc * 1e3,
        "encoder_gflops_achieved": out["encoder_gflop"] / t_enc,
        "ceiling": ceiling,
        "encoder_fraction_of_ceiling": out["encoder_gflop"] / t_enc / ceiling["gflops"],
        "encoder_reference_ms_per_image": t_ref * 1e3,
        "encoder_reference_gflops_achieved": out["encoder_gflop"] / t_ref,
        "encoder_reference_fraction_of_ceiling": out["encoder_gflop"] / t_ref / ceiling["gflops"],
    })
    ort_s = _onnxruntime_seconds(model, size, tuple(sorted({1, nb})), quick)
    if ort_s is not None:
        out["onnxruntime"] = {
            "what": "exported ONNX model (image -> map), CPU provider, torch's thread count; "
                    "GFLOP per image as end to end (encoder + energy)",
            "threads": torch.get_num_threads(),
            "batches": {str(b): {"ms_per_image": t * 1e3, "gflops_achieved": total / t,
                                 "fraction_of_ceiling": total / t / ceiling["gflops"]}
                        for b, t in ort_s.items()},
        }
    if inference_256:
        achieved = total * inference_256["images_per_s"]
        out["end_to_end_gflops_achieved"] = achieved
        out["end_to_end_fraction_of_ceiling"] = achieved / ceiling["gflops"]
    return out


def bench_exported(model, quick: bool) -> dict:
    """Latency of the exported model (ONNX in onnxruntime; TorchScript) on one image."""
    from .export import example_input, export_model

    x = example_input(model)
    n = 3 if quick else 20
    out: dict = {"input": list(x.shape)}
    with _Section(out), tempfile.TemporaryDirectory(prefix="pedenet-bench-") as tmp:
        try:
            import onnxruntime as ort

            path = export_model(model, Path(tmp) / "m.onnx", "onnx")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feed = {"image": x.numpy()}
            lat = _times(lambda: sess.run(None, feed), n, warmup=2)
            out["onnxruntime_ms_p50"] = float(np.percentile(lat, 50) * 1e3)
            out["onnxruntime_ms_p95"] = float(np.percentile(lat, 95) * 1e3)
            out["onnxruntime"] = ort.__version__
        except ImportError:
            out["onnxruntime"] = None
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = export_model(model, Path(tmp) / "m.ts", "torchscript")
            ts = torch.jit.load(str(path))
        with torch.inference_mode():
            lat = _times(lambda: ts(x), n, warmup=2)
        out["torchscript_ms_p50"] = float(np.percentile(lat, 50) * 1e3)
        out["torchscript_ms_p95"] = float(np.percentile(lat, 95) * 1e3)
    return out


# --------------------------------------------------------------------------- driver


def _machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "pedenet": __version__, "platform": platform.platform(), "load_average_at_start": load}


def run_benchmark(run_dir: str | os.PathLike | None = None, quick: bool = False,
                  log: Callable[[str], None] = print, device: str = "cpu") -> dict:
    """Run every section; return the figures (see the module docstring)."""
    from .estimator import PEDENet

    t_start = time.perf_counter()
    result: dict = {"quick": bool(quick), "machine": _machine()}
    log(f"machine: {result['machine']['cpu']} ({result['machine']['logical_cpus']} logical CPUs, "
        f"{result['machine']['torch_threads']} torch threads), load average "
        f"{result['machine']['load_average_at_start']}")
    if run_dir is not None:
        path = Path(run_dir)
        model = PEDENet.load(path / "model.pt" if path.is_dir() else path, device=device)
        source = str(path)
    else:
        model = default_model()
        source = "untrained default: PEDENet(steps=0, de_init='random') on 8 built-in grass images"
    result["model"] = {"source": source, "encoder": model.config.encoder,
                       "image_size": model.config.image_size,
                       "embedding_dim": model.config.embedding_dim,
                       "n_components": model.config.n_components}
    log(f"model: {source} (encoder {model.config.encoder}, image_size {model.config.image_size})")

    inference = []
    main_size = int(model.config.image_size) or 256
    for size, image_size in [((main_size, main_size), model.config.image_size)] + \
            [(s, 0) for s in NATIVE_SIZES]:
        r = bench_inference(model, size, image_size, quick)
        inference.append(r)
        how = "processed at native size" if image_size == 0 else f"resized to {image_size}x{image_size}"
        log(f"inference {size[0]}x{size[1]} ({how}): "
            f"p50 {r['latency_ms_p50']:.1f} ms, p95 {r['latency_ms_p95']:.1f} ms, "
            f"{r['images_per_s']:.1f} images/s (predict, batches of {r['effective_batch']}), "
            f"peak RSS {r['peak_rss_mb']:.0f} MiB")
    result["inference"] = inference

    if not quick and not _exportable(model):
        log("exported model: skipped (the model scores by distance to a memory bank, which "
            "export does not support)")
    elif not quick:
        r = bench_exported(model, quick)
        result["exported"] = r
        log(f"exported model, {r['input'][2]}x{r['input'][3]}: onnxruntime p50 "
            f"{r.get('onnxruntime_ms_p50', float('nan')):.1f} ms, TorchScript p50 "
            f"{r['torchscript_ms_p50']:.1f} ms")

    for p in SCRATCH_PATCH_SIZES:
        r = bench_scratch_patchwise(quick, patch_size=p)
        result["scratch_patch_vs_dense" + ("" if p == 32 else f"_{p}")] = r
        log(f"scratch encoder, {p} px patches, on {r['image'][0]}x{r['image'][1]}: dense "
            f"{r['dense_ms']:.1f} ms, {r['n_patches']} patches one by one (unfold, batches of "
            f"{r['patch_batch']}) {r['patchwise_ms']:.0f} ms, ratio {r['ratio_patchwise_over_dense']:.1f}x "
            f"(work ratio {r['work_ratio']:.1f}x; {r['dense_gflops_achieved']:.1f} against "
            f"{r['patchwise_gflops_achieved']:.1f} GFLOP/s; max |difference| {r['max_abs_difference']:.1e})")

    scoring, mixtures = [], {}
    for n in (SCORING_TRAIN_IMAGES[:2] if quick else SCORING_TRAIN_IMAGES):
        r, mixtures[n] = bench_scoring(model, n, quick)
        scoring.append(r)
        log(f"scoring, {n} training images ({r['bank_size']} embeddings, {r['bank_mb']:.0f} MiB bank): "
            f"GMM {r['gmm_ms_per_image']:.2f} ms/image, exact NN {r['nn_ms_per_image']:.0f} ms "
            f"({r['ratio_nn_over_gmm']:.0f}x), 10% coreset {r['nn_coreset10_ms_per_image']:.0f} ms "
            f"({r['ratio_coreset10_over_gmm']:.0f}x), peak RSS {r['peak_rss_mb']:.0f} MiB")
    result["scoring"] = scoring
    r = bench_flatness(mixtures, quick)
    result["scoring_flatness"] = r
    log(f"scoring time against training-set size ({r['rounds']} interleaved rounds, medians): "
        + ", ".join(f"{n} images {t:.2f} ms"
                    for n, t in zip(r["n_train_images"], r["gmm_ms_per_image_median"]))
        + f"; ratio {r['ratio_largest_over_smallest']:.3f} "
          f"(per-round median {r['ratio_per_round_median']:.3f})")

    r = bench_training(quick)
    result["training"] = r
    log(f"training: {r['steps_per_s']:.2f} optimizer steps/s (batch {r['batch_size']}, "
        f"{r['image_size']} px, {r['encoder']}), peak RSS {r['peak_rss_mb']:.0f} MiB")

    r = bench_flops(model, inference[0], quick)
    result["flops"] = r
    c = r["ceiling"]["gflops"]
    log(f"FLOPs per {r['image'][0]}x{r['image'][1]} image: {r['gflop_per_image']:.3f} GFLOP "
        f"(encoder {r['encoder_gflop']:.3f}, energy {r['energy_gflop']:.4f}); ceiling (large conv) "
        f"{c:.1f} GFLOP/s")
    log(f"  PyTorch encoder ({r['encoder_path']}, batch {r['encoder_batch']}): "
        f"{r['encoder_gflops_achieved']:.1f} GFLOP/s ({r['encoder_fraction_of_ceiling']:.1%} of the "
        f"ceiling; reference modules {r['encoder_reference_gflops_achieved']:.1f} GFLOP/s, "
        f"{r['encoder_reference_fraction_of_ceiling']:.1%})")
    for b, o in r.get("onnxruntime", {}).get("batches", {}).items():
        log(f"  onnxruntime, exported model (image -> map), batch {b}: {o['ms_per_image']:.1f} ms/image, "
            f"{o['gflops_achieved']:.1f} GFLOP/s ({o['fraction_of_ceiling']:.1%})")
    log(f"  PyTorch end to end (predict): {r.get('end_to_end_gflops_achieved', float('nan')):.1f} GFLOP/s "
        f"({r.get('end_to_end_fraction_of_ceiling', float('nan')):.1%})")
    # the largest section peak (ru_maxrss cannot serve: resetting VmHWM resets it as well)
    peaks = [r["peak_rss_mb"] for key in ("inference", "scoring") for r in result[key]]
    peaks += [result[key]["peak_rss_mb"] for key in ("exported", "scratch_patch_vs_dense",
                                                    "scratch_patch_vs_dense_64", "training")
              if key in result]
    result["peak_rss_mb_process"] = max(peaks + [round(peak_rss_mb(), 1)])
    result["seconds_total"] = time.perf_counter() - t_start
    log(f"total {result['seconds_total']:.0f} s")
    return result
