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
from .encoders import build_encoder
from .gmm import GaussianMixture

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
    ``patch_energy(x)``: B×3×H×W → B×h×w float64 energy (needs ``mixture`` to be set).
    """

    def __init__(self, config: PEDENetConfig, load_weights: bool = True):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config.encoder, config.embedding_dim, config.patch_size, load_weights)
        self.membership = MembershipNetwork(config.embedding_dim, config.n_components, config.de_hidden)
        self.location = LocationHead(config.embedding_dim)
        self.mixture: GaussianMixture | None = None

    @property
    def stride(self) -> int:
        return self.encoder.stride

    @property
    def offset(self) -> float:
        return self.encoder.offset

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    @torch.no_grad()
    def energy_of_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        """B×D×h×w embeddings → B×h×w float64 energy under the fixed mixture."""
        if self.mixture is None:
            raise RuntimeError("the model has no fitted mixture yet: call fit first")
        b, d, h, w = emb.shape
        z = emb.permute(0, 2, 3, 1).reshape(-1, d)
        return self.mixture.energy(z).reshape(b, h, w)

    @torch.no_grad()
    def patch_energy(self, x: torch.Tensor) -> torch.Tensor:
        return self.energy_of_embeddings(self.embed(x))
