"""Mixture energy of one 256x256 image's embeddings (1024 at stride 8) in float64
(``GaussianMixture.energy``) against the scoring path (``score_energy``: float32 products and
float64 sums where the mixture's check allows). Interleaved rounds, median milliseconds, and
the largest difference between the two.

    python benchmarks/energy_precision.py                         # random K = 20 and 40, D = 128
    python benchmarks/energy_precision.py --model runs/mtd/model.pt   # also a fitted mixture

Embeddings: for a fitted model, 1024 draws around its own components (1x their scale);
for the random mixtures, standard normal.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pedenet.gmm import GaussianMixture


def random_mixture(k: int, d: int = 128) -> GaussianMixture:
    g = torch.Generator().manual_seed(k)
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64) / d ** 0.5
    return GaussianMixture(torch.full((k,), 1 / k, dtype=torch.float64),
                           torch.randn(k, d, generator=g, dtype=torch.float64),
                           a @ a.transpose(1, 2) + 0.1 * torch.eye(d, dtype=torch.float64))


def draws(mix: GaussianMixture, n: int = 1024) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    k, d = mix.mu.shape
    idx = torch.randint(0, k, (n,), generator=g)
    noise = torch.randn(n, d, 1, generator=g, dtype=torch.float64)
    return (mix.mu[idx] + (mix.chol[idx] @ noise).squeeze(-1)).float()


def measure(name: str, mix: GaussianMixture, z: torch.Tensor, rounds: int) -> None:
    with torch.inference_mode():
        exact, fast = mix.energy(z), mix.score_energy(z)
        times: dict[str, list[float]] = {"float64": [], "score_energy": []}
        fns = {"float64": lambda: mix.energy(z), "score_energy": lambda: mix.score_energy(z)}
        for r in range(rounds):
            for key in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                t0 = time.perf_counter()
                fns[key]()
                times[key].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = float(exact.max() - exact.min())
    print(f"threads {torch.get_num_threads()}, {name}: scoring {mix.scoring_dtype}; float64 "
          f"{med['float64']:.1f} ms, score_energy {med['score_energy']:.1f} ms "
          f"({med['float64'] / med['score_energy']:.2f}x); max |difference| "
          f"{float((fast - exact).abs().max()):.2e} (energy spread {spread:.0f})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a fitted model.pt whose mixture to measure too")
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    cases = [(f"random K {k}", random_mixture(k)) for k in (20, 40)]
    if args.model:
        import pedenet

        mix = pedenet.load(args.model).network.mixture
        cases.append((f"{args.model} (K {mix.mu.shape[0]}, D {mix.mu.shape[1]})", mix))
    for threads in (2, 1):
        torch.set_num_threads(threads)
        for name, mix in cases:
            z = draws(mix) if name.endswith(")") else torch.randn(1024, mix.mu.shape[1],
                                                                   generator=torch.Generator().manual_seed(2))
            measure(name, mix, z, args.rounds)


if __name__ == "__main__":
    main()
