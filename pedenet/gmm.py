"""Gaussian mixture built from soft memberships, and the sample energy (DAGMM, Zong et al. 2018).

Given embeddings z (N×D) and memberships γ (N×K, rows sum to 1) from the DE network:

    φ_k = mean_i γ_ik                                          (DAGMM eq. 5)
    μ_k = Σ_i γ_ik z_i / Σ_i γ_ik
    Σ_k = Σ_i γ_ik (z_i − μ_k)(z_i − μ_k)ᵀ / Σ_i γ_ik
    E(z) = −log Σ_k φ_k N(z | μ_k, Σ_k)                          (DAGMM eq. 6)
    P_cov = Σ_k Σ_j 1 / Σ_k[j, j]                                (DAGMM eq. 7)

Everything is computed in float64, with a ridge added to each covariance diagonal, a
Cholesky factorization for the log-determinant and Mahalanobis distance, and log-sum-exp
over components, so the energy stays finite for far-away embeddings. Scoring without
gradients (``GaussianMixture.score_energy``, what inference uses) forms the Mahalanobis
product in float32 where a check on the mixture's own samples shows it accurate (see there).
"""

from __future__ import annotations

import math

import torch

_MIN_WEIGHT = 1e-12
_CHUNK_BYTES = 4 * 2**20
"""Size of the N×(K·D) float64 product that ``GaussianMixture.log_prob_components`` forms
per chunk of rows: small enough to stay in the CPU caches while it is squared and summed.
A fixed 1024 rows (42 MB at K = 40, D = 128) made the energy memory-bound: for 1024
embeddings at K = 40 on 2 cores, 69.5 ms against 33.9 ms with 4 MiB chunks (102 rows; median
of 11 interleaved rounds, docs/benchmarks.md)."""


