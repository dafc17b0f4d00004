"""The mixture's fast scoring path: one float64 matrix product with the inverse Cholesky factors.

``GaussianMixture.log_prob_components`` computes every Mahalanobis term as
‖(z − c) Wᵀ − b‖² per block of D columns (W = the stacked L_k⁻¹, precomputed). It must give
the per-component triangular solve it replaced (written out below as the reference) and
scipy's mixture density to within 1e-6 of the energy (1e-4 absolute for energies near 0), on
well-conditioned and ill-conditioned covariances, and keep the gradients training uses.
"""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from pedenet import gmm
from pedenet.gmm import GaussianMixture, gmm_params, ridge_of


def reference_log_prob(mix: GaussianMixture, z: torch.Tensor) -> torch.Tensor:
    """The former implementation: a batched triangular solve per component (N×K float64)."""
    diff = z.double()[None, :, :] - mix.mu[:, None, :]
    y = torch.linalg.solve_triangular(mix.chol, diff.transpose(1, 2), upper=False)
    return (mix.log_norm[:, None] - 0.5 * (y * y).sum(1)).T


def random_mixture(k: int, d: int, cond: float, offset: float, seed: int):
    """φ, μ, Σ with eigenvalues log-uniform in [sd²/cond, sd²] and means around ``offset``."""
    rng = np.random.default_rng(seed)
    phi = rng.dirichlet(np.ones(k))
    mu = rng.normal(size=(k, d)) + offset
    cov = []
    for _ in range(k):
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        ev = np.exp(rng.uniform(np.log(1.0 / cond), 0.0, d))
        cov.append((q * ev) @ q.T)
    return phi, mu, np.array(cov)


def samples(mu, cov, n, spread, seed):
    """n embeddings drawn from the components, ``spread`` × their own scale from the means."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, len(mu), n)
    chol = np.linalg.cholesky(cov)
    return mu[k] + spread * np.einsum("nij,nj->ni", chol[k], rng.normal(size=(n, mu.shape[1])))


def assert_energy_close(actual: torch.Tensor, expected: torch.Tensor):
    """Within 1e-6 relative or 1e-4 absolute, whichever is looser."""
    err = (actual - expected).abs()
    tol = torch.clamp(1e-6 * expected.abs(), min=1e-4)
    assert bool((err <= tol).all()), f"worst error / tolerance {float((err / tol).max()):.3g}"


CASES = {  # name: (cond, offset, ridge, spread)
    "well-conditioned": (10.0, 0.0, 1e-3, 1.0),
    "far from the data": (10.0, 0.0, 1e-3, 6.0),
    "ill-conditioned": (1e6, 0.0, 1e-3, 1.0),
    "ill-conditioned, no ridge": (1e6, 0.0, 0.0, 1.0),
    "ill-conditioned, offset means": (1e3, 50.0, 1e-3, 2.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_energy_and_responsibilities_match_the_triangular_solve(case):
    cond, offset, ridge, spread = CASES[case]
    phi, mu, cov = random_mixture(10, 64, cond, offset, seed=len(case))
    mix = GaussianMixture(torch.tensor(phi), torch.tensor(mu), torch.tensor(cov), ridge)
    # float32 embeddings, as the encoder gives them
    z = torch.tensor(samples(mu, cov, 3000, spread, seed=1), dtype=torch.float32)
    ref = reference_log_prob(mix, z)
    lp = mix.log_prob_components(z)
    assert lp.dtype == torch.float64 and lp.shape == (3000, 10)
    assert_energy_close(mix.energy(z), -torch.logsumexp(ref, 1))
    torch.testing.assert_close(mix.responsibilities(z), torch.softmax(ref, 1), rtol=0, atol=1e-9)


@pytest.mark.parametrize("cond", [10.0, 1e5])
def test_energy_matches_scipy_at_realistic_scale(cond):
    """K=10, D=64, energies up to the thousands, against scipy's densities."""
    phi, mu, cov = random_mixture(10, 64, cond, 3.0, seed=7)
    mix = GaussianMixture(torch.tensor(phi), torch.tensor(mu), torch.tensor(cov), 1e-3)
    z = np.concatenate([samples(mu, cov, 300, 2.0, seed=2), samples(mu, cov, 100, 8.0, seed=3)])
    reg = cov + ridge_of(torch.tensor(cov), 1e-3).numpy()[:, None, None] * np.eye(64)
    logp = np.stack([np.log(phi[k]) + multivariate_normal(mu[k], reg[k]).logpdf(z) for k in range(10)], 1)
    energy = mix.energy(torch.tensor(z))
    assert float(energy.max()) > 1000
    assert_energy_close(energy, torch.tensor(-logsumexp(logp, axis=1)))
    post = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
    np.testing.assert_allclose(mix.responsibilities(torch.tensor(z)).numpy(), post, rtol=0, atol=1e-9)


