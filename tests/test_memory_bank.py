"""Distance scoring (memory bank): exact nearest-neighbour distances, the fitted option, round trips."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import pedenet
from pedenet import memory_bank
from pedenet.builtin import make_builtin_dataset
from pedenet.cli import main
from pedenet.memory_bank import MemoryBank, nearest_distance


def _brute(q: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((q[:, None, :].astype(np.float64) - b[None].astype(np.float64)) ** 2).sum(-1)).min(1)


def test_nearest_distance_equals_brute_force_across_chunks():
    rng = np.random.default_rng(0)
    q, b = rng.normal(size=(50, 6)).astype(np.float32), rng.normal(size=(301, 6)).astype(np.float32)
    bq, bb = torch.from_numpy(q), torch.from_numpy(b)
    got = nearest_distance(bq, bb, (bb * bb).sum(1), chunk=64).numpy()  # 5 chunks, the last short
    np.testing.assert_allclose(got, _brute(q, b), rtol=1e-5, atol=1e-5)
    # a query that is a bank row is at distance 0
    assert nearest_distance(bb[7:8], bb, (bb * bb).sum(1))[0] < 1e-3


def test_bank_scores_leave_out_rows_and_chunk_queries(monkeypatch):
    rng = np.random.default_rng(1)
    b = rng.normal(size=(40, 4)).astype(np.float16).astype(np.float32)  # exact in float16
    q = rng.normal(size=(23, 4)).astype(np.float32)
    bank = MemoryBank(torch.from_numpy(b))
    monkeypatch.setattr(memory_bank, "QUERY_ROWS", 5)  # 5 query blocks, the last short
    got = bank.score_energy(torch.from_numpy(q))
    assert got.dtype == torch.float64 and got.shape == (23,)
    np.testing.assert_allclose(got.numpy(), _brute(q, b), rtol=1e-5, atol=1e-5)
    keep = np.r_[0:10, 25:40]
    np.testing.assert_allclose(bank.score_energy(torch.from_numpy(q), leave_out=(10, 25)).numpy(),
                               _brute(q, b[keep]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bank.score_energy(torch.from_numpy(q), leave_out=(0, 30)).numpy(),
                               _brute(q, b[30:]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="whole memory bank"):
        bank.score_energy(torch.from_numpy(q), leave_out=(0, 40))


def test_bank_refuses_empty_or_non_finite_input_and_rounds_to_float16():
    with pytest.raises(ValueError, match="non-empty"):
        MemoryBank(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="non-finite"):
        MemoryBank(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="float16"):
        MemoryBank(torch.tensor([[0.0, 1e5]]))
    bank = MemoryBank(torch.tensor([[1.0001, 2.0]]))
    assert bank.bank.dtype == torch.float32 and bank.bank[0, 0] == torch.tensor(1.0001).half().float()
    again = MemoryBank.from_state_dict(bank.state_dict())
    assert bank.state_dict()["bank"].dtype == torch.float16
    assert torch.equal(again.bank, bank.bank)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.random((64, 64, 3), dtype=np.float32) for _ in range(6)]


@pytest.fixture(scope="module")
def distance_model(images):
    return pedenet.PEDENet(steps=0, embedding_dim=8, n_components=2, image_size=64,
                           calibration_fraction=1 / 3, scoring="distance").fit(images, progress=False)


def test_distance_model_scores_its_training_patches_near_zero(distance_model, images):
    net, m = distance_model.network, distance_model
    train = [images[i] for i in range(6) if m.history["calibration_images"].count(f"<input {i}>") == 0]
    assert len(train) == 4 and len(net.memory_bank) == 4 * 64  # 8×8 cells per 64 px image, all kept
    from pedenet.scoring import to_tensor

    with torch.inference_mode():
        own = net.energy_of_embeddings(net.embed(to_tensor(train[0], 64)))
        other = net.energy_of_embeddings(net.embed(to_tensor(np.ones((64, 64, 3), np.float32), 64)))
        emb = net.embed(to_tensor(train[0], 64))
        scale = float(emb.std())
    assert float(own.max()) < 1e-2 * scale  # every patch of a training image is in the bank
    assert float(other.min()) > 0.1 * scale
    # the colour scale comes from other images' rows, not the zero self-distance
    q = m.normal_quantiles
    assert 0 < q["0.5"] <= q["0.99"] <= q["0.999"] <= q["1.0"]


def test_distance_model_round_trip_and_mixture_kept(distance_model, images, tmp_path):
    distance_model.save(tmp_path / "m.pt")
    back = pedenet.load(tmp_path / "m.pt")
    assert back.config.scoring == "distance" and back.network.memory_bank is not None
    np.testing.assert_array_equal(back.anomaly_map(images[0]), distance_model.anomaly_map(images[0]))
    np.testing.assert_array_equal(back.predict(images).scores, distance_model.predict(images).scores)
    # the mixture stays fitted: cluster maps still work
    labels, _ = back.cluster_map(images[0])
    assert labels.shape == (64, 64)


def test_distance_scores_differ_from_mixture_scores(distance_model, images):
    mixture = pedenet.PEDENet(steps=0, embedding_dim=8, n_components=2, image_size=64,
                              calibration_fraction=1 / 3).fit(images, progress=False)
    assert mixture.network.memory_bank is None
    # the same seed and data: the same encoder and mixture, only the scoring differs
    torch.testing.assert_close(mixture.network.mixture.mu, distance_model.network.mixture.mu)
    assert not np.allclose(mixture.anomaly_map(images[0]), distance_model.anomaly_map(images[0]))


def test_memory_bank_size_caps_the_bank(images):
    m = pedenet.PEDENet(steps=0, embedding_dim=8, n_components=2, image_size=64, calibration_fraction=0,
                        scoring="distance", memory_bank_size=30).fit(images, progress=False)
    assert len(m.network.memory_bank) == 6 * 5  # 30 / 6 positions of each image
    m = pedenet.PEDENet(steps=0, embedding_dim=8, n_components=2, image_size=64, calibration_fraction=0,
                        scoring="distance", memory_bank_size=4).fit(images, progress=False)
    assert len(m.network.memory_bank) == 4  # fewer rows than images: one from each of the first 4
    assert 0 < m.normal_quantiles["0.5"]
    m = pedenet.PEDENet(steps=0, embedding_dim=8, n_components=2, image_size=64, calibration_fraction=0,
                        scoring="distance", memory_bank_size=1).fit(images, progress=False)
    assert len(m.network.memory_bank) == 1 and m.normal_quantiles["1.0"] > 0


def test_config_refuses_unknown_scoring():
    with pytest.raises(ValueError, match="scoring must be one of"):
        pedenet.PEDENet(scoring="knn")
    with pytest.raises(ValueError, match="memory_bank_size must be >= 1"):
        pedenet.PEDENet(memory_bank_size=0)


def test_checkpoint_with_distance_scoring_but_no_bank_is_refused(distance_model, tmp_path):
    from pedenet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    distance_model.save(tmp_path / "m.pt")
    data = load_checkpoint(tmp_path / "m.pt")
    data["memory_bank"] = None
    save_checkpoint(tmp_path / "broken.pt", data)
    with pytest.raises(CheckpointError, match="no memory bank"):
        pedenet.load(tmp_path / "broken.pt")
    for bad in ({}, {"bank": [[0.0, 1.0]]}, "bank"):
        data["memory_bank"] = bad
        save_checkpoint(tmp_path / "broken.pt", data)
        with pytest.raises(CheckpointError, match="memory bank entry holds no 'bank' tensor"):
            pedenet.load(tmp_path / "broken.pt")


def test_cli_fit_with_distance_scoring_predicts_and_refuses_export(tmp_path):
    data = make_builtin_dataset(tmp_path / "ds", categories=("grass",), n_train=6, n_test_good=1,
                                n_test_defect=1, size=64)
    run = CliRunner().invoke
    out = tmp_path / "run"
    r = run(main, ["fit", str(data / "grass"), "--out", str(out), "--steps", "2", "--quiet",
                   "--scoring", "distance", "--memory-bank-size", "100"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["scoring"] == "distance" and cfg["memory_bank_size"] == 100
    assert len(pedenet.load(out).network.memory_bank) == 100  # 20 of each of the 5 training images
    history = json.loads((out / "history.json").read_text())
    assert history["memory_bank_rows"] == 100 and history["timings"]["memory_bank_seconds"] > 0
    r = run(main, ["predict", str(out), str(data / "grass" / "test"), "--out", str(tmp_path / "pred"), "--quiet"])
    assert r.exit_code == 0, r.output
    r = run(main, ["export", str(out), "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "--scoring distance" in r.output and "export does not support" in r.output
    assert f"Error: {out}: " in r.output and f"pedenet rescore {out} --scoring mixture" in r.output
    assert not (tmp_path / "m.onnx").exists()
    r = run(main, ["fit", str(data / "grass"), "--out", str(tmp_path / "run2"), "--steps", "2",
                   "--memory-bank-size", "100"])
    assert r.exit_code == 2 and "--memory-bank-size applies to --scoring distance only" in r.output
    assert not (tmp_path / "run2").exists()


def test_resume_accepts_another_scoring_and_files_from_before_it_existed(images, tmp_path):
    """Scoring is applied after the training steps: a resume file may differ in it, and one
    written before the setting existed (no such keys) still resumes."""
    from pedenet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from pedenet.config import PEDENetConfig
    from pedenet.resume import read_resume_state

    cfg = dict(steps=2, embedding_dim=8, n_components=2, image_size=64, calibration_fraction=0)
    ck = tmp_path / "resume.pt"
    pedenet.PEDENet(**cfg).fit(images, progress=False, checkpoint=ck, checkpoint_every=1,
                               keep_checkpoint=True)
    data = load_checkpoint(ck, kind="resume")
    del data["config"]["scoring"], data["config"]["memory_bank_size"], data["config"]["image_score_border"]
    save_checkpoint(ck, data)
    state = read_resume_state(ck, PEDENetConfig(**cfg, scoring="distance", memory_bank_size=50,
                                                image_score_border=0.1, image_score_fraction=0.01), images)
    assert state["step"] == 1  # the last periodic save (none at the final step)
    with pytest.raises(CheckpointError, match="steps 2 there, 3 here"):  # training settings still count
        read_resume_state(ck, PEDENetConfig(**{**cfg, "steps": 3}), images)