def chunk_rows(k: int, d: int, itemsize: int = 8) -> int:
    """Rows of z per matrix product for K components of dimension D (at least 16);
    ``itemsize``: bytes per element (8 float64, 4 float32)."""
    return max(16, _CHUNK_BYTES // (itemsize * k * d))


MIXED_PRECISION_TOL = 1e-5
"""Largest error of :meth:`GaussianMixture.score_energy` in its float32 form on the mixture's
own check samples, as a fraction of the spread (max − min) of the energy over the samples
drawn at the components' own scale: the differences between normal patches that a map or a
threshold resolves. Where the check finds more (ill-conditioned covariances, means far from
their centre), scoring stays in float64."""


def ridge_of(cov: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge per component: ``ridge`` × the mean variance of each covariance (K×D×D → K)."""
    mean_var = torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1)
    return ridge * mean_var.clamp_min(1e-12) + 1e-9


def gmm_params(z: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixture weights, means and covariances from memberships (differentiable).

    Args:
        z: N×D embeddings (any float dtype; computed in float64).
        gamma: N×K memberships, rows summing to 1.

    Returns:
        phi (K,), mu (K×D), cov (K×D×D), all float64.
    """
    z = z.double()
    gamma = gamma.double()
    nk = gamma.sum(0) + _MIN_WEIGHT
    phi = nk / len(z)
    mu = (gamma.T @ z) / nk[:, None]
    weighted = gamma.T[:, :, None] * z[None, :, :]  # K×N×D
    second = weighted.transpose(1, 2) @ z / nk[:, None, None]  # K×D×D, E_k[z zᵀ]
    cov = second - mu[:, :, None] * mu[:, None, :]
    return phi, mu, 0.5 * (cov + cov.transpose(1, 2))


class GaussianMixture:
    """Fixed mixture (φ, μ, Σ) ready to score embeddings; Cholesky factors and inverses precomputed.

    Args:
        phi: K mixture weights (sum 1). mu: K×D means. cov: K×D×D covariances.
        ridge: relative ridge (fraction of each component's mean variance added to its diagonal).
    Raises:
        ValueError if the shapes disagree or a covariance stays non positive-definite.
    """

    def __init__(self, phi: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor, ridge: float = 1e-3):
        phi, mu, cov = phi.double(), mu.double(), cov.double()
        k, d = mu.shape
        if phi.shape != (k,) or cov.shape != (k, d, d):
            raise ValueError(f"inconsistent GMM shapes: phi {tuple(phi.shape)}, mu {tuple(mu.shape)}, cov {tuple(cov.shape)}")
        self.phi, self.mu, self.cov, self.ridge = phi, mu, cov, ridge
        eye = torch.eye(d, dtype=torch.float64, device=cov.device)
        reg = cov + ridge_of(cov, ridge)[:, None, None] * eye
        chol, info = torch.linalg.cholesky_ex(reg)
        if bool((info != 0).any()):
            raise ValueError("a mixture covariance is not positive definite even after the ridge")
        self.chol = chol
        self._scoring_dtype: torch.dtype | None = None  # decided on first use (scoring_dtype)
        self._f32: tuple | None = None  # float32 copies of W, b, c for score_energy
        # Mahalanobis terms as one matrix product (see log_prob_components): the inverse
        # Cholesky factors L_k⁻¹ stacked into W ((K·D)×D), the offsets L_k⁻¹(μ_k − c) and the
        # centre c (the mean of the means; it only keeps z − c small, any c gives the same y).
        eye_k = torch.eye(d, dtype=torch.float64, device=cov.device).expand(k, d, d)
        self.chol_inv = torch.linalg.solve_triangular(chol, eye_k, upper=False)  # K×D×D
        self._centre = mu.detach().mean(0)
        self._w = self.chol_inv.reshape(k * d, d)
        self._offset = (self.chol_inv @ (mu - self._centre)[:, :, None]).reshape(k * d)
        self.log_norm = (
            torch.log(phi.clamp_min(_MIN_WEIGHT))
            - torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            - 0.5 * d * math.log(2 * math.pi)
        )

    def to(self, device) -> "GaussianMixture":
        return GaussianMixture(self.phi.to(device), self.mu.to(device), self.cov.to(device), self.ridge)

    def log_prob_components(self, z: torch.Tensor) -> torch.Tensor:
        """log φ_k + log N(z | μ_k, Σ_k): N×D → N×K float64 (differentiable in z and in φ, μ, Σ).

        The Mahalanobis terms ‖L_k⁻¹(z − μ_k)‖² of all K components come from one product
        y = (z − c) Wᵀ − b (N×K·D, float64; W, b precomputed), squared and summed per block
        of D columns, :func:`chunk_rows` rows at a time (a product of about
        :data:`_CHUNK_BYTES`: bounded memory, and faster on CPU than one product over a whole
        batch). Equal to a triangular solve per component to
        ~1e-15 relative and 2-3× faster on CPU; float32 would be faster still but misses
        1e-6 of the energy on ill-conditioned covariances (tests/test_gmm_speed.py).
        """
        return self.log_norm - 0.5 * self._mahalanobis(z.double(), self._w.T, self._offset, self._centre)

    def _mahalanobis(self, z: torch.Tensor, w_t: torch.Tensor, offset: torch.Tensor,
                     centre: torch.Tensor) -> torch.Tensor:
        """‖L_k⁻¹(z − μ_k)‖² for every row and component: N×D → N×K, in the dtype of the
        arguments (z, Wᵀ, b, c alike), :func:`chunk_rows` rows per product."""
        k, d = self.mu.shape
        z = z - centre
        rows = chunk_rows(k, d, itemsize=w_t.element_size())
        parts = []
        for start in range(0, max(len(z), 1), rows):
            y = torch.addmm(offset, z[start:start + rows], w_t, beta=-1)
            parts.append((y * y).reshape(-1, k, d).sum(-1))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """Sample energy E(z) = −log Σ_k φ_k N(z|μ_k,Σ_k) (DAGMM eq. 6): N×D → N float64."""
        return -torch.logsumexp(self.log_prob_components(z), dim=1)

    @torch.no_grad()
    def score_energy(self, z: torch.Tensor) -> torch.Tensor:
        """The energy of :meth:`energy` for scoring (no gradients): N×D → N float64.

        In mixed precision when :attr:`scoring_dtype` is float32: the product
        y = (z − c) Wᵀ − b and the squared norms per component in float32 (half the memory
        traffic of float64, about 2× faster on CPU), the log-normalizers and the log-sum-exp
        over components in float64. Otherwise the same as :meth:`energy`. The float32 form
        stays within :data:`MIXED_PRECISION_TOL` of the float64 energy on the mixture's
        check samples (tests/test_gmm_speed.py checks it on other samples too).
        """
        if self.scoring_dtype == torch.float64:
            return self.energy(z)
        return self._mixed_energy(z)

    def _mixed_energy(self, z: torch.Tensor) -> torch.Tensor:
        if self._f32 is None:
            self._f32 = (self._w.T.float().contiguous(), self._offset.float(), self._centre.float())
        q = self._mahalanobis(z.float(), *self._f32).double()
        return -torch.logsumexp(self.log_norm.detach() - 0.5 * q, dim=1)

    @property
    def scoring_dtype(self) -> torch.dtype:
        """float32 if :meth:`score_energy` may use mixed precision for this mixture, else
        float64. Decided once, on check samples: each mean and 16 draws per component at 1×
        and 4× its own scale (fixed seed); float32 when every one is within
        :data:`MIXED_PRECISION_TOL` × (spread of the 1× draws' float64 energies) of its float64
        energy."""
        if self._scoring_dtype is None:
            with torch.no_grad():
                g = torch.Generator(device="cpu").manual_seed(0)
                k, d = self.mu.shape
                noise = torch.randn(k, 16, d, generator=g, dtype=torch.float64).to(self.mu.device)
                draws = (self.chol.detach()[:, None] @ noise[..., None]).squeeze(-1)  # K×16×D
                mu = self.mu.detach()[:, None]
                near = (mu + draws).reshape(-1, d)
                z = torch.cat([self.mu.detach(), near, (mu + 4 * draws).reshape(-1, d)]).float()
                exact = self.energy(z)
                err = (self._mixed_energy(z) - exact).abs()
                spread = exact[k:k + len(near)].max() - exact[k:k + len(near)].min()
                ok = bool(torch.isfinite(err).all() and (err <= MIXED_PRECISION_TOL * spread).all())
            self._scoring_dtype = torch.float32 if ok else torch.float64
        return self._scoring_dtype

    def responsibilities(self, z: torch.Tensor) -> torch.Tensor:
        """Posterior probability of each component: N×D → N×K float64 (rows sum to 1)."""
        return torch.softmax(self.log_prob_components(z), dim=1)

    def penalty(self) -> torch.Tensor:
        """Covariance penalty P_cov = Σ_k Σ_j 1/Σ_k[j,j] (DAGMM eq. 7), ridge included."""
        diag = torch.diagonal(self.cov, dim1=-2, dim2=-1) + ridge_of(self.cov, self.ridge)[:, None]
        return (1.0 / diag).sum()

    def state_dict(self) -> dict:
        return {"phi": self.phi.cpu(), "mu": self.mu.cpu(), "cov": self.cov.cpu(), "ridge": float(self.ridge)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "GaussianMixture":
        return cls(state["phi"], state["mu"], state["cov"], float(state["ridge"]))


class GMMAccumulator:
    """Sufficient statistics Σγ, Σγz, Σγzzᵀ (float64) accumulated over many batches.

    ``add`` any number of (z, γ) batches, then ``finalize`` gives the mixture of all of them,
    identical (to rounding) to ``gmm_params`` on the concatenation.
    """

    def __init__(self, n_components: int, dim: int):
        self.s0 = torch.zeros(n_components, dtype=torch.float64)
        self.s1 = torch.zeros(n_components, dim, dtype=torch.float64)
        self.s2 = torch.zeros(n_components, dim, dim, dtype=torch.float64)
        self.count = 0

    @torch.no_grad()
    def add(self, z: torch.Tensor, gamma: torch.Tensor) -> None:
        """Add a batch: z N×D, gamma N×K."""
        z = z.detach().double().cpu()
        gamma = gamma.detach().double().cpu()
        self.s0 += gamma.sum(0)
        self.s1 += gamma.T @ z
        self.s2 += (gamma.T[:, :, None] * z[None, :, :]).transpose(1, 2) @ z
        self.count += len(z)

    @torch.no_grad()
    def add_hard(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch with hard memberships: z N×D, labels N integers in [0, K).

        The same as ``add`` with one-hot γ (each row belongs to component ``labels[i]``),
        without its K×N×D temporary, so that millions of rows can be added.
        Raises ValueError if a label is outside [0, K).
        """
        labels = labels.detach().cpu().long()
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.s0)):
            raise ValueError(f"labels must be in [0, {len(self.s0)}), got {labels.min()}..{labels.max()}")
        z = z.detach().cpu()
        for k in labels.unique().tolist():
            zk = z[labels == k].double()
            self.s0[k] += len(zk)
            self.s1[k] += zk.sum(0)
            self.s2[k] += zk.T @ zk
        self.count += len(z)

    def finalize(self, ridge: float = 1e-3) -> GaussianMixture:
        """The mixture of everything added. Raises ValueError if nothing was added.

        A component with (almost) no membership gets the global mean and covariance and a
        weight near zero, so it never produces a singular covariance.
        """
        if self.count == 0:
            raise ValueError("no embeddings were accumulated")
        total = self.s0.sum()
        g_mu = self.s1.sum(0) / total
        g_cov = self.s2.sum(0) / total - torch.outer(g_mu, g_mu)
        nk = self.s0.clamp_min(_MIN_WEIGHT)
        mu = self.s1 / nk[:, None]
        cov = self.s2 / nk[:, None, None] - torch.einsum("kd,ke->kde", mu, mu)
        empty = self.s0 < 1e-6 * total
        mu[empty] = g_mu
        cov[empty] = g_cov
        cov = 0.5 * (cov + cov.transpose(1, 2))
        phi = self.s0 / self.count
        return GaussianMixture(phi, mu, cov, ridge)