def test_chunked_rows_equal_one_pass_and_empty_input():
    phi, mu, cov = random_mixture(3, 5, 100.0, 0.0, seed=3)
    mix = GaussianMixture(torch.tensor(phi), torch.tensor(mu), torch.tensor(cov))
    z = torch.tensor(samples(mu, cov, 2 * gmm.chunk_rows(3, 5) + 7, 2.0, seed=4))
    torch.testing.assert_close(mix.log_prob_components(z), reference_log_prob(mix, z), rtol=1e-12, atol=1e-10)
    assert mix.energy(z[:0]).shape == (0,) and mix.log_prob_components(z[:0]).shape == (0, 3)


def test_inverse_factors_are_precomputed():
    phi, mu, cov = random_mixture(4, 6, 1e4, 0.0, seed=5)
    mix = GaussianMixture(torch.tensor(phi), torch.tensor(mu), torch.tensor(cov))
    eye = torch.eye(6, dtype=torch.float64).expand(4, 6, 6)
    torch.testing.assert_close(mix.chol_inv @ mix.chol, eye, rtol=0, atol=1e-10)


@pytest.mark.parametrize("grad_to_z", [False, True])
def test_gradients_equal_the_reference_formula(grad_to_z):
    """Training builds the mixture from memberships each step (``gmm_params``) and
    backpropagates the mean energy to them, and with ``energy_trains_encoder`` to z."""
    def leaves():
        z = (torch.randn(300, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 + 1)
        logits = torch.randn(300, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        return z.requires_grad_(grad_to_z), logits.requires_grad_(True)

    def grads(energy_fn):
        z, logits = leaves()
        phi, mu, cov = gmm_params(z, torch.softmax(logits, 1))
        mix = GaussianMixture(phi, mu, cov, 1e-3)
        (energy_fn(mix, z).mean() + 0.005 * mix.penalty()).backward()
        return [t.grad for t in (z, logits) if t.requires_grad]

    new = grads(lambda mix, z: mix.energy(z))
    old = grads(lambda mix, z: -torch.logsumexp(reference_log_prob(mix, z), 1))
    assert len(new) == (2 if grad_to_z else 1)
    for a, b in zip(new, old):
        assert torch.isfinite(a).all() and float(a.abs().max()) > 0
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


# ---- scoring in mixed precision (GaussianMixture.score_energy, what inference uses)

EXPECTED_SCORING_DTYPE = {  # the check's decision per case: float32 only where it is accurate
    "well-conditioned": torch.float32,
    "far from the data": torch.float32,
    "ill-conditioned": torch.float64,
    "ill-conditioned, no ridge": torch.float64,
    "ill-conditioned, offset means": torch.float64,
}


@pytest.mark.parametrize("case", list(CASES))
def test_score_energy_is_accurate_on_samples_the_check_did_not_see(case):
    """Samples other than the check's (seed 1 against 0, the case's own spread): the error of
    score_energy stays within MIXED_PRECISION_TOL of the normal energies' spread, in float32
    where the check chose it and exactly (float64 path) where it did not."""
    cond, offset, ridge, spread = CASES[case]
    phi, mu, cov = random_mixture(10, 64, cond, offset, seed=len(case))
    mix = GaussianMixture(torch.tensor(phi), torch.tensor(mu), torch.tensor(cov), ridge)
    z = torch.tensor(samples(mu, cov, 3000, spread, seed=1), dtype=torch.float32)
    assert mix.scoring_dtype == EXPECTED_SCORING_DTYPE[case]
    exact, fast = mix.energy(z), mix.score_energy(z)
    assert fast.dtype == torch.float64 and fast.shape == (3000,)
    if mix.scoring_dtype == torch.float64:
        assert torch.equal(fast, exact)
    else:
        assert not torch.equal(fast, exact)  # the float32 path really ran
        normal = mix.energy(torch.tensor(samples(mu, cov, 3000, 1.0, seed=1), dtype=torch.float32))
        tol = gmm.MIXED_PRECISION_TOL * float(normal.max() - normal.min())
        assert float((fast - exact).abs().max()) <= tol


def test_score_energy_in_chunks_and_on_empty_input():
    phi, mu, cov = random_mixture(3, 5, 10.0, 0.0, seed=3)
    mix = GaussianMixture(torch.tensor(phi), torch.tensor(mu), torch.tensor(cov))
    assert mix.scoring_dtype == torch.float32
    z = torch.tensor(samples(mu, cov, 2 * gmm.chunk_rows(3, 5, itemsize=4) + 7, 2.0, seed=4))
    torch.testing.assert_close(mix.score_energy(z), mix.energy(z), rtol=1e-5, atol=1e-4)
    assert mix.score_energy(z[:0]).shape == (0,)
