"""A short end-to-end run on a subset of the real Magnetic Tile Defects data (../shared/data/mtd).

The subset is a folder of symbolic links in tmp_path (nothing is copied, nothing is written
into the data folder): 40 training images, and 6 test images per defect type plus 10 good.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pedenet.cli import main

MTD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mtd"

pytestmark = pytest.mark.skipif(not (MTD / "train" / "good").is_dir(),
                                reason=f"real MTD data not found at {MTD} (../shared/data is absent)")


def _link_subset(dst: Path) -> Path:
    def link(src: Path, rel: str) -> None:
        target = dst / rel / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(src)

    for p in sorted((MTD / "train" / "good").glob("*.jpg"))[::19][:40]:
        link(p, "train/good")
    for defect in sorted(d.name for d in (MTD / "test").iterdir() if d.is_dir()):
        images = sorted((MTD / "test" / defect).glob("*.jpg"))
        for p in images[:: max(1, len(images) // (10 if defect == "good" else 6))][: 10 if defect == "good" else 6]:
            link(p, f"test/{defect}")
            mask = MTD / "ground_truth" / defect / f"{p.stem}_mask.png"
            if mask.exists():
                link(mask, f"ground_truth/{defect}")
    return dst


@pytest.mark.slow
def test_fit_evaluate_predict_on_mtd_subset(tmp_path):
    data = _link_subset(tmp_path / "mtd_subset")
    run = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(main, ["fit", str(data), "--out", str(run), "--steps", "60", "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["evaluate", str(run), "--quiet"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((run / "metrics.json").read_text())
    overall = metrics["overall"]
    assert set(metrics["per_defect"]) == {"blowhole", "break", "crack", "fray", "uneven"}
    for key in ("image_auroc", "pixel_auroc", "au_pro_0.3"):
        assert 0.0 <= overall[key] <= 1.0
    # even a 60-step model on 40 images localizes defects far better than chance
    assert overall["pixel_auroc"] > 0.6
    # maps come back at each image's own (varying) resolution
    test_img = sorted((data / "test" / "crack").iterdir())[0]
    out = tmp_path / "pred"
    res = runner.invoke(main, ["predict", str(run), str(test_img), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    amap = np.load(next(out.glob("*_map.npy")))
    from PIL import Image

    with Image.open(test_img) as im:
        assert amap.shape == (im.height, im.width)
