"""Tests for pedenet.builtin: the generated texture dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from pedenet import builtin, data

SMALL = dict(n_train=4, n_test_good=2, n_test_defect=3, size=64)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("builtin") / "ds"
    assert builtin.make_builtin_dataset(root, seed=3, **SMALL) == root
    return root


def read(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "L"
        return np.asarray(img)


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_counts(small_root):
    assert (small_root / "README.txt").is_file()
    assert "scikit-image" in (small_root / "README.txt").read_text()
    assert sorted(p.name for p in small_root.iterdir()) == [
        "README.txt", "brick", "grass", "gravel"]
    assert not list(small_root.parent.glob(".*"))  # temporary folders cleaned up
    for category in builtin.TEXTURES:
        cat = data.resolve_category(small_root, category)
        assert (cat / ".complete").is_file()
        assert len(data.train_samples(cat)) == 4
        test = data.test_samples(cat)  # no MissingMaskWarning: every defect has a mask
        counts: dict[str, int] = {}
        for s in test:
            counts[s.defect] = counts.get(s.defect, 0) + 1
        assert counts == {"good": 2, "scratch": 3, "spot": 3, "patch": 3}
        for s in test:
            if s.label:
                assert s.mask_path.name == s.path.stem + "_mask.png"


def test_masks_nonempty_exact_and_sized(small_root):
    for category in builtin.TEXTURES:
        for s in data.test_samples(small_root / category):
            image = read(s.path)
            assert image.shape == (64, 64) and image.dtype == np.uint8
            if not s.label:
                continue
            raw_mask = read(s.mask_path)
            assert set(np.unique(raw_mask)) <= {0, 255}
            mask = data.load_mask(s.mask_path, expected_shape=image.shape)
            assert mask.any(), s.path
            rgb = data.load_image(s.path)
            assert rgb.shape == (64, 64, 3)


def locate(photo: np.ndarray, crop: np.ndarray, row_ok: np.ndarray | None = None):
    """All (row, col) where ``crop`` sits in ``photo``.

    Only the rows where ``row_ok`` is True are compared (all rows if None); the search uses
    the first such row, then checks the others.
    """
    size = crop.shape[0]
    row_ok = np.ones(size, bool) if row_ok is None else row_ok
    k = int(np.flatnonzero(row_ok)[0])
    windows = sliding_window_view(photo, size, axis=1)  # (H, W - size + 1, size)
    hits = np.argwhere((windows == crop[k]).all(axis=2))
    out = []
    for r, c in hits:
        r0 = int(r) - k
        if 0 <= r0 <= photo.shape[0] - size:
            window = photo[r0:r0 + size, c:c + size]
            if (window == crop)[row_ok].all():
                out.append((r0, int(c)))
    return out


def test_crops_from_disjoint_rows_and_defects_change_pixels(small_root):
    size = SMALL["size"]
    for category, make in builtin.TEXTURES.items():
        photo = make()
        split = int(round(builtin.TRAIN_FRACTION * photo.shape[0]))
        cat = small_root / category
        for s in data.train_samples(cat):
            where = locate(photo, read(s.path))
            assert where, f"{s.path} is not a crop of the {category} photograph"
            assert all(r + size <= split for r, _ in where), (s.path, where)
        for s in data.test_samples(cat):
            img = read(s.path)
            if not s.label:
                where = locate(photo, img)
                assert where and all(r >= split for r, _ in where), (s.path, where)
                continue
            mask = read(s.mask_path) > 0
            clean_rows = ~mask.any(axis=1)
            where = locate(photo, img, clean_rows)
            assert where and all(r >= split for r, _ in where), (s.path, where)
            # the clean crop is recoverable: pixels differ from it exactly inside the mask
            assert any(
                np.array_equal(photo[r:r + size, c:c + size] != img, mask) for r, c in where
            ), s.path


def test_defects_are_visible(small_root):
    for category, make in builtin.TEXTURES.items():
        photo = make()
        for defect in ("scratch", "spot"):
            for s in data.test_samples(small_root / category):
                if s.defect != defect:
                    continue
                img = read(s.path).astype(int)
                mask = read(s.mask_path) > 0
                where = locate(photo, img.astype(np.uint8), ~mask.any(axis=1))
                r, c = where[0]
                clean = photo[r:r + img.shape[0], c:c + img.shape[1]].astype(int)
                shift = np.abs(img[mask] - clean[mask]).mean()
                assert shift > 40, (s.path, shift)


def test_deterministic(tmp_path, small_root):
    again = builtin.make_builtin_dataset(tmp_path / "again", seed=3, **SMALL)
    assert files(again) == files(small_root)
    other = builtin.make_builtin_dataset(tmp_path / "other", seed=4, categories=("brick",),
                                         **SMALL)
    a = files(other)
    b = {k: v for k, v in files(small_root).items() if k.startswith("brick/")}
    assert a.keys() - {"README.txt"} == b.keys()
    assert any(a[k] != b[k] for k in b if k.endswith(".png"))


def test_category_independent_of_others(tmp_path, small_root):
    only = builtin.make_builtin_dataset(tmp_path / "only", seed=3, categories=("gravel",),
                                        **SMALL)
    want = {k: v for k, v in files(small_root).items() if k.startswith("gravel/")}
    got = {k: v for k, v in files(only).items() if k.startswith("gravel/")}
    assert got == want


def test_reuse_and_replace(tmp_path):
    root = tmp_path / "ds"
    builtin.make_builtin_dataset(root, categories=("brick",), **SMALL)
    probe = root / "brick" / "train" / "good" / "000.png"
    before = probe.stat().st_mtime_ns
    builtin.make_builtin_dataset(root, categories=("brick",), **SMALL)
    assert probe.stat().st_mtime_ns == before  # complete: reused, not rewritten
    builtin.make_builtin_dataset(root, categories=("brick",), **{**SMALL, "n_train": 6})
    assert len(data.train_samples(root / "brick")) == 6  # other parameters: replaced
    marker = json.loads((root / "brick" / ".complete").read_text())
    assert marker["n_train"] == 6 and marker["seed"] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_refuses_foreign_folder(tmp_path):
    root = tmp_path / "ds"
    (root / "brick").mkdir(parents=True)
    (root / "brick" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="brick"):
        builtin.make_builtin_dataset(root, categories=("brick",), **SMALL)
    assert (root / "brick" / "mine.txt").read_text() == "user data"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="wood"):
        builtin.make_builtin_dataset(tmp_path / "x", categories=("wood",))
    with pytest.raises(ValueError, match="size"):
        builtin.make_builtin_dataset(tmp_path / "x", size=300)
    with pytest.raises(ValueError, match="n_train"):
        builtin.make_builtin_dataset(tmp_path / "x", n_train=0)


def test_defaults_fast_and_complete(tmp_path):
    import time

    start = time.perf_counter()
    root = builtin.make_builtin_dataset(tmp_path / "full")
    elapsed = time.perf_counter() - start
    for category in ("brick", "grass", "gravel"):
        assert len(data.train_samples(root / category)) == 60
        assert len(data.test_samples(root / category)) == 40
        assert read(root / category / "train" / "good" / "000.png").shape == (160, 160)
    assert elapsed < 15  # about 1 s on 2 cores; generous to stay robust on slow machines


def test_builtin_dataset_root(tmp_path, monkeypatch):
    path = builtin.builtin_dataset_root(tmp_path / "cache")
    assert path == tmp_path / "cache" / "builtin-textures-v1" and path.is_dir()
    monkeypatch.setenv("PEDENET_CACHE", str(tmp_path / "env"))
    assert builtin.builtin_dataset_root() == tmp_path / "env" / "builtin-textures-v1"
    monkeypatch.delenv("PEDENET_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".cache" / "pedenet" / "builtin-textures-v1"
    assert builtin.builtin_dataset_root() == expected and expected.is_dir()
