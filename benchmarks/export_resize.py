"""How the exported model's image score depends on the resize before it (README, "Export").

Exports RUN_DIR's model to ONNX and scores the first N images of a folder three ways:
resized as pedenet does (``pedenet.scoring.to_tensor``: float image, bilinear with
antialiasing), resized in 8 bits with Pillow's bilinear filter before ÷ 255, and resized in
float without antialiasing (``F.interpolate(..., antialias=False)``). Prints each score and
the change against the first.

    python benchmarks/export_resize.py runs/bottle_s0 ../shared/data/mvtec_ad/bottle/test/good
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from PIL import Image

import pedenet
from pedenet.data import list_images, load_image
from pedenet.export import export_model
from pedenet.scoring import to_tensor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("images", help="a folder of images")
    ap.add_argument("--n", type=int, default=5)
    args = ap.parse_args()
    model = pedenet.load(args.run_dir)
    size = model.config.image_size
    if not size or model.config.keep_aspect:
        raise SystemExit("this check needs a model with a square --image-size")
    with tempfile.TemporaryDirectory() as tmp:
        path = export_model(model, Path(tmp) / "m.onnx", "onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    print("image | pedenet resize | 8-bit Pillow resize | no antialiasing")
    for f in list_images(args.images)[: args.n]:
        arr = load_image(f)
        ours = to_tensor(arr, size, False).numpy()
        rgb8 = Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)
        pil8 = (np.asarray(rgb8, dtype=np.float32) / 255).transpose(2, 0, 1)[None]
        plain = F.interpolate(torch.from_numpy(arr).permute(2, 0, 1)[None], size=(size, size),
                              mode="bilinear", align_corners=False, antialias=False).numpy()
        s = [float(session.run(None, {"image": np.ascontiguousarray(x, np.float32)})[1][0])
             for x in (ours, pil8, plain)]
        print(f"{Path(f).name} | {s[0]:.1f} | {s[1]:.1f} ({s[1] / s[0] - 1:+.1%}) | "
              f"{s[2]:.1f} ({s[2] / s[0] - 1:+.1%})")
    th = model.thresholds()
    if th:
        print(f"image threshold: {th['image_threshold']:.1f}")


if __name__ == "__main__":
    main()
