"""Training on the built-in dataset: no collapse, determinism, save/load round trip."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import pedenet
from pedenet.builtin import make_builtin_dataset
from pedenet.checkpoint import CheckpointError
from pedenet.data import test_samples, train_samples
from pedenet.scoring import image_score


@pytest.fixture(scope="module")
def gravel(tmp_path_factory):
    root = make_builtin_dataset(tmp_path_factory.mktemp("builtin"), categories=("gravel",), n_train=16,
                                n_test_good=3, n_test_defect=3, size=128, seed=0)
    return root / "gravel"


@pytest.fixture(scope="module")
def fitted(gravel):
    torch.set_num_threads(1)
    paths = [s.path for s in train_samples(gravel)]
    return pedenet.PEDENet(steps=75, image_size=128, seed=3).fit(paths, progress=False)


def test_training_keeps_embeddings_full_rank(fitted):
    h = fitted.history
    assert h["step"][-1] == 75
    # D = 64: a collapsed embedding has effective rank ~1; the default training keeps it high
    assert min(h["effective_rank"]) > 8.0
    assert h["effective_rank"][-1] > 0.5 * h["effective_rank"][0]
    assert min(h["min_cov_eigenvalue"]) > 0.0
    assert all(np.isfinite(h["energy"])) and all(np.isfinite(h["lp_loss"]))
    assert h["de_init"]["membership_agreement"] > 0.5
    assert abs(sum(h["cluster_usage"][-1]) - 1.0) < 1e-6


def test_maps_have_image_size_and_score_is_the_image_score(fitted, gravel):
    samples = test_samples(gravel)
    pred = fitted.predict([s.path for s in samples])
    maps, scores = pred.maps, pred.scores
    assert len(maps) == len(samples)
    for m, sc in zip(maps, scores):
        assert m.shape == (128, 128) and m.dtype == np.float32 and np.isfinite(m).all()
        assert sc == pytest.approx(image_score(m, fitted.config.image_score_fraction), rel=1e-12)
        assert m.mean() < sc <= m.max()
    # a non-square array input keeps its own size
    m = fitted.anomaly_map(np.random.default_rng(0).random((90, 150)).astype(np.float32))
    assert m.shape == (90, 150)


def test_defects_score_higher_than_normal_on_average(fitted, gravel):
    samples = test_samples(gravel)
    scores = fitted.predict([s.path for s in samples]).scores
    labels = np.array([s.label for s in samples])
    assert scores[labels == 1].mean() > scores[labels == 0].mean()


def test_save_load_round_trip(fitted, gravel, tmp_path):
    path = tmp_path / "model.pt"
    fitted.save(path)
    loaded = pedenet.load(path)
    img = test_samples(gravel)[-1].path
    np.testing.assert_array_equal(loaded.anomaly_map(img), fitted.anomaly_map(img))
    assert loaded.config == fitted.config
    assert loaded.normal_quantiles == fitted.normal_quantiles


def test_corrupt_or_foreign_checkpoint_is_refused(tmp_path, fitted):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        pedenet.load(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not a pedenet checkpoint"):
        pedenet.load(foreign)
    good = tmp_path / "good.pt"
    fitted.save(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt: .*corrupt or truncated.*copy it again"):
        pedenet.load(truncated)


def test_same_seed_same_model(gravel):
    torch.set_num_threads(1)
    paths = [s.path for s in train_samples(gravel)][:6]
    kw = dict(steps=10, image_size=96, n_components=3, seed=5)
    a = pedenet.PEDENet(**kw).fit(paths, progress=False)
    b = pedenet.PEDENet(**kw).fit(paths, progress=False)
    img = test_samples(gravel)[0].path
    np.testing.assert_allclose(a.anomaly_map(img), b.anomaly_map(img), rtol=1e-5)


def test_fit_reads_a_folder_as_pedenet_fit_does(gravel, tmp_path):
    """A folder given to fit contributes only the images directly inside it (a category folder:
    its train/good), never the defective images or masks of its subfolders."""
    from pedenet.data import DataError, SkippedFileWarning

    with pytest.raises(DataError, match="is a dataset root.*gravel"):
        pedenet.PEDENet(steps=0).fit(gravel.parent)  # would hold test/ and ground_truth/
    folder = tmp_path / "normal"
    (folder / "rejects").mkdir(parents=True)
    train = [s.path for s in train_samples(gravel)]
    for p in train[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    defect = next(s for s in test_samples(gravel) if s.label == 1)
    (folder / "rejects" / "bad.png").write_bytes(Path(defect.path).read_bytes())
    kw = dict(steps=0, de_init="random", image_size=64, n_components=2, embedding_dim=8)
    with pytest.warns(SkippedFileWarning, match="1 images in its subfolders \\(rejects\\)"):
        model = pedenet.PEDENet(**kw).fit(folder, progress=False)
    assert model.history["n_train_images"] + model.history["n_calibration_images"] == 4
    with pytest.raises(DataError, match="subfolders hold some \\(sub\\)"):
        pedenet.PEDENet(**kw).fit(_only_subfolder(tmp_path / "nested", defect.path), progress=False)
    model = pedenet.PEDENet(**kw).fit([gravel], progress=False)  # a category folder: train/good
    assert model.history["n_train_images"] + model.history["n_calibration_images"] == len(train)


def _only_subfolder(folder, image):
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x.png").write_bytes(Path(image).read_bytes())
    return folder


def test_numpy_settings_save_and_load(gravel, tmp_path):
    """Settings from numpy (a parameter grid) are stored as plain numbers: the checkpoint loads."""
    paths = [s.path for s in train_samples(gravel)][:3]
    model = pedenet.PEDENet(steps=np.int64(0), de_init="random", image_size=np.int64(64),
                            n_components=np.int64(2), embedding_dim=8, lr=np.float32(1e-3),
                            image_score_fraction=np.float64(0.01), seed=np.int64(1),
                            calibration_fraction=0.0).fit(paths, progress=False)
    assert type(model.config.n_components) is int and type(model.config.lr) is float
    model.save(tmp_path / "model.pt")
    again = pedenet.load(tmp_path / "model.pt")
    assert again.config == model.config
    np.testing.assert_array_equal(again.anomaly_map(paths[0]), model.anomaly_map(paths[0]))


@pytest.mark.parametrize("setting, message", [
    (dict(ridge=-1), "ridge must be >= 0"), (dict(smoothing_sigma=-1), "smoothing_sigma must be >= 0"),
    (dict(smoothing_sigma=float("nan")), "finite"), (dict(lr=-1e-3), "lr must be > 0"),
    (dict(lr=float("nan")), "finite"), (dict(encoder_lr=0), "encoder_lr must be > 0"),
    (dict(lambda_de=float("inf")), "finite"), (dict(lambda_lp=-1), "lambda_lp must be >= 0"),
    (dict(de_hidden=0), "de_hidden must be >= 1"), (dict(seed=-1), "seed must be in 0-4294967295")])
def test_bad_settings_refused_at_construction(setting, message):
    with pytest.raises(ValueError, match=message):
        pedenet.PEDENet(**setting)


def test_bad_held_out_image_stops_fit_before_training_and_keeps_the_model(gravel, monkeypatch):
    from pedenet import estimator
    from pedenet.calibration import split_calibration
    from pedenet.data import DataError

    paths = [s.path for s in train_samples(gravel)][:6]
    kw = dict(steps=0, de_init="random", image_size=64, n_components=2, embedding_dim=8,
              calibration_fraction=0.5)
    model = pedenet.PEDENet(**kw).fit(paths, progress=False)
    img = test_samples(gravel)[0].path
    before_map, before_history = model.anomaly_map(img), dict(model.history)
    before_thresholds = model.thresholds()
    _, cal_idx = split_calibration(len(paths), 0.5, 0)
    bad = list(paths)
    bad[int(cal_idx[-1])] = gravel / "missing.png"  # a held-out image, read after training so far
    trained = []
    monkeypatch.setattr(estimator, "train_network", lambda *a, **k: trained.append(1))
    with pytest.raises(DataError, match="missing.png"):
        model.fit(bad, progress=False)
    assert not trained  # refused before the training
    # an error part way (here: in the training) leaves the fitted model as it was
    monkeypatch.setattr(estimator, "train_network", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model.fit(paths, progress=False)
    np.testing.assert_array_equal(model.anomaly_map(img), before_map)
    assert model.history == before_history and model.thresholds() == before_thresholds


def test_fit_takes_and_ignores_y_as_scikit_learn_does(gravel):
    paths = [s.path for s in train_samples(gravel)][:3]
    kw = dict(steps=0, de_init="random", image_size=64, n_components=2, embedding_dim=8,
              calibration_fraction=0.0)
    a = pedenet.PEDENet(**kw).fit(paths, np.zeros(3), progress=False)
    b = pedenet.PEDENet(**kw).fit(paths, progress=False)
    np.testing.assert_array_equal(a.score_samples(paths), b.score_samples(paths))
    with pytest.raises(TypeError):  # predict(X, y): nothing to take y for; options by keyword
        a.predict(paths, np.zeros(3))
    with pytest.raises(TypeError, match="progress=False"):  # fit(X, False): progress was meant
        a.fit(paths, False)


def test_fit_refuses_empty_input():
    with pytest.raises(ValueError, match="at least one"):
        pedenet.PEDENet().fit([])


def test_em_progress_counts_iterations_and_changes_nothing():
    """The EM initialization's progress bar advances once per EM iteration, and the fit is
    scikit-learn's own (same means, same iteration count)."""
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    from pedenet.training import em_with_progress

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (300, 3)), rng.normal(6, 1, (200, 3)), rng.normal(-6, 2, (100, 3))])
    kwargs = dict(n_components=3, covariance_type="full", max_iter=100, init_params="k-means++",
                  random_state=0, tol=1e-6)

    class Counter:
        n, postfix = 0, None

        def update(self, k):
            self.n += k

        def set_postfix(self, refresh=True, **kw):
            self.postfix = kw

    em = em_with_progress()(**kwargs)
    em.progress = bar = Counter()
    em.fit(x)
    ref = SkGaussianMixture(**kwargs).fit(x)
    assert bar.n == em.n_iter_ == ref.n_iter_ and em.n_iter_ > 1
    assert "change" in bar.postfix
    np.testing.assert_allclose(em.means_, ref.means_)
    np.testing.assert_allclose(sorted(em.means_[:, 0]), [-6, 0, 6], atol=0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_clearly(fitted, tmp_path):
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            pedenet.PEDENet(device=device)
    fitted.save(tmp_path / "model.pt")
    with pytest.raises(ValueError, match="CUDA is not available"):
        pedenet.load(tmp_path / "model.pt", device="cuda")
    with pytest.raises(ValueError, match="device must be"):
        pedenet.PEDENet(device="cuda:x")


def test_too_few_embeddings_for_the_mixture_warn_or_stop_before_training(monkeypatch):
    import pedenet.estimator

    images = [np.random.default_rng(i).random((64, 64, 3)).astype(np.float32) for i in range(3)]
    # 3 images of 32 px at stride 8: 16 embeddings each, 48 in all
    with pytest.warns(UserWarning, match=r"give 48 patch embeddings, fewer than the 360 that 40 "
                                         r"full 8×8 covariances need \(K × \(D \+ 1\)\)") as caught:
        pedenet.PEDENet(image_size=32, n_components=40, embedding_dim=8, steps=1,
                        calibration_fraction=0, de_init="random").fit(images, progress=False)
    assert not any("calibration" in str(w.message) for w in caught)  # nothing held out
    # images held out for the thresholds: the advice names the setting that holds them out
    with pytest.warns(UserWarning, match=r"give 32 patch embeddings, .*; 1 more image\(s\) are held "
                                         r"out for the thresholds \(a smaller calibration_fraction"):
        pedenet.PEDENet(image_size=32, n_components=30, embedding_dim=8, steps=1,
                        calibration_fraction=0.34, de_init="random").fit(images, progress=False)

    def training_started(*args, **kwargs):
        raise AssertionError("trained although the mixture cannot be estimated")

    monkeypatch.setattr(pedenet.estimator, "train_network", training_started)
    for init in ("random", "em"):
        with pytest.raises(ValueError, match="only 48 patch embeddings, fewer than the 50 mixture"):
            pedenet.PEDENet(image_size=32, n_components=50, embedding_dim=8, steps=1,
                            calibration_fraction=0, de_init=init).fit(images, progress=False)


def test_an_lp_distance_larger_than_the_grid_warns_before_training():
    """64 px images at stride 8: 8×8 grids, room for pairs 3 cells apart without jitter; the
    default distance (one 32 px patch: 4 cells, jittered by 1) does not fit."""
    images = [np.random.default_rng(i).random((64, 64, 3)).astype(np.float32) for i in range(4)]
    small = dict(image_size=64, n_components=2, embedding_dim=8, steps=1, calibration_fraction=0,
                 de_init="random")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pedenet.PEDENet(**small, lp_distance=0.75).fit(images, progress=False)  # 3 cells: fits
    with pytest.warns(UserWarning, match=r"^LP neighbour distance 1 patch sizes \(4 grid cells\): 4 of "
                                         r"4 training image\(s\) are too small for it: their pairs are "
                                         r"drawn closer; use a smaller lp_distance") as caught:
        pedenet.PEDENet(**small).fit(images, progress=False)
    assert Path(caught[0].filename).name == "test_training.py"  # the caller's line, not pedenet's
    with pytest.warns(UserWarning, match=r"are too small for any LP pair; LP does not train"):
        pedenet.PEDENet(**dict(small, image_size=32)).fit(images, progress=False)
    with warnings.catch_warnings():  # LP off: nothing to warn about
        warnings.simplefilter("error")
        pedenet.PEDENet(**small, lambda_lp=0).fit(images, progress=False)
