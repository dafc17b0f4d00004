"""Distance scoring: a memory bank of training embeddings, scored by nearest-neighbour distance.

The opt-in alternative to the mixture's energy (``scoring="distance"``): a patch's anomaly
score is the Euclidean distance from its embedding to the nearest of ``memory_bank_size``
training embeddings, drawn uniformly from the positions of all training images (SPADE,
Cohen & Hoshen 2020; PatchCore, Roth et al. 2022, without its greedy coreset). On MTD and
MVTec AD bottle it localizes better than the mixture on the test split (docs/ablations.md),
at a cost that grows with the bank: about 20× the mixture's per image with 200 000 embeddings
of D = 128 on one CPU thread.

The bank is stored in float16 (half the checkpoint size) and used in float32; it is rounded
to float16 when built, so a fitted model and its reloaded checkpoint give identical scores.
"""

from __future__ import annotations


import numpy as np
import torch

from .progress import progress_bar
from .scoring import normal_quantiles

# Bank rows per matrix product, and query rows per call: at most 4096 × 16384 × 4 bytes
# = 256 MiB of distances at a time, whatever the image size.
CHUNK_ROWS = 16384
QUERY_ROWS = 4096


def nearest_distance(query: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor,
                     chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Exact Euclidean distance of each query row to its nearest bank row.

    Args:
        query: N×D float32. bank: M×D float32. bank_sq: M float32, ‖b‖² of each bank row.
        chunk: bank rows per matrix product (memory: N × chunk × 4 bytes).

    Returns:
        N float32 distances (embedding units), ≥ 0.

    The matrix-multiply form ‖q‖² − 2 q·b + ‖b‖² (what ``torch.cdist`` uses for large
    inputs), minimized chunk by chunk, the square root taken on the minima only.
    """
    best = torch.full((len(query),), float("inf"), device=query.device)
    for i in range(0, len(bank), chunk):
        d2 = torch.addmm(bank_sq[None, i:i + chunk], query, bank[i:i + chunk].T, alpha=-2.0)
        best = torch.minimum(best, d2.amin(dim=1))
    return (best + (query * query).sum(1)).clamp_min(0.0).sqrt()


class MemoryBank:
    """Training embeddings (M×D) whose nearest-neighbour distance scores new embeddings.

    The same scoring interface as :class:`pedenet.gmm.GaussianMixture`: ``score_energy(z)``
    maps N×D embeddings to N float64 scores, higher = more anomalous.

    Raises ValueError for a bank that is not a non-empty 2-D tensor of finite values.
    """

    def __init__(self, bank: torch.Tensor):
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"a memory bank must be a non-empty M×D tensor, got shape {tuple(bank.shape)}")
        self.bank = bank.to(torch.float16).float()
        if not torch.isfinite(self.bank).all():
            raise ValueError("the memory bank holds non-finite values (or values beyond float16's "
                             "range, ±65504, in which it is stored)")
        self.bank_sq = (self.bank * self.bank).sum(1)

    def __len__(self) -> int:
        return len(self.bank)

    @property
    def dim(self) -> int:
        return self.bank.shape[1]

    def to(self, device) -> "MemoryBank":
        out = MemoryBank.__new__(MemoryBank)
        out.bank, out.bank_sq = self.bank.to(device), self.bank_sq.to(device)
        return out

    def score_energy(self, z: torch.Tensor, leave_out: tuple[int, int] | None = None) -> torch.Tensor:
        """N×D embeddings → N float64 nearest-neighbour distances (embedding units).

        ``leave_out``: (start, end) bank rows to ignore (an image's own rows, for the
        leave-one-image-out distances of training patches); None uses the whole bank.
        """
        parts = [(0, len(self.bank))] if leave_out is None else [(0, leave_out[0]), (leave_out[1], len(self.bank))]
        parts = [(a, b) for a, b in parts if b > a]
        if not parts:
            raise ValueError("leave_out covers the whole memory bank: no row is left to compare with")
        z = z.float()
        out = []
        for i in range(0, len(z), QUERY_ROWS):
            q = z[i:i + QUERY_ROWS]
            out.append(torch.stack([nearest_distance(q, self.bank[a:b], self.bank_sq[a:b])
                                    for a, b in parts]).amin(0))
        if not out:
            return torch.zeros(0, dtype=torch.float64, device=z.device)
        return torch.cat(out).double()

    def state_dict(self) -> dict:
        return {"bank": self.bank.to(torch.float16).cpu()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "MemoryBank":
        """Raises ValueError unless ``state`` holds a tensor under "bank" (see :meth:`__init__`)."""
        bank = state.get("bank") if isinstance(state, dict) else None
        if not isinstance(bank, torch.Tensor):
            raise ValueError(f"the memory bank entry holds no 'bank' tensor (found {type(bank).__name__})")
        return cls(bank)


@torch.no_grad()
def build_memory_bank(network, cache: list[torch.Tensor], size: int, seed: int,
                      progress: bool = True) -> tuple[MemoryBank, list[int]]:
    """Draw at most ``size`` embeddings uniformly from the positions of all training images.

    Args:
        network: a :class:`pedenet.model.PEDENetNetwork` after training.
        cache: the training images' cached frozen features (:func:`pedenet.training.cache_frozen_features`).
        size: the bank's size M: ``size // n`` positions of each of the n images, one more of
            the first ``size % n``; fewer where an image has fewer positions (all of them).
        seed: seeds the draw.

    Returns:
        (the bank, the number of its rows from each image: the bank holds each image's rows
        together, in the order of ``cache``).
    """
    gen = torch.Generator().manual_seed(seed)
    base, extra = divmod(int(size), len(cache))
    rows = []
    for i, f in enumerate(progress_bar(cache, desc="building the memory bank", unit="img",
                                       disable=not progress)):
        z = network.embeddings_of_features(f)
        idx = torch.randperm(len(z), generator=gen)[:base + (i < extra)]
        rows.append(z[idx.to(z.device)].float().cpu())
    return MemoryBank(torch.cat(rows)), [len(r) for r in rows]


@torch.no_grad()
def leave_one_out_quantiles(network, cache: list[torch.Tensor], counts: list[int],
                            seed: int, n_images: int = 50, per_image: int = 400) -> dict:
    """Quantiles 0.5, 0.99, 0.999 and 1.0 of training patches' distances to the *other*
    training images' bank rows (the colour scale of distance scoring, as
    :func:`pedenet.training.training_energy_quantiles` is the mixture's). ``counts``: the
    bank's rows from each image of ``cache``, as :func:`build_memory_bank` returns them.

    A training patch's distance to the bank that holds it is 0; leaving its own image's rows
    out gives the distance a new normal patch sees. Up to ``n_images`` images (seeded draw),
    ``per_image`` positions each. Where an image's own rows are all the bank holds (a single
    training image, or a bank of one row), the whole bank is used (for a single image:
    distances near 0, float rounding only, no colour scale to speak of).
    """
    bank: MemoryBank = network.memory_bank
    gen = torch.Generator().manual_seed(seed)
    ends = np.cumsum(counts).tolist()
    order = torch.randperm(len(cache), generator=gen)[:n_images].tolist()
    values = []
    for i in order:
        z = network.embeddings_of_features(cache[i])
        z = z[torch.randperm(len(z), generator=gen)[:per_image].to(z.device)]
        leave = (ends[i] - counts[i], ends[i]) if 0 < counts[i] < len(bank) else None
        values.append(bank.score_energy(z, leave_out=leave).cpu())
    return normal_quantiles(torch.cat(values).numpy())
