"""Training PEDENet on normal images: LP trains the encoder, the energy trains the DE network.

Loss (PEDENet; DAGMM eq. 7 for the first two terms):

    L = λ_DE · mean E(z) + λ_cov · P_cov + λ_LP · CE(LP(z_a, z_b), direction)

By default the embeddings enter the energy *detached*: the energy trains the membership
network (and so the mixture) while LP trains the encoder. The raw DAGMM objective, with the
energy gradient reaching the encoder (``energy_trains_encoder=True``), collapses the
embeddings (shrinking a direction lowers the energy); the effective rank of the embeddings
and the smallest covariance eigenvalue are logged so that collapse is visible.

The frozen part of the encoder is run once per training image and cached (float16), so a
training step only runs the trainable head; dense: a whole (cropped) image per forward pass,
LP pairs and DE samples taken from the dense embedding grid.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import PEDENetConfig
from .encoders import PretrainedEncoder
from .gmm import GaussianMixture, GMMAccumulator, gmm_params
from .model import DIRECTIONS, PEDENetNetwork
from .progress import progress_bar
from .scoring import normal_quantiles, to_tensor

DE_SAMPLES_PER_IMAGE = 256
LOG_EVERY = 25


@dataclass
class TrainingHistory:
    """Diagnostics logged every few steps (lists aligned with ``step``) and timings (seconds)."""

    step: list = field(default_factory=list)
    energy: list = field(default_factory=list)
    cov_penalty: list = field(default_factory=list)
    lp_loss: list = field(default_factory=list)
    lp_accuracy: list = field(default_factory=list)
    effective_rank: list = field(default_factory=list)
    min_cov_eigenvalue: list = field(default_factory=list)
    embedding_variance: list = field(default_factory=list)
    cluster_usage: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class ImagesMismatchError(ValueError):
    """The images given to :meth:`pedenet.PEDENet.rescore` are not those fit was given (count,
    held-out file names, or features' mean). ``problem``: what differs; the message adds the advice
    ``advice`` ("pass the images fit was given, in the same order"), which a caller may replace by its own."""

    advice = "pass the images fit was given, in the same order"

    def __init__(self, problem: str):
        super().__init__(f"{problem}; {self.advice}")
        self.problem = problem


def effective_rank(z: torch.Tensor) -> float:
    """Effective rank exp(H(p)) of N×D embeddings, p = normalized covariance eigenvalues.

    Roy & Vetterli (2007). D for isotropic embeddings, 1.0 for embeddings on a line.
    """
    z = z.detach().double()
    ev = torch.linalg.eigvalsh(torch.cov(z.T)).clamp_min(0)
    p = ev / ev.sum().clamp_min(1e-300)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


STATS_TOLERANCE = 1e-3
"""Largest per-channel difference, in standard deviations, between the recomputed and the
fitted feature mean that :func:`cache_frozen_features` accepts for a trained network
(float rounding across devices and thread counts is far below it; other data far above)."""


def cache_frozen_features(
    network: PEDENetNetwork, loaders: Sequence[Callable[[], np.ndarray]], progress: bool = True,
    fit_stats: bool = True,
) -> list[torch.Tensor]:
    """Run the frozen part of the encoder once per image: list of C×h×w float16 tensors.

    For the pretrained encoder the features are standardized; with ``fit_stats`` (before
    training) this also fits the standardization and initializes the reduction by PCA (both
    from the training features); without it (a trained network) the network's own
    standardization is used and nothing in it changes, and the features' per-channel mean
    (over the positions fit sampled) must equal the one fitted, within
    ``STATS_TOLERANCE`` standard deviations: :class:`ImagesMismatchError` (a ValueError)
    otherwise (other images than the network was trained on).
    """
    enc = network.encoder
    size = network.config.image_size
    device = next(network.parameters()).device
    cache = []
    for load in progress_bar(loaders, desc="encoding training images", unit="img", disable=not progress):
        x = to_tensor(load(), size, network.config.keep_aspect).to(device)
        f = enc.raw_features(x) if isinstance(enc, PretrainedEncoder) else enc.frozen_features(x)
        cache.append(f[0].to("cpu", torch.float16))
    if isinstance(enc, PretrainedEncoder):
        gen = torch.Generator().manual_seed(network.config.seed)
        sample = _sample_positions(cache, 200_000, gen).float()
        if fit_stats:
            enc.set_feature_stats(sample)
        else:
            off = float(((sample.double().mean(0) - enc.feature_mean.cpu().double()).abs()
                         / enc.feature_std.cpu().double()).max())
            if off > STATS_TOLERANCE:
                raise ImagesMismatchError(f"these are not the images the network was trained on: "
                                          f"their features' mean differs from the fitted one by up "
                                          f"to {off:.2g} standard deviations")
        mean, std = enc.feature_mean.cpu()[:, None, None], enc.feature_std.cpu()[:, None, None]
        cache = [((f.float() - mean) / std).to(torch.float16) for f in cache]
        if fit_stats:
            enc.init_projection((sample - mean[:, 0, 0]) / std[:, 0, 0])
    return cache


def _sample_positions(cache: list[torch.Tensor], n: int, gen: torch.Generator) -> torch.Tensor:
    """About n feature vectors (N×C) drawn uniformly from the positions of all cached maps."""
    per = max(1, math.ceil(n / len(cache)))
    rows = []
    for f in cache:
        flat = f.reshape(f.shape[0], -1)
        idx = torch.randint(flat.shape[1], (min(per, flat.shape[1]),), generator=gen)
        rows.append(flat[:, idx].T)
    return torch.cat(rows)


def _lp_geometry(config: PEDENetConfig, stride: int) -> tuple[int, int]:
    """Neighbour distance and jitter of LP pairs, in grid cells: ``config.lp_distance`` patch
    sizes apart (at least one cell), jittered by up to a quarter of that."""
    dist = max(1, round(config.lp_distance * config.patch_size / stride))
    return dist, max(0, dist // 4)


def _crop_size(config: PEDENetConfig, network: PEDENetNetwork) -> int | None:
    """Training crop side (pixels) for encoders trained end to end; None = whole image."""
    if network.encoder.frozen:
        return None
    dist, jit = _lp_geometry(config, network.stride)
    return max(128, network.stride * 2 * (dist + jit) + config.patch_size)


def _random_crop(f: torch.Tensor, size: int | None, gen: torch.Generator) -> torch.Tensor:
    if size is None or (f.shape[-2] <= size and f.shape[-1] <= size):
        return f
    h, w = f.shape[-2:]
    top = int(torch.randint(max(h - size, 0) + 1, (1,), generator=gen))
    left = int(torch.randint(max(w - size, 0) + 1, (1,), generator=gen))
    return f[:, top: top + size, left: left + size]


def _lp_distance_on(h: int, w: int, dist: int, jit: int) -> int:
    """The LP distance (grid cells) drawn on an h×w grid: ``dist``, or less where the grid has
    no room for pairs that far apart with jitter ``jit``; below 1, no pair fits."""
    return min(dist, (min(h, w) - 1) // 2 - jit)


def _lp_pairs(emb: torch.Tensor, n: int, dist: int, jit: int, gen: torch.Generator):
    """Draw n LP pairs from one embedding map D×h×w: (z_a n×D, z_b n×D, direction labels n)."""
    d, h, w = emb.shape
    dist = _lp_distance_on(h, w, dist, jit)
    if dist < 1:
        return None
    reach = dist + jit
    ay = torch.randint(reach, h - reach, (n,), generator=gen)
    ax = torch.randint(reach, w - reach, (n,), generator=gen)
    label = torch.randint(0, 8, (n,), generator=gen)
    dy = DIRECTIONS[label, 0] * dist + torch.randint(-jit, jit + 1, (n,), generator=gen)
    dx = DIRECTIONS[label, 1] * dist + torch.randint(-jit, jit + 1, (n,), generator=gen)
    dev = emb.device
    za = emb[:, ay.to(dev), ax.to(dev)].T
    zb = emb[:, (ay + dy).to(dev), (ax + dx).to(dev)].T
    return za, zb, label.to(dev)


def _de_samples(emb: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    d = emb.shape[0]
    flat = emb.reshape(d, -1)
    idx = torch.randint(flat.shape[1], (min(n, flat.shape[1]),), generator=gen)
    return flat[:, idx.to(emb.device)].T


def _embed_many(network: PEDENetNetwork, feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Trainable head on a list of C×h×w features: one batched call when shapes agree."""
    if all(f.shape == feats[0].shape for f in feats):
        return list(network.encoder.head(torch.stack(feats)))
    return [network.encoder.head(f[None])[0] for f in feats]


@torch.no_grad()
def _sample_embeddings(network: PEDENetNetwork, cache: list[torch.Tensor], n: int, gen: torch.Generator) -> torch.Tensor:
    """About n embeddings (N×D float32) drawn uniformly from the training images."""
    device = next(network.parameters()).device
    per = max(1, math.ceil(n / len(cache)))
    rows = []
    for f in cache:
        emb = network.encoder.head(f.float()[None].to(device))[0]
        rows.append(_de_samples(emb, per, gen).cpu())
    return torch.cat(rows)


def check_embedding_count(network: PEDENetNetwork, cache: list[torch.Tensor], warn: bool = True,
                          held_out: int = 0) -> int:
    """Number of training patch embeddings, checked against what the mixture needs.

    Each of the K components has a full D×D covariance (``n_components``,
    ``embedding_dim``), which needs more than D embeddings to be estimated at all.
    ``held_out``: images held out of training for calibration; when > 0 the advice also
    names ``calibration_fraction``, which keeps them from the mixture.

    Raises:
        ValueError: fewer embeddings than components.
    Warns:
        UserWarning: fewer than K × (D + 1) embeddings: the covariances rest on the ridge
            and the energies mean little.
    """
    cfg = network.config
    n_cells = _count_cells(network, cache)
    advice = ("use more or larger training images, a larger image size, or fewer components "
              "(n_components, --n-components)")
    if held_out:
        advice += (f"; {held_out} more image(s) are held out for the thresholds (a smaller "
                   "calibration_fraction, --calibration-fraction, trains on more of them)")
    if n_cells < cfg.n_components:
        raise ValueError(f"the {len(cache)} training image(s) give only {n_cells} patch embeddings, "
                         f"fewer than the {cfg.n_components} mixture components; {advice}")
    needed = cfg.n_components * (cfg.embedding_dim + 1)
    if warn and n_cells < needed:
        warnings.warn(f"the {len(cache)} training image(s) give {n_cells} patch embeddings, fewer "
                      f"than the {needed} that {cfg.n_components} full {cfg.embedding_dim}×"
                      f"{cfg.embedding_dim} covariances need (K × (D + 1)): the mixture rests on "
                      f"its ridge and its energies mean little; {advice}, or a smaller "
                      "embedding dimension (embedding_dim, --embedding-dim)", stacklevel=3)
    return n_cells


def check_lp_distance(network: PEDENetNetwork, cache: list[torch.Tensor]) -> None:
    """Warn when the LP neighbour distance does not fit the training images' embedding grids.

    LP pairs are ``lp_distance`` patch sizes apart (:func:`_lp_geometry`); on a grid too small
    for that, :func:`_lp_pairs` draws them closer, or none at all (LP then does not train).
    Nothing is checked when LP is off (``lambda_lp`` 0, or no training steps).

    Warns:
        UserWarning: naming how many images get closer pairs or none, and what to change.
    """
    cfg = network.config
    if not (cfg.lambda_lp > 0 and cfg.steps > 0):
        return
    dist, jit = _lp_geometry(cfg, network.stride)
    drawn = [_lp_distance_on(h, w, dist, jit)
             for h, w in _grid_shapes(network, cache, _crop_size(cfg, network))]
    closer = sum(0 < d < dist for d in drawn)
    none = sum(d < 1 for d in drawn)
    if closer or none:
        what = (f"{none} of {len(cache)} training image(s) are too small for any LP pair"
                if none else f"{closer} of {len(cache)} training image(s) are too small for it: "
                "their pairs are drawn closer")
        warnings.warn(f"LP neighbour distance {cfg.lp_distance:g} patch sizes ({dist} grid "
                      f"cells): {what}{'; LP does not train' if none == len(cache) else ''}; "
                      "use a smaller lp_distance or larger images (image_size, --image-size)",
                      stacklevel=3)


@torch.no_grad()
def _grid_shapes(network: PEDENetNetwork, cache: list[torch.Tensor],
                 crop: int | None = None) -> list[tuple[int, int]]:
    """Embedding grid (h, w) of each cached training image, or of its training crop of side
    ``crop`` (pixels; None: the whole image); the head runs once per distinct shape."""
    device = next(network.parameters()).device
    shapes: dict[tuple, tuple[int, int]] = {}
    out = []
    for f in cache:
        key = tuple(f.shape)
        if key not in shapes:
            part = f if crop is None else f[..., :crop, :crop]
            emb = network.encoder.head(part.float()[None].to(device))
            shapes[key] = (int(emb.shape[-2]), int(emb.shape[-1]))
        out.append(shapes[key])
    return out


def _count_cells(network: PEDENetNetwork, cache: list[torch.Tensor]) -> int:
    """Number of patch embeddings (grid cells) of all cached training images."""
    return sum(h * w for h, w in _grid_shapes(network, cache))


def em_with_progress() -> type:
    """scikit-learn's ``GaussianMixture`` with a ``progress`` attribute: a tqdm bar (or None)
    advanced by one after every EM iteration, with the change of the lower bound shown.

    It uses the per-iteration hook scikit-learn calls for its verbose output
    (``_print_verbose_msg_iter_end``, private; with a version that no longer calls it the bar
    just stays still). The fit itself is unchanged: same parameters, same result."""
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    class GaussianMixtureWithProgress(SkGaussianMixture):
        progress = None

        def _print_verbose_msg_iter_end(self, n_iter, diff_ll):
            super()._print_verbose_msg_iter_end(n_iter, diff_ll)
            if self.progress is not None:
                self.progress.update(1)
                self.progress.set_postfix(change=f"{diff_ll:.2g}", refresh=False)

    return GaussianMixtureWithProgress


def init_membership(network: PEDENetNetwork, cache: list[torch.Tensor], progress: bool = True,
                    n_samples: int = 100_000, steps: int = 300) -> dict:
    """Start the DE network from a mixture fitted by EM (k-means++ init) on the initial embeddings.

    The DAGMM energy, minimized from a random membership network, settles in poor local
    optima (measured on MTD: image AUROC 0.65 against 0.77 for a k-means-initialized EM fit of
    the same embeddings). So the membership network is first trained (soft cross-entropy,
    ``steps`` Adam steps) to reproduce the EM posteriors of scikit-learn's GaussianMixture
    fitted on ``n_samples`` embeddings; training then continues with the energy objective.

    Returns:
        dict with the EM fit's log-likelihood per sample, its iterations and the agreement
        (fraction of equal arg-max cluster) between the network and the EM posteriors.
    """
    from sklearn.exceptions import ConvergenceWarning

    cfg = network.config
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    z = _sample_embeddings(network, cache, n_samples, gen)
    check_embedding_count(network, cache, warn=False)  # fit warned
    zd = z.double().numpy()
    # the ridge of pedenet.gmm.ridge_of: relative, with a floor so that constant embeddings
    # (e.g. all-black training images) still give positive-definite covariances
    reg = cfg.ridge * max(float(zd.var(0).mean()), 1e-12) + 1e-9
    em = em_with_progress()(cfg.n_components, covariance_type="full", reg_covar=reg, max_iter=100,
                            init_params="k-means++", random_state=cfg.seed)
    with warnings.catch_warnings(), progress_bar(
            total=em.max_iter, desc=f"EM initialization (K {cfg.n_components}, {len(zd)} embeddings)",
            unit="iteration", disable=not progress) as bar:
        # duplicates (few distinct embeddings) make k-means++ find fewer clusters: harmless
        warnings.simplefilter("ignore", ConvergenceWarning)
        em.progress = bar
        em.fit(zd)
        em.progress = None
        if progress and bar.n:  # converged before max_iter: show the bar complete
            bar.total = bar.n
            bar.refresh()
    target = torch.from_numpy(em.predict_proba(zd)).float()
    device = next(network.parameters()).device
    z, target = z.to(device), target.to(device)
    opt = torch.optim.Adam(network.membership.parameters(), lr=3e-3)
    for _ in progress_bar(range(steps), desc="initializing the DE network", unit="step", disable=not progress):
        idx = torch.randint(len(z), (4096,), generator=gen).to(device)
        logp = torch.log(network.membership(z[idx]).clamp_min(1e-12))
        loss = -(target[idx] * logp).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        agree = float((network.membership(z).argmax(1) == target.argmax(1)).float().mean())
    return {"em_log_likelihood": float(em.score(zd)), "em_iterations": int(em.n_iter_), "membership_agreement": agree}


def train_network(
    network: PEDENetNetwork,
    cache: list[torch.Tensor],
    *,
    progress: bool = True,
    start_step: int = 0,
    optimizer_state: dict | None = None,
    generator_state: torch.Tensor | None = None,
    history: TrainingHistory | None = None,
    on_step: Callable[..., None] | None = None,
) -> TrainingHistory:
    """Optimize the network on cached frozen features for ``config.steps`` Adam steps.

    A resumed run (``start_step`` > 0 with the optimizer state, generator state and history
    saved after step ``start_step``) continues exactly as the uninterrupted run would have.

    Args:
        network: PEDENetNetwork, modified in place.
        cache: list of C×h×w float16 frozen features, one per training image.
        progress: show a tqdm bar with each loss part, LP accuracy and effective rank.
        start_step: for resumed runs, the number of steps already done.
        optimizer_state: ``Adam.state_dict()`` saved after ``start_step`` steps.
        generator_state: ``torch.Generator.get_state()`` of the batch sampler saved after
            ``start_step`` steps; None starts the generator from ``config.seed``.
        history: the history so far (continued in place); None starts a new one.
        on_step: called after each step as ``on_step(done, optimizer=..., generator=...,
            history=...)`` (checkpointing); it may raise to stop training.

    Returns:
        TrainingHistory with the diagnostics every LOG_EVERY steps.
    """
    cfg = network.config
    device = next(network.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003)
    if generator_state is not None:
        gen.set_state(generator_state)
    enc_params = [p for p in network.encoder.parameters() if p.requires_grad]
    head_params = [p for p in list(network.membership.parameters()) + list(network.location.parameters())]
    opt = torch.optim.Adam([{"params": enc_params, "lr": cfg.encoder_learning_rate}, {"params": head_params, "lr": cfg.lr}])
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    dist, jit = _lp_geometry(cfg, network.stride)
    crop = _crop_size(cfg, network)
    history = TrainingHistory() if history is None else history
    network.train()
    bar = progress_bar(range(start_step, cfg.steps), desc="training", unit="step", disable=not progress,
               initial=start_step, total=cfg.steps)
    seconds_before = float(history.timings.get("train_seconds", 0.0))
    t0 = time.perf_counter()
    for step in bar:
        idx = torch.randint(len(cache), (cfg.batch_size,), generator=gen)
        feats = [_random_crop(cache[i], crop, gen).float().to(device) for i in idx.tolist()]
        embs = _embed_many(network, feats)

        za, zb, labels, zs = [], [], [], []
        for emb in embs:
            pairs = _lp_pairs(emb, cfg.lp_pairs, dist, jit, gen)
            if pairs is not None:
                za.append(pairs[0]), zb.append(pairs[1]), labels.append(pairs[2])
            zs.append(_de_samples(emb, DE_SAMPLES_PER_IMAGE, gen))
        z = torch.cat(zs)
        z_de = z if cfg.energy_trains_encoder else z.detach()
        gamma = network.membership(z_de)
        phi, mu, cov = gmm_params(z_de, gamma)
        mixture = GaussianMixture(phi, mu, cov, cfg.ridge)
        energy = mixture.energy(z_de).mean()
        penalty = mixture.penalty()
        loss = cfg.lambda_de * energy.float() + cfg.lambda_cov * penalty.float()
        lp_loss = torch.zeros((), device=device)
        acc = float("nan")
        if za:
            logits = network.location(torch.cat(za), torch.cat(zb))
            target = torch.cat(labels)
            lp_loss = F.cross_entropy(logits, target)
            acc = float((logits.argmax(1) == target).float().mean())
            loss = loss + cfg.lambda_lp * lp_loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {float(loss)} at step {step}; lower --lr or check the images")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if done % LOG_EVERY == 0 or done == cfg.steps:
            with torch.no_grad():
                rank = effective_rank(z)
                min_eig = float(torch.linalg.eigvalsh(mixture.cov.detach()).min())
            history.step.append(done)
            energy, penalty, lp_loss = energy.detach(), penalty.detach(), lp_loss.detach()
            history.energy.append(float(energy))
            history.cov_penalty.append(float(penalty))
            history.lp_loss.append(float(lp_loss))
            history.lp_accuracy.append(acc)
            history.effective_rank.append(rank)
            history.min_cov_eigenvalue.append(min_eig)
            history.embedding_variance.append(float(z.detach().var(0).sum()))
            history.cluster_usage.append([float(p) for p in phi.detach()])
            bar.set_postfix(E=f"{float(energy):.1f}", Pcov=f"{float(penalty):.2f}", LP=f"{float(lp_loss):.3f}",
                            acc=f"{acc:.2f}", rank=f"{rank:.1f}")
        if on_step is not None:
            history.timings["train_seconds"] = seconds_before + time.perf_counter() - t0
            on_step(done, optimizer=opt, generator=gen, history=history)
    network._optimizer_state = opt.state_dict()
    history.timings["train_seconds"] = seconds_before + time.perf_counter() - t0
    network.eval()
    return history


@torch.no_grad()
def fit_mixture(network: PEDENetNetwork, cache: list[torch.Tensor], progress: bool = True) -> GaussianMixture:
    """Fix φ, μ, Σ from the memberships of *all* training embeddings (accumulated statistics)."""
    cfg = network.config
    network.eval()
    acc = GMMAccumulator(cfg.n_components, cfg.embedding_dim)
    for f in progress_bar(cache, desc="fitting the mixture", unit="img", disable=not progress):
        z = network.embeddings_of_features(f)
        acc.add(z, network.membership(z))
    network.mixture = acc.finalize(cfg.ridge)
    return network.mixture


@torch.no_grad()
def training_energy_quantiles(network: PEDENetNetwork, cache: list[torch.Tensor], max_samples: int = 500_000) -> dict:
    """Quantiles 0.5, 0.99, 0.999 and 1.0 of the patch energy over the training images.

    The scale of normal scores (energy units): heatmaps are coloured from the median to
    well above the largest normal value.
    """
    device = next(network.parameters()).device
    per = max(1, max_samples // len(cache))
    gen = torch.Generator().manual_seed(network.config.seed)
    energies = []
    for f in cache:
        emb = network.encoder.head(f.float()[None].to(device))
        e = network.energy_of_embeddings(emb).reshape(-1).cpu()
        if len(e) > per:
            e = e[torch.randperm(len(e), generator=gen)[:per]]
        energies.append(e)
    return normal_quantiles(torch.cat(energies).numpy())
