"""Exported models (ONNX via onnxruntime, TorchScript) reproduce PEDENet.anomaly_map.

What is compared: the exported model's map for an input already at the processed size
(image_size×image_size, or any size when image_size is 0, so no resize differs) against
``PEDENet.anomaly_map`` of the same image, as max |difference| / (max − min of the reference
map). The tolerance is 1e-4 of that range; the maps' absolute values (energies, here from
about −200 to 10⁴) are irrelevant to anomaly ranking, their spread is what matters. Measured:
~2e-6 (ONNX) and ~1e-6 (TorchScript), float32 rounding of the encoder and the smoothing.
"""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pedenet import PEDENet
from pedenet.builtin import make_builtin_dataset
from pedenet.cli import main
from pedenet.export import AnomalyMapModule, build_module, export_model, read_metadata
from pedenet.scoring import border_widths, image_score, to_tensor
from pedenet.visualization import color_range, color_source

TOL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = make_builtin_dataset(tmp_path_factory.mktemp("export") / "ds", categories=("grass",),
                                n_train=4, n_test_good=1, n_test_defect=1, size=64)
    return sorted((root / "grass" / "train" / "good").glob("*.png")), root / "grass" / "test"


def _fit(images, **cfg):
    return PEDENet(steps=0, de_init="random", **cfg).fit(images[0], progress=False)


@pytest.fixture(scope="module")
def scratch64(images):
    return _fit(images, encoder="scratch", image_size=64)


@pytest.fixture(scope="module")
def pretrained_native(images):
    # a large score fraction: the score clearly differs from the maximum, and k = round(f·H·W)
    # must follow each input's size in the exported graph (traced at 256×256)
    return _fit(images, encoder="pretrained", image_size=0, image_score_fraction=0.05)


def _test_images(images, sizes):
    from pedenet.data import load_image

    test = sorted(images[1].rglob("*.png"))
    rng = np.random.default_rng(0)
    out = [load_image(p) for p in test]  # 64×64 test images, one defective
    for h, w in sizes:
        out.append(rng.random((h, w, 3)).astype(np.float32))
    return out


def _run_onnx(path, x: np.ndarray):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["anomaly_map", "score"], {"image": x})


def _declared_shapes(path):
    """{name: shape} of the ONNX file's inputs and outputs as onnxruntime reads them."""
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {io.name: io.shape for io in sess.get_inputs() + sess.get_outputs()}


def _run_torchscript(path, x: np.ndarray):
    ts = torch.jit.load(str(path))
    with torch.no_grad():
        m, s = ts(torch.from_numpy(x))
    return m.numpy(), s.numpy()


def _check(model, arr, amap, score):
    ref = model.anomaly_map(arr)
    assert amap.shape == ref.shape and amap.dtype == np.float32
    spread = float(ref.max() - ref.min())
    assert spread > 0
    err = float(np.abs(amap - ref).max()) / spread
    assert err <= TOL, (err, spread)
    # the model's image score (mean of the top image_score_fraction of pixels; k follows the size)
    assert model.config.image_score_fraction > 0
    expected = image_score(ref, model.config.image_score_fraction, model.config.image_score_border)
    assert abs(float(score) - expected) <= TOL * spread
    return (float(ref.max()) - expected) / spread


def _exported(model, tmp_path, fmt):
    """Export ``model`` as ``fmt``; return the file and the function that runs it."""
    if fmt == "onnx":
        pytest.importorskip("onnx")
    path = export_model(model, tmp_path / f"m.{fmt}", fmt)
    return path, (_run_onnx if fmt == "onnx" else _run_torchscript)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_anomaly_map_fixed_size(scratch64, images, tmp_path, fmt):
    path, run = _exported(scratch64, tmp_path, fmt)
    arrs = _test_images(images, [])
    for arr in arrs:
        x = to_tensor(arr, 64).numpy()
        amap, score = run(path, x)
        _check(scratch64, arr, amap[0], score[0])
    # a batch of two gives each image's own map
    x = np.concatenate([to_tensor(a, 64).numpy() for a in arrs[:2]])
    amap, score = run(path, x)
    assert amap.shape == (2, 64, 64) and score.shape == (2,)
    for i in range(2):
        _check(scratch64, arrs[i], amap[i], score[i])
    meta = read_metadata(path)
    assert meta["image_size"] == 64 and meta["smoothing_sigma"] == 4.0
    assert meta["thresholds"] == scratch64.thresholds() and meta["thresholds"]["n_calibration"] == 1
    # 1 held-out image, whose median pixel this untrained mixture's training scale would
    # already paint red: the held-out scale
    vmin, vmax = color_range(scratch64)
    assert color_source(scratch64) == "held_out"
    assert meta["color_range"] == [vmin, vmax]
    assert vmin == float(np.median(scratch64.calibration.pixel_scores))
    if fmt == "onnx":  # what a deployment tool reads off the file: a fixed 64 x 64 map
        assert _declared_shapes(path) == {"image": ["batch", 3, 64, 64],
                                          "anomaly_map": ["batch", 64, 64], "score": ["batch"]}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_any_size_when_image_size_is_zero(pretrained_native, images, tmp_path, fmt):
    path, run = _exported(pretrained_native, tmp_path, fmt)
    below_max = []
    for arr in _test_images(images, [(70, 90), (41, 120)]):
        x = to_tensor(arr, 0).numpy()
        amap, score = run(path, x)
        below_max.append(_check(pretrained_native, arr, amap[0], score[0]))
    assert min(below_max) > 100 * TOL  # the top-5 % mean, not the maximum
    if fmt == "onnx":
        assert _declared_shapes(path) == {"image": ["batch", 3, "height", "width"],
                                          "anomaly_map": ["batch", "height", "width"],
                                          "score": ["batch"]}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_leaves_the_edge_band_out_of_the_score_at_any_size(pretrained_native, images,
                                                                  tmp_path, fmt):
    """image_score_border: the band's width follows each input's size in the exported graph
    (traced at 256×256) and the score equals pedenet.scoring.image_score with the band."""
    model = copy.deepcopy(pretrained_native)
    model.config = dataclasses.replace(model.config, image_score_border=0.1)
    path, run = _exported(model, tmp_path, fmt)
    assert read_metadata(path)["image_score_border"] == 0.1
    for arr in _test_images(images, [(70, 90), (41, 120)]):
        amap, score = run(path, to_tensor(arr, 0).numpy())
        _check(model, arr, amap[0], score[0])


