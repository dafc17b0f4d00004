"""Configuration of a PEDENet model and its training, with the documented defaults.

Every field is a default a user can change (``PEDENetConfig(**overrides)`` or the CLI).
The defaults follow docs/method.md: a frozen ImageNet-pretrained EfficientNet-Lite0
backbone, a trainable 1×1 reduction to ``embedding_dim`` channels, K = 40 mixture
components and the loss weights of DAGMM / PEDENet (λ_DE = 1, λ_cov = 0.005, λ_LP = 1).
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, fields

import numpy as np

ENCODERS = ("pretrained", "scratch")
MAX_SEED = 2**32 - 1
SCORINGS = ("mixture", "distance")


def real_number(value) -> float | None:
    """``value`` as a float when it is one real number, else None.

    Accepted: Python, numpy and ``Decimal`` / ``Fraction`` numbers, 0-d arrays and tensors.
    Not numbers here: bools, strings, bytes, arrays of several values, complex numbers. A
    16- or 32-bit float is read as the decimal it prints as (``np.float32(0.01)`` → 0.01,
    not 0.0099999998), so that a rate means the same whichever type carries it."""
    dtype = str(getattr(value, "dtype", "")).replace("torch.", "")
    if isinstance(value, (bool, np.bool_, str, bytes)) or getattr(value, "ndim", 0) != 0 or dtype == "bool":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if dtype in ("float16", "float32"):
        number = float(str(getattr(np, dtype)(number)))
    return number


def whole_number(value) -> int | None:
    """``value`` as an int when it is a whole number (an integer of any kind, or an
    integral float such as 2.0: see :func:`real_number`), else None."""
    number = real_number(value)
    if number is None:
        return None
    try:
        return operator.index(value)
    except TypeError:
        return int(number) if number.is_integer() else None


@dataclass
class PEDENetConfig:
    """All settings of a PEDENet model and its training.

    Model
        encoder: ``"pretrained"`` (frozen ImageNet EfficientNet-Lite0 blocks, see
            ``feature_blocks``, then a trainable 1×1 reduction) or ``"scratch"`` (a small fully convolutional
            encoder without padding, trained from nothing).
        embedding_dim: D, the patch embedding size.
        n_components: K, the number of Gaussian mixture components (DE network outputs).
            Default 40, chosen on validation images (docs/ablations.md; 20 before, 10 before
            that).
        patch_size: side of a patch in pixels of the processed image. For ``scratch`` it is
            the encoder's receptive field (32 or 64). For ``pretrained`` it sets the distance
            between the two patches of an LP pair.
        feature_blocks: the EfficientNet-Lite0 blocks whose outputs form the pretrained
            encoder's features (``pretrained`` only): the first at stride 8 (3 or 4), others
            at stride 16 (5-10) or 32 (11-15). Default 4, 10, 14, 15 (664 channels), chosen on
            validation images (docs/ablations.md); checkpoints saved before this setting
            existed use 4, 10.
        image_size: the processed size (pixels, square side) every image is resized to
            before encoding; 0 keeps each image's native size.
        keep_aspect: resize so that the *shorter* side is ``image_size`` and the aspect
            ratio is kept (:func:`pedenet.scoring.processed_size`), instead of squashing to
            a square; for images that are much wider than high (or the reverse).
        de_hidden: width of the membership network's hidden layer.
        ridge: added to each covariance diagonal before Cholesky (embedding units²).
        smoothing_sigma: σ of the Gaussian smoothing of the anomaly map, in pixels of the
            processed image (4 px at 256 px is the usual value).
        scoring: how a patch is scored: ``"mixture"`` (default, the paper: its energy under
            the Gaussian mixture) or ``"distance"`` (its Euclidean distance to the nearest of
            ``memory_bank_size`` training embeddings, SPADE / PatchCore style:
            :mod:`pedenet.memory_bank`). Distance localized better on the test splits of MTD
            and bottle (docs/ablations.md) but costs ~20× more per image, grows with the bank,
            makes the checkpoint larger (M × D × 2 bytes) and cannot be exported.
        memory_bank_size: M, the most training embeddings kept with scoring ``"distance"``:
            an equal share of each training image's positions, drawn uniformly (all of them
            when the images hold fewer).
        image_score_fraction: the image score is the mean of this fraction of the scored
            pixels (the map less the ``image_score_border`` band), the largest ones
            (:func:`pedenet.scoring.image_score`); 0 = their maximum.
            Default 0.003, chosen on validation images (docs/ablations.md); checkpoints saved
            before this setting existed use 0.
        image_score_border: b in [0, 0.5): the image score leaves out a band of floor(b·H)
            rows at the top and bottom of the map and floor(b·W) columns at the left and right
            (:func:`pedenet.scoring.image_score`); the map is unchanged. Default 0 (every pixel
            counts). On MTD, whose normal maps peak at the tile edge, 0.05 ranked images better
            on validation and test (docs/ablations.md); a defect that lies only in the band is
            then missed, so use it where defects do not sit at the image edge.

    Training
        steps: number of optimizer steps (0: no training; the mixture is fitted on the
            initial embeddings — the "untrained" reference).
        batch_size: images per step.
        lr: Adam learning rate of the DE and LP networks.
        encoder_lr: Adam learning rate of the encoder's trainable part; None (default) means
            ``lr`` for ``scratch`` and 1e-4 for ``pretrained``: lower than ``lr`` so
            that LP refines the PCA-initialized reduction of the pretrained features without
            discarding what the mixture needs (measured on MTD: at 1e-3 the effective rank of
            the embeddings fell from 42 to 26 and image AUROC from 0.77 to 0.69).
        lambda_de, lambda_cov, lambda_lp: loss weights of L = λ_DE·E + λ_cov·P_cov + λ_LP·L_LP.
        energy_trains_encoder: if True the energy gradient also reaches the encoder (the raw
            DAGMM objective, known to collapse embeddings); default False: the energy trains
            the membership network only and LP trains the encoder.
        de_init: ``"em"`` (default): the membership network starts by reproducing a mixture
            fitted by EM with k-means++ init (scikit-learn) on the initial embeddings;
            ``"random"``: plain random initialization (DAGMM).
        lp_pairs: LP pairs drawn per image per step.
        lp_distance: distance between the two patches of an LP pair, in patch sizes (default
            1: adjacent patches, as in the paper's Fig. 3); rounded to whole grid cells. On a
            training image whose grid is too small for it, pairs are drawn closer or not at
            all; fit warns before training (:func:`pedenet.training.check_lp_distance`).
        seed: seed for every random choice (torch, numpy).

    Thresholds (:mod:`pedenet.calibration`)
        calibration_fraction: fraction of the normal training images held out of training
            to calibrate the thresholds (conformal p-values); 0 disables calibration (no
            p-values or decisions, all images train).
        target_fpr: default target false-alarm rate: the fraction of normal images that may
            be flagged (``predict`` can use another).
        pixel_fpr: default fraction of normal pixels above the pixel threshold that draws the
            defect masks (an estimate, not a guarantee).
    """

    encoder: str = "pretrained"
    embedding_dim: int = 128
    n_components: int = 40
    patch_size: int = 32
    feature_blocks: tuple = (4, 10, 14, 15)
    image_size: int = 256
    keep_aspect: bool = False
    de_hidden: int = 32
    ridge: float = 1e-3
    smoothing_sigma: float = 4.0
    image_score_fraction: float = 0.003
    image_score_border: float = 0.0
    scoring: str = "mixture"
    memory_bank_size: int = 200_000
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    encoder_lr: float | None = None
    lambda_de: float = 1.0
    lambda_cov: float = 0.005
    lambda_lp: float = 1.0
    energy_trains_encoder: bool = False
    de_init: str = "em"
    lp_pairs: int = 64
    lp_distance: float = 1.0
    seed: int = 0
    calibration_fraction: float = 0.2
    target_fpr: float = 0.01
    pixel_fpr: float = 0.01

    def __post_init__(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), f.type
            if kind == "bool" and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be True or False, got {value!r}")
            # plain Python numbers: numpy scalars (np.int64 from a grid) would make the saved
            # checkpoint unloadable under torch.load(weights_only=True)
            if kind == "int":
                number = whole_number(value)
                if number is None:
                    raise ValueError(f"{f.name} must be an integer, got {value!r}")
                setattr(self, f.name, number)
            elif kind in ("float", "float | None") and not (value is None and kind != "float"):
                number = real_number(value)
                if number is None:
                    raise ValueError(f"{f.name} must be a number, got {value!r}")
                if not math.isfinite(number):
                    raise ValueError(f"{f.name} must be a finite number, got {value!r}")
                setattr(self, f.name, number)
        if not 0.0 <= float(self.image_score_fraction) < 1.0:
            raise ValueError(f"image_score_fraction must be in [0, 1), got {self.image_score_fraction}")
        if not 0.0 <= float(self.image_score_border) < 0.5:
            raise ValueError(f"image_score_border must be in [0, 0.5), got {self.image_score_border}")
        if not 0.0 <= float(self.calibration_fraction) < 1.0:
            raise ValueError(f"calibration_fraction must be in [0, 1), got {self.calibration_fraction}")
        for name in ("target_fpr", "pixel_fpr"):
            if not 0.0 < float(getattr(self, name)) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        from .encoders import check_feature_blocks

        self.feature_blocks = check_feature_blocks(self.feature_blocks)
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder == "scratch" and self.patch_size not in (32, 64):
            raise ValueError(f"the scratch encoder supports patch_size 32 or 64, got {self.patch_size}")
        for name in ("embedding_dim", "n_components", "patch_size", "batch_size", "lp_pairs",
                     "memory_bank_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "encoder_lr"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("ridge", "smoothing_sigma", "lambda_de", "lambda_cov", "lambda_lp"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.de_hidden < 1:
            raise ValueError(f"de_hidden must be >= 1, got {self.de_hidden}")
        if not 0 <= self.seed <= MAX_SEED:  # numpy's and scikit-learn's seeds are 32-bit
            raise ValueError(f"seed must be in 0-{MAX_SEED}, got {self.seed}")
        if self.encoder == "pretrained":
            from .encoders import BLOCK_CHANNELS

            channels = sum(BLOCK_CHANNELS[b] for b in self.feature_blocks)
            if self.embedding_dim > channels:
                raise ValueError(f"embedding_dim {self.embedding_dim} is more than the {channels} "
                                 f"feature channels of feature_blocks {list(self.feature_blocks)}: "
                                 f"the reduction keeps at most that many principal axes; use "
                                 f"embedding_dim <= {channels} or more blocks")
        if not float(self.lp_distance) > 0:
            raise ValueError(f"lp_distance must be > 0 (in patch sizes), got {self.lp_distance}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.de_init not in ("em", "random"):
            raise ValueError(f"de_init must be 'em' or 'random', got {self.de_init!r}")
        if self.keep_aspect and not self.image_size:
            raise ValueError("keep_aspect needs an image_size > 0 (the shorter side); "
                             "image_size 0 already keeps every image's own size")
        if self.image_size and self.image_size < self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be at least patch_size ({self.patch_size})")

    @property
    def encoder_learning_rate(self) -> float:
        """The encoder's learning rate after resolving the None default."""
        if self.encoder_lr is not None:
            return float(self.encoder_lr)
        return 1e-4 if self.encoder == "pretrained" else float(self.lr)

    def to_dict(self) -> dict:
        """Plain dict of every field (JSON-serializable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PEDENetConfig":
        """Build from a dict, ignoring unknown keys (older/newer checkpoints).

        A dict without ``feature_blocks`` (saved before it was a setting) gets the blocks
        those versions used, (4, 10), not today's default; likewise a dict without
        ``image_score_fraction`` gets 0 (the map maximum), so that a checkpoint's calibrated
        thresholds keep matching its scores.
        """
        from .encoders import LEGACY_FEATURE_BLOCKS

        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        values.setdefault("feature_blocks", LEGACY_FEATURE_BLOCKS)
        values.setdefault("image_score_fraction", 0.0)
        return cls(**values)
