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
    s64 = data["scratch_patch_vs_dense_64"]
    assert (s64["patch_size"], s64["stride"], s64["n_patches"]) == (64, 8, 25 * 25)
    assert s64["max_abs_difference"] < 1e-3
    for r in (s, s64):  # the measured ratio = work ratio x (dense / patch-by-patch GFLOP/s)
        assert r["ratio_patchwise_over_dense"] == pytest.approx(
            r["work_ratio"] * r["dense_gflops_achieved"] / r["patchwise_gflops_achieved"])
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
    # the native rows say how they were processed, not a bare "image_size 0"
    assert "103x300 (processed at native size)" in result.output
    assert "(image_size 0)" not in result.output


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


def _scratch_macs(spec, d, side):
    """Multiply-accumulates of the scratch encoder's valid convolutions on a side×side input,
    counted by hand: out_side² · c_out · c_in · k² per layer, then the 1×1 projection to D."""
    macs, cin = 0, 3
    for cout, k, stride in spec:
        side = (side - k) // stride + 1
        macs += side * side * cout * cin * k * k
        cin = cout
    return macs + side * side * d * cin


@pytest.mark.parametrize("patch, spec", [
    (32, [(32, 4, 2), (64, 3, 2), (128, 3, 1), (128, 3, 1), (128, 3, 1)]),
    (64, [(32, 4, 2), (64, 3, 2), (128, 3, 2), (128, 3, 1), (128, 3, 1), (128, 3, 1)]),
])
def test_scratch_work_ratio_is_the_hand_count(patch, spec):
    from pedenet.benchmark import EMBEDDING_DIM, bench_scratch_patchwise

    r = bench_scratch_patchwise(quick=True, patch_size=patch)
    stride = 4 if patch == 32 else 8
    n = ((256 - patch) // stride + 1) ** 2
    dense = _scratch_macs(spec, EMBEDDING_DIM, 256)
    per_patch = _scratch_macs(spec, EMBEDDING_DIM, patch)
    assert r["n_patches"] == n
    assert r["dense_gflop"] == pytest.approx(2 * dense / 1e9)
    assert r["patchwise_gflop"] == pytest.approx(2 * per_patch * n / 1e9)
    assert r["work_ratio"] == pytest.approx({32: 10.50, 64: 17.92}[patch], abs=0.01)
    assert r["max_abs_difference"] < 1e-3


def test_flops_of_a_distance_model_leave_out_the_export_it_cannot_have():
    """A run scored by distance cannot be exported: the benchmark measures it without the
    onnxruntime rows instead of failing at the end (and losing every figure)."""
    import pedenet
    from pedenet.benchmark import _onnxruntime_seconds, bench_flops

    pytest.importorskip("onnxruntime")  # without it, no onnxruntime rows whatever the model
    from pedenet.builtin import normal_crops

    model = pedenet.PEDENet(steps=0, image_size=64, n_components=2, scoring="distance",
                            memory_bank_size=500, calibration_fraction=0.0)
    model.fit(normal_crops("grass", 4, size=64, seed=0), progress=False)
    assert _onnxruntime_seconds(model, 64, (1,), quick=True) is None
    r = bench_flops(model, None, quick=True)
    assert "onnxruntime" not in r and r["gflop_per_image"] > 0 and r["encoder_gflops_achieved"] > 0
