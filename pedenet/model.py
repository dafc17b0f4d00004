"""The PEDENet network: PE (patch embedding), DE (density estimation) and LP (location prediction).

Zhang, Wang & Kuo, "PEDENet: Image Anomaly Localization via Patch Embedding and Density
Estimation", Pattern Recognition Letters 2022 (arXiv 2110.15525). DE follows DAGMM
(Zong et al., ICLR 2018); LP follows the relative-position task of Doersch et al. (2015) as
used by Patch SVDD (Yi & Yoon, ACCV 2020).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import PEDENetConfig
from .encoders import ScratchEncoder, build_encoder
from .gmm import GaussianMixture
from .memory_bank import MemoryBank

# Context (pixels) kept around each tile's own cells when the pretrained encoder runs tiled
# (``max_tile``), by the deepest stride of its feature blocks: the backbone's zero padding
# reaches this far into a tile before the features agree with the untiled ones. Blocks up to
# stride 16 (4, 10): the difference decays from ~2.5 std at the edge to 1e-2 at 136 px and
# 1e-3 at 152 px. With stride-32 blocks (4, 10, 14, 15; max over channels, in channel std):
# 7.3 at the edge, 1.0 at 160 px, 0.14-0.21 at 256 px, 1.3e-2 at 320 px.
PRETRAINED_TILE_MARGIN = {16: 160, 32: 320}
# Tile starts are aligned to the deepest stride of the pretrained encoder's feature blocks.

# The 8 neighbour directions (row, col) of the LP task, in the order of the LP classes.
DIRECTIONS = torch.tensor([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)])


class MembershipNetwork(nn.Module):
    """DE network: embedding → soft membership over K clusters (DAGMM estimation network).

    Input N×D float; output N×K, rows summing to 1 (softmax).
    """

    def __init__(self, embedding_dim: int, n_components: int, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embedding_dim, hidden), nn.Tanh(), nn.Linear(hidden, n_components))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(z), dim=-1)


class LocationHead(nn.Module):
    """LP network: two patch embeddings → logits over the 8 relative positions.

    Input: z_a, z_b N×D. Output: N×8 logits (class c = DIRECTIONS[c], position of b from a).
    """

    def __init__(self, embedding_dim: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * embedding_dim, hidden), nn.LeakyReLU(0.1),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.1),
            nn.Linear(hidden, 8),
        )

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z_a, z_b], dim=-1))


class PEDENetNetwork(nn.Module):
    """PE + DE + LP networks, and the mixture fixed after training.

    ``embed(x)``: B×3×H×W images in [0, 1] → B×D×h×w embeddings (one dense pass).
    ``patch_energy(x, max_tile)``: B×3×H×W → B×h×w float64 energy (needs ``mixture`` to be
    set); images larger than ``max_tile`` pixels on a side are encoded in overlapping tiles.
    """

    def __init__(self, config: PEDENetConfig, load_weights: bool = True):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config.encoder, config.embedding_dim, config.patch_size, load_weights,
                                     config.feature_blocks)
        self.membership = MembershipNetwork(config.embedding_dim, config.n_components, config.de_hidden)
        self.location = LocationHead(config.embedding_dim)
        self.mixture: GaussianMixture | None = None
        # with scoring "distance": the memory bank that scores patches instead of the mixture
        # (which stays fitted: the cluster maps use it)
        self.memory_bank: MemoryBank | None = None

    @property
    def stride(self) -> int:
        return self.encoder.stride

    @property
    def offset(self) -> float:
        return self.encoder.offset

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def embeddings_of_features(self, features: torch.Tensor) -> torch.Tensor:
        """One image's cached frozen features (C×h×w, any float dtype, any device) → its
        (h·w)×D patch embeddings, row-major over the grid, on the network's device."""
        device = next(self.parameters()).device
        emb = self.encoder.head(features.float()[None].to(device))[0]
        return emb.reshape(emb.shape[0], -1).T

    @torch.no_grad()
    def energy_of_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        """B×D×h×w embeddings → B×h×w float64 patch scores: the energy under the fixed mixture
        (:meth:`GaussianMixture.score_energy`: mixed precision where it is accurate), or with
        a ``memory_bank`` (scoring "distance") the distance to the nearest bank embedding."""
        if self.mixture is None:
            raise RuntimeError("the model has no fitted mixture yet: call fit first")
        b, d, h, w = emb.shape
        z = emb.permute(0, 2, 3, 1).reshape(-1, d)
        scorer = self.mixture if self.memory_bank is None else self.memory_bank
        return scorer.score_energy(z).reshape(b, h, w)

    @torch.no_grad()
    def patch_energy(self, x: torch.Tensor, max_tile: int | None = None) -> torch.Tensor:
        """B×3×H×W images in [0, 1] → B×h×w float64 energy grid.

        With ``max_tile`` (pixels) and H or W larger than it, the image is encoded in
        overlapping tiles of at most ``max_tile``×``max_tile`` pixels (:meth:`tile_plan`) and
        the energy grids of the tiles' own cells are stitched. ``scratch``: identical to the
        untiled grid (no padding; tiles overlap by patch_size − stride and start on the
        stride). ``pretrained``: tiles keep ``PRETRAINED_TILE_MARGIN`` px of context on
        inner sides, so cells agree with the untiled pass to a small tolerance (~1e-4 of the
        energy's spread with blocks up to stride 16, ~2e-3 with the default stride-32 blocks; the
        backbone's zero padding at a tile edge and its very wide receptive field make exact
        agreement impossible).
        """
        h, w = x.shape[-2:]
        if not max_tile or (h <= max_tile and w <= max_tile):
            return self.energy_of_embeddings(self.embed(x))
        rows, cols = self.tile_plan(h, max_tile), self.tile_plan(w, max_tile)
        s = self.stride
        bands = []
        for (ya, yb, yc0, yc1) in rows:
            parts = []
            for (xa, xb, xc0, xc1) in cols:
                e = self.energy_of_embeddings(self.embed(x[..., ya:yb, xa:xb]))
                y0, x0 = yc0 - ya // s, xc0 - xa // s
                y1 = None if yc1 is None else yc1 - ya // s
                x1 = None if xc1 is None else xc1 - xa // s
                parts.append(e[:, y0:y1, x0:x1])
            bands.append(torch.cat(parts, dim=2))
        return torch.cat(bands, dim=1)

    def tile_geometry(self) -> tuple[int, int, int]:
        """(context before, context after, alignment) in pixels, for tiling the encoder.

        A tile that owns cells [c0, c1) reads pixels [stride·c0 − before, stride·c1 + after),
        its start rounded down to a multiple of ``alignment``.
        """
        enc = self.encoder
        if isinstance(enc, ScratchEncoder):  # cell c reads exactly [s·c, s·c + p)
            return 0, enc.patch_size - enc.stride, enc.stride
        stride = max(16, enc.max_stride)
        margin = PRETRAINED_TILE_MARGIN[stride]
        return margin, margin, stride

    def tile_plan(self, n: int, max_tile: int) -> list[tuple[int, int, int, int | None]]:
        """Tiles along one axis of length ``n`` px: (pixel start, pixel end, first owned cell,
        end of owned cells or None for "to the last cell"), each at most ``max_tile`` px.

        Raises ValueError if ``max_tile`` leaves no room for a cell besides the context.
        """
        if n <= max_tile:
            return [(0, n, 0, None)]
        before, after, align = self.tile_geometry()
        s = self.stride
        k = (max_tile - before - after - align) // s  # owned cells per tile (slack for rounding)
        if k < 1:
            need = before + after + align + s
            raise ValueError(f"max_tile={max_tile} is too small for this encoder: a tile needs at "
                             f"least {need} px (its context and one cell); pass max_tile >= {need}, "
                             "or None to encode each image whole")
        tiles: list[tuple[int, int, int, int | None]] = []
        c0 = 0
        while True:
            a = max(0, s * c0 - before)
            a -= a % align
            c1 = c0 + k
            b = s * c1 + after
            if b + s > n:  # the rest fits in this tile (and a following one would own no cell)
                tiles.append((a, n, c0, None))
                return tiles
            tiles.append((a, b, c0, c1))
            c0 = c1
