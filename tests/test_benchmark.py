"""`pedenet benchmark --quick` writes every figure, each positive."""

import json

import pytest
import torch

from click.testing import CliRunner

from pedenet.cli import main


def _positive_numbers(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _positive_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _positive_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def test_benchmark_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["benchmark", "--quick", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert {"machine", "model", "inference", "scratch_patch_vs_dense", "scoring", "training",
            "flops", "peak_rss_mb_process", "seconds_total"} <= set(data)
    sizes = [tuple(r["input_size"]) for r in data["inference"]]
    assert sizes == [(256, 256), (103, 300), (400, 632)]
    for r in data["inference"]:
        for k in ("latency_ms_p50", "latency_ms_p95", "images_per_s", "peak_rss_mb"):
            assert r[k] > 0, k
        assert r["latency_ms_p95"] >= r["latency_ms_p50"]
    s = data["scratch_patch_vs_dense"]
    assert s["n_patches"] == 57 * 57 and s["ratio_patchwise_over_dense"] > 0
    assert s["max_abs_difference"] < 1e-3
    assert [r["n_train_images"] for r in data["scoring"]] == [100, 1000]
    for r in data["scoring"]:
        for k in ("gmm_ms_per_image", "nn_ms_per_image", "nn_coreset10_ms_per_image",
                  "ratio_nn_over_gmm", "ratio_coreset10_over_gmm", "peak_rss_mb"):
            assert r[k] > 0, k
    fl = data["scoring_flatness"]
    assert fl["n_train_images"] == [100, 1000] and fl["rounds"] == 3
    assert fl["ratio_largest_over_smallest"] == pytest.approx(
        fl["gmm_ms_per_image_median"][1] / fl["gmm_ms_per_image_median"][0])
    assert data["training"]["steps_per_s"] > 0
    f = data["flops"]
    for k in ("gflop_per_image", "encoder_gflops_achieved", "end_to_end_gflops_achieved"):
        assert f[k] > 0, k
    assert f["ceiling"]["gflops"] > 0
    for path, value in _positive_numbers({k: data[k] for k in ("inference", "scoring", "training")}):
        if not path.endswith(("max_abs_difference", "image_size")):
            assert value > 0, path
    assert "images/s" in result.output and "GFLOP/s" in result.output


def test_mixture_from_bank_recovers_separated_clusters():
    from pedenet.benchmark import mixture_from_bank

    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    counts = [600, 300, 100]
    bank = torch.cat([c + torch.randn(n, 2, generator=g) for c, n in zip(centres, counts)])
    mix = mixture_from_bank(bank, centres + 1.0, ridge=0.0, chunk=256)  # several chunks
    torch.testing.assert_close(mix.phi, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64))
    torch.testing.assert_close(mix.mu[1], bank[600:900].double().mean(0))
    torch.testing.assert_close(mix.cov[0], torch.cov(bank[:600].double().T, correction=0))
