"""Energy of 1024 embeddings (one 256x256 image at stride 8) under a random K-component,
D = 128 mixture, for several row-chunk sizes (pedenet.gmm.chunk_rows); interleaved rounds,
median milliseconds. Run: python benchmarks/energy_chunks.py"""
import time, torch, statistics, pedenet.gmm as G
torch.manual_seed(0)
d = 128
def mix(k):
    a = torch.randn(k, d, d, dtype=torch.float64) / d ** 0.5
    return G.GaussianMixture(torch.full((k,), 1 / k, dtype=torch.float64), torch.randn(k, d, dtype=torch.float64),
                             a @ a.transpose(1, 2) + 0.1 * torch.eye(d))
z = torch.randn(1024, d)
orig = G.chunk_rows
for th in (2, 1):
    torch.set_num_threads(th)
    for k in (20, 40):
        m = mix(k); res = {}
        sizes = sorted({64, 128, orig(k, d), 256, 512, 1024})
        for r in range(11):
            for ch in sizes:
                G.chunk_rows = lambda k_, d_, ch=ch: ch
                t0 = time.perf_counter(); m.energy(z); res.setdefault(ch, []).append((time.perf_counter() - t0) * 1e3)
        G.chunk_rows = orig
        print(f"threads {th} K {k} (default now {orig(k, d)} rows):",
              ", ".join(f"{ch}: {statistics.median(v):.1f}" for ch, v in res.items()), flush=True)
