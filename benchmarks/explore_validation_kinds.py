"""Does a validation set with large ``region`` defects rank settings the way the test split does?

One fitted model; its held-out normal images get synthetic defects of each kind set (the
default scratch / spot / patch, and ``region``: a band of the image's own texture, magnified,
over 15-45 % of the image; ``--sets`` adds others, such as ``edge``: the same change on a
piece cut off at the border; :mod:`pedenet.validation`). The maps are computed once per scorer
and kind set, then scored for every image-score fraction q. With ``--nn`` the same model is
also scored by nearest-neighbour distance (``benchmarks/ablations.py``'s memory bank), the
setting whose test ranking (better localization than the mixture) the default validation set
gets the other way round (docs/ablations.md).

    python benchmarks/explore_validation_kinds.py runs/mtd_s0/model.pt --nn [--sets default,region,edge]

Prints one JSON line per (scorer, kind set): image AUROC for each q, pixel AUROC, AU-PRO@0.3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from pedenet.validation import DEFECT_TYPES

QS = (0.0, 0.003, 0.01, 0.03)
KIND_SETS = {"default": DEFECT_TYPES, "region": ("region",), "edge": ("edge",),
             "default+edge": (*DEFECT_TYPES, "edge")}  # validation sets, by name
SET_NAMES = ("default", "region")  # the sets compared unless a script is told others


KEYS = ("image_auroc", "pixel_auroc", "au_pro_0.3")  # the metrics the scripts print


def explore_parser(doc: str, data_help: str | None = None, *,
                   full_doc: bool = False) -> argparse.ArgumentParser:
    """The explore scripts' parser: described by ``doc``'s first line (all of ``doc``, verbatim,
    with ``full_doc``), with the positional ``model`` and, given ``data_help``, ``data``."""
    if full_doc:
        ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    else:
        ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("model", help="RUN_DIR/model.pt")
    if data_help is not None:
        ap.add_argument("data", help=data_help)
    return ap


def add_no_test_option(ap: argparse.ArgumentParser) -> None:
    """``--no-test``: score validation only."""
    ap.add_argument("--no-test", action="store_true", help="validation only")


def load_model(path):
    """``(model, held-out image list)`` of the model saved at ``path``, with UserWarnings
    silenced as every explore script does."""
    import pedenet

    warnings.filterwarnings("ignore", category=UserWarning)
    model = pedenet.load(path)
    return model, model.history["calibration_images"]


def add_sets_option(ap: argparse.ArgumentParser) -> None:
    """``--sets NAME,...``: names of :data:`KIND_SETS` (default :data:`SET_NAMES`), parsed to a
    list; an unknown name is a usage error."""
    def names(value: str) -> list[str]:
        out = [v for v in value.split(",") if v]
        unknown = sorted(set(out) - set(KIND_SETS))
        if unknown or not out:
            raise argparse.ArgumentTypeError(f"unknown set(s) {', '.join(unknown) or 'none'}; "
                                             f"choose from {', '.join(KIND_SETS)}")
        return out

    ap.add_argument("--sets", type=names, default=list(SET_NAMES),
                    help=f"validation kind sets, comma-separated from {', '.join(KIND_SETS)}")


def validation_by_kind_set(model, held, names=SET_NAMES) -> dict:
    """``{"validation_<set>": {image_auroc, pixel_auroc, au_pro_0.3}}`` (rounded to 4 digits)
    of ``model`` on the held-out images ``held``, for each set of :data:`KIND_SETS` named in
    ``names`` (seed 0)."""
    from pedenet.validation import validate

    out = {}
    for name in names:
        v = validate(model, held, seed=0, kinds=KIND_SETS[name])
        out[f"validation_{name}"] = {k: round(v[k], 4) for k in KEYS}
    return out


def _score(model, kinds: tuple, qs) -> dict:
    from pedenet.metrics import image_auroc, pixel_metrics
    from pedenet.scoring import image_score
    from pedenet.validation import synthetic_validation_set

    arrays, masks, labels = synthetic_validation_set(model.history["calibration_images"], 0, kinds)
    maps = model.predict(arrays).maps
    out = {f"image_auroc_q{q:g}": round(image_auroc([image_score(m, q) for m in maps], labels), 4)
           for q in qs}
    pm = pixel_metrics(maps, masks, (0.3,))
    out.update(pixel_auroc=round(pm["pixel_auroc"], 4), au_pro_03=round(pm["aupro_0.3"], 4))
    return out


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from ablations import _swap_scorer

    ap = explore_parser(__doc__)
    ap.add_argument("--nn", action="store_true", help="also score by nearest-neighbour distance")
    ap.add_argument("--q", default=",".join(map(str, QS)), help="comma-separated fractions")
    add_sets_option(ap)
    args = ap.parse_args()
    qs = [float(v) for v in args.q.split(",")]
    scorers = ["mixture"] + (["nn"] if args.nn else [])
    for scorer in scorers:
        model, held = load_model(args.model)
        if scorer == "nn":  # the bank: the other images of the held-out images' folder
            from pedenet.data import list_images

            resolved = {str(Path(p).resolve()) for p in held}
            train = [p for p in list_images(Path(held[0]).parent) if str(Path(p).resolve()) not in resolved]
            _swap_scorer(model, "nn", train, model.config.seed)
        for name in args.sets:
            kinds = KIND_SETS[name]
            t0 = time.perf_counter()
            rec = {"model": args.model, "scorer": scorer, "kinds": name, **_score(model, kinds, qs),
                   "seconds": round(time.perf_counter() - t0, 1)}
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