@pytest.mark.parametrize("fraction", [0.0, 0.05])
def test_exported_score_ignores_a_peak_in_the_edge_band(scratch64, fraction):
    """A map whose highest pixels lie in the band: the module's score, called in PyTorch (the
    exported graph is checked above), is the numpy image_score of the inner pixels, for bands
    of no pixel (33 × 35 at 0.02), a few pixels and nearly half of each side."""
    rng = np.random.default_rng(1)
    for h, w, border in [(64, 64, 0.05), (41, 120, 0.1), (33, 35, 0.02), (20, 50, 0.45)]:
        module = AnomalyMapModule(scratch64.network, 4.0, score_fraction=fraction, score_border=border)
        amap = rng.random((h, w)).astype(np.float32)
        bh, bw = border_widths((h, w), border)
        band = np.ones((h, w), bool)
        band[bh:h - bh, bw:w - bw] = False
        amap[band] += 100.0  # the band holds every one of the largest pixels (when it exists)
        got = module.score(torch.from_numpy(amap)[None]).item()
        expected = image_score(amap, fraction, border)
        assert got == pytest.approx(expected, rel=1e-6)
        assert expected < 1.0 + 1e-6  # the inner pixels only
        if band.any():
            assert image_score(amap, fraction) > 100.0


def test_float32_energy_export_also_meets_the_tolerance(scratch64, images):
    module = build_module(scratch64, energy_dtype=torch.float32)
    arr = _test_images(images, [])[-1]
    with torch.no_grad():
        amap, score = module(to_tensor(arr, 64))
    _check(scratch64, arr, amap[0].numpy(), score[0].item())


@pytest.mark.parametrize("scoring", [torch.float32, torch.float64])
def test_auto_energy_precision_follows_the_models_scoring(scratch64, images, scoring):
    """The default export ("auto") computes the Mahalanobis products in the precision the
    mixture scores with (GaussianMixture.scoring_dtype) and sums in float64, both ways."""
    mix = scratch64.network.mixture
    decided = mix.scoring_dtype
    mix._scoring_dtype = scoring  # as the mixture's own accuracy check could decide
    try:
        module = build_module(scratch64)
        assert module.mu.dtype == module.chol_inv_t.dtype == scoring
        assert module.log_norm.dtype == torch.float64
        arr = _test_images(images, [])[-1]
        with torch.no_grad():
            amap, score = module(to_tensor(arr, 64))
        _check(scratch64, arr, amap[0].numpy(), score[0].item())
    finally:
        mix._scoring_dtype = decided
    with pytest.raises(ValueError, match="energy_dtype"):
        build_module(scratch64, energy_dtype="float16")


