"""256x256 single-image latency of ``PEDENet.anomaly_map`` in several fresh processes.

``pedenet benchmark`` measures the latency once, in one process; on a shared VM that figure
has varied 56-94 ms p50 between runs of the same code. This script starts ``--processes``
fresh Python processes one after the other; each builds the benchmark's default model
(untrained default, ``pedenet.benchmark.default_model``), warms up for 3 s and times
``--calls`` calls of each stage on the same 256x256 image: preprocessing (array to tensor),
the encoder (``embed``), the mixture energy (``energy_of_embeddings``), the map (upsampling
and smoothing, ``grid_to_map``), and the whole ``anomaly_map`` call. It prints every
process's p50 per stage (milliseconds) and, over processes, the median, min and max.

    python benchmarks/latency_spread.py                    # 5 processes, 40 calls each
    python benchmarks/latency_spread.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

STAGES = ("preprocess", "encoder", "energy", "map", "anomaly_map")


def child(calls: int) -> dict:
    import numpy as np
    import torch

    from pedenet.benchmark import _times, _warm_up, default_model
    from pedenet.scoring import grid_to_map, to_tensor

    model = default_model()
    net, cfg = model.network, model.config
    arr = np.random.default_rng(0).random((256, 256, 3), dtype=np.float32)
    x = to_tensor(arr, cfg.image_size, cfg.keep_aspect)
    with torch.inference_mode():
        emb = net.embed(x)
        grid = net.energy_of_embeddings(emb)[0].numpy()
    stages = {
        "preprocess": lambda: to_tensor(arr, cfg.image_size, cfg.keep_aspect),
        "encoder": lambda: net.embed(x),
        "energy": lambda: net.energy_of_embeddings(emb),
        "map": lambda: grid_to_map(grid, stride=net.stride, offset=net.offset,
                                   processed_size=tuple(x.shape[-2:]), original_size=arr.shape[:2],
                                   sigma=cfg.smoothing_sigma),
        "anomaly_map": lambda: model.anomaly_map(arr),
    }
    _warm_up(stages["anomaly_map"], 3.0)
    out = {}
    with torch.inference_mode():
        for name in STAGES:
            out[name] = 1e3 * float(np.median(_times(stages[name], calls, warmup=1)))
    out["torch_threads"] = torch.get_num_threads()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=5)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.calls)))
        return 0
    runs = []
    print(f"load average at start: {os.getloadavg()}")
    print("process | " + " | ".join(f"{s} p50 ms" for s in STAGES))
    for i in range(args.processes):
        res = subprocess.run([sys.executable, __file__, "--child", "--calls", str(args.calls)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            return res.returncode
        r = json.loads(res.stdout.strip().splitlines()[-1])
        runs.append(r)
        print(f"{i} | " + " | ".join(f"{r[s]:.1f}" for s in STAGES))
    summary = {s: {"median": statistics.median(r[s] for r in runs), "min": min(r[s] for r in runs),
                   "max": max(r[s] for r in runs)} for s in STAGES}
    for s in STAGES:
        print(f"{s}: median {summary[s]['median']:.1f} ms over {len(runs)} processes "
              f"(min {summary[s]['min']:.1f}, max {summary[s]['max']:.1f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"processes": runs, "summary": summary, "calls": args.calls}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