def test_export_cli(scratch64, tmp_path):
    pytest.importorskip("onnx")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    scratch64.save(run_dir / "model.pt")
    result = CliRunner().invoke(main, ["export", str(run_dir), "--format", "onnx",
                                       "--out", str(tmp_path / "out" / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "m.onnx").is_file()
    meta = read_metadata(tmp_path / "out" / "m.onnx")
    assert json.dumps(meta)
    result = CliRunner().invoke(main, ["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x.onnx")])
    assert result.exit_code != 0 and "Error:" in result.output and "Traceback" not in result.output


def test_export_cli_takes_the_format_from_the_extension(scratch64, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    scratch64.save(run_dir / "model.pt")
    result = CliRunner().invoke(main, ["export", str(run_dir), "--out", str(tmp_path / "m.ts")])
    assert result.exit_code == 0, result.output
    assert "exported torchscript" in result.output
    torch.jit.load(str(tmp_path / "m.ts"))  # a TorchScript file, not ONNX
    # given to a pedenet command as the run, it is named for what it is (no PyTorch advice)
    image = tmp_path / "img.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(image)
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "m.ts"), str(image), "--out",
                                       str(tmp_path / "p")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "m.ts: an exported TorchScript model (`pedenet export`)" in result.output
    assert "weights_only" not in result.output and "corrupt" not in result.output
    # model.pt is refused as an export name anywhere: it marks a run's checkpoint
    result = CliRunner().invoke(main, ["export", str(run_dir), "--out", str(tmp_path / "other" / "model.pt"),
                                       "--overwrite"])
    assert result.exit_code == 2 and "name of a run's checkpoint" in result.output
    assert not (tmp_path / "other" / "model.pt").exists()
    # so are the names of records: another run's config.json would be replaced by a model
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    result = CliRunner().invoke(main, ["export", str(run_dir), "--out", str(tmp_path / "other" / "config.json"),
                                       "--format", "onnx", "--overwrite"])
    assert result.exit_code == 2 and "is for records" in result.output
    assert (tmp_path / "other" / "config.json").read_text() == "{}"
    # an explicit format that contradicts the extension is refused before any work
    result = CliRunner().invoke(main, ["export", str(run_dir), "--format", "torchscript",
                                       "--out", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2
    assert "names an onnx file but --format is torchscript" in result.output
    assert "x.ts" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.onnx").exists()
    result = CliRunner().invoke(main, ["export", str(run_dir), "--format", "onnx",
                                       "--out", str(tmp_path / "Y.PTH")])
    assert result.exit_code == 2 and "names a torchscript file but --format is onnx" in result.output
    # .pt is a TorchScript name, but never the run's own checkpoint
    before = (run_dir / "model.pt").read_bytes()
    result = CliRunner().invoke(main, ["export", str(run_dir), "--out", str(run_dir / "model.pt")])
    assert result.exit_code == 2 and "would overwrite one of the run's own files" in result.output
    assert (run_dir / "model.pt").read_bytes() == before
    # an extension that names no model format is refused rather than written as ONNX
    (run_dir / "config.json").write_text("{}")
    for name in ("config.json", "model"):
        result = CliRunner().invoke(main, ["export", str(run_dir), "--out", str(run_dir / name)])
        assert result.exit_code == 2 and "cannot tell the format" in result.output, result.output
        stem = name.split(".")[0]
        assert f"{stem}.onnx" in result.output and f"{stem}.ts" in result.output
    assert (run_dir / "config.json").read_text() == "{}" and not (run_dir / "model").exists()
    # the run's own files are refused even with --format and --overwrite
    for name in ("config.json", "history.json", "metrics.json", "resume.pt", "overlays"):
        fmt = "torchscript" if name.endswith(".pt") else "onnx"
        result = CliRunner().invoke(main, ["export", str(run_dir), "--format", fmt, "--out",
                                           str(run_dir / name), "--overwrite"])
        assert result.exit_code == 2, result.output
        assert "would overwrite one of the run's own files" in result.output
    assert (run_dir / "config.json").read_text() == "{}"
    # an existing file is replaced only with --overwrite
    before = (tmp_path / "m.ts").read_bytes()
    (tmp_path / "m.ts").write_bytes(b"an older export")
    result = CliRunner().invoke(main, ["export", str(run_dir), "--out", str(tmp_path / "m.ts")])
    assert result.exit_code == 2 and "exists; pass --overwrite" in result.output
    assert (tmp_path / "m.ts").read_bytes() == b"an older export"
    result = CliRunner().invoke(main, ["export", str(run_dir), "--out", str(tmp_path / "m.ts"),
                                       "--overwrite", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.ts").read_bytes()[:2] == before[:2]  # a TorchScript (zip) file again


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_to_an_unwritable_place_names_the_file(tmp_path, scratch64, fmt):
    blocker = tmp_path / "a_file"  # --out under a file: no folder can be made there
    blocker.write_text("x")
    with pytest.raises(OSError, match="m.out: cannot write the exported model there"):
        export_model(scratch64, blocker / "m.out", fmt)
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_export_refuses_checkpoint_names_and_folders(tmp_path, scratch64):
    """The Python API refuses what the CLI refuses: a checkpoint's name (a run's model.pt would be
    replaced by a file pedenet.load cannot read), and a folder (named, no temporary file left)."""
    import pedenet

    scratch64.save(tmp_path / "run" / "model.pt")
    for name in ("model.pt", "Resume.PT"):
        with pytest.raises(ValueError, match="named as a pedenet checkpoint"):
            export_model(scratch64, tmp_path / "run" / name, "torchscript")
    pedenet.load(tmp_path / "run")  # still the checkpoint
    with pytest.raises(IsADirectoryError, match="run: is a folder"):
        export_model(scratch64, tmp_path / "run", "onnx")
    with pytest.raises(IsADirectoryError, match="run: is a folder"):
        scratch64.save(tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.pt"]
