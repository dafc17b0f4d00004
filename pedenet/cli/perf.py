"""``pedenet export`` (one exported network) and ``pedenet benchmark`` (speed and memory)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import (NonEmptyPath, RESULT_FILES, RUN_FILES, UserError, _check_out_file, _info,
                     _load_model, _model_path, _user_errors, _write_json)


@click.command("export")
@click.argument("run_dir", type=NonEmptyPath(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default=None,
              help="ONNX (onnxruntime) or TorchScript (torch.jit.load). Default: from the "
              "--out extension (.onnx: onnx; .ts, .pt, .pth, .torchscript: torchscript; any "
              "other extension needs --format).")
@click.option("--out", "out_file", required=True, type=NonEmptyPath(path_type=Path, dir_okay=False),
              help="File to write (e.g. model.onnx, model.ts).")
@click.option("--energy-dtype", type=click.Choice(["auto", "float64", "float32"]), default="auto",
              show_default=True, help="Precision of the mixture energy inside the exported "
              "model: auto = as pedenet scores (float32 products and float64 sums where the "
              "mixture's accuracy check allows, else float64); float32 throughout is fastest "
              "and least exact. The encoder always runs in float32.")
@click.option("--overwrite", is_flag=True, default=False, show_default=True,
              help="Replace an existing --out file (never one of the run's own files: model.pt, "
              "resume.pt, config.json, history.json, metrics.json, validation.json, report.html, "
              "overlays; nor any file named model.pt or resume.pt, the names of a run's checkpoints, nor "
              "a .json, .html or .csv file).")
@click.option("--quiet", is_flag=True, default=False, show_default=True, help="No messages.")
@_user_errors
def export_command(run_dir, fmt, out_file, energy_dtype, overwrite, quiet):
    """Export RUN_DIR's model as one network: image → anomaly map and score.

    Input: float32 B×3×H×W, RGB in [0, 1] (normalization is inside), H = W = the
    model's image_size (resize first, bilinear with antialiasing), the shorter side =
    image_size with the aspect kept (models fitted with --keep-aspect), or any H, W >= 32
    when image_size is 0. Outputs: anomaly_map B×H×W (energy) and score B (the image
    score: mean of the map's top image_score_fraction of pixels, leaving out the
    image_score_border band at the edge, as predict gives).
    Models fitted with --scoring distance are refused.
    """
    import torch

    from ..export import check_exportable, export_model, import_onnx

    fmt = _export_format(fmt, out_file)
    if fmt == "onnx":  # an environment problem: one line with the fix, before any work
        try:
            import_onnx()
        except ImportError as exc:
            raise UserError(f"{exc}; or export --format torchscript") from None
    _check_out_file(out_file)
    model_path = _model_path(run_dir)
    own = {(model_path.parent / name).resolve() for name in RUN_FILES + RESULT_FILES + ("overlays",)}
    if out_file.resolve() in own | {model_path.resolve()}:
        raise click.UsageError(f"--out {out_file} would overwrite one of the run's own files "
                               f"({out_file.name}); pass another file name (e.g. model.ts or "
                               "model.onnx)")
    if out_file.name.casefold() in ("model.pt", "resume.pt"):  # another run's, or read as one later
        raise click.UsageError(f"--out {out_file}: {out_file.name} is the name of a run's "
                               "checkpoint, which pedenet commands would try to read as one; "
                               "name the export model.ts (or model.onnx)")
    if out_file.suffix.casefold() in (".json", ".html", ".csv"):  # a run's or a prediction's record
        raise click.UsageError(f"--out {out_file}: a {out_file.suffix or out_file.name} name is for "
                               "records (a run's config.json, a prediction's scores.csv), not a "
                               "model; name the export model.ts (or model.onnx)")
    if out_file.exists() and not overwrite:
        raise click.UsageError(f"--out {out_file} exists; pass --overwrite to replace it, or "
                               "choose another file name")
    model = _load_model(model_path, "cpu")
    dtype = {"auto": "auto", "float64": torch.float64, "float32": torch.float32}[energy_dtype]
    try:  # a distance-scored model: refused, naming the run in the advice
        check_exportable(model, run=model_path.parent)
    except ValueError as exc:
        raise UserError(f"{model_path.parent}: {exc}") from None
    path = export_model(model, out_file, fmt, energy_dtype=dtype)
    size = model.config.image_size
    if not size:
        shape = "Bx3xHxW (any H, W >= 32)"
    elif model.config.keep_aspect:
        shape = (f"Bx3xHxW (shorter side {size}, aspect kept: "
                 f"pedenet.scoring.to_tensor(array, {size}, keep_aspect=True))")
    else:
        shape = f"Bx3x{size}x{size}"
    _info(quiet, f"exported {fmt} -> {path}: input 'image' float32 {shape} RGB in [0, 1]; "
                 "outputs 'anomaly_map' BxHxW, 'score' B")


_TORCHSCRIPT_SUFFIXES = (".ts", ".pt", ".pth", ".torchscript")


def _export_format(fmt: str | None, out_file: Path) -> str:
    """The export format: ``fmt``, or the one ``out_file``'s extension names.

    Raises:
        click.UsageError: ``fmt`` contradicts the extension (a TorchScript file named
            ``.onnx``, or an ONNX file named ``.ts``/``.pt``/``.pth``), which the other
            runtime would then fail to load; or no ``fmt`` and an extension that names
            neither format (``model.json``, ``out.bmp``: probably a mistyped --out).
    """
    suffix = out_file.suffix.lower()
    implied = ("torchscript" if suffix in _TORCHSCRIPT_SUFFIXES
               else "onnx" if suffix == ".onnx" else None)
    if fmt is None:
        if implied is None:
            raise click.UsageError(
                f"--out {out_file}: cannot tell the format from {suffix or 'a name without an extension'}; "
                f"name it {out_file.with_suffix('.onnx').name} (ONNX) or "
                f"{out_file.with_suffix('.ts').name} (TorchScript), or pass --format")
        return implied
    if implied is not None and implied != fmt:
        article = "an" if implied == "onnx" else "a"
        raise click.UsageError(
            f"--out {out_file} names {article} {implied} file but --format is {fmt}; name it "
            f"{out_file.with_suffix('.onnx' if fmt == 'onnx' else '.ts').name} or pass "
            f"--format {implied}")
    return fmt


@click.command("benchmark")
@click.argument("run_dir", required=False, type=NonEmptyPath(path_type=Path))
@click.option("--json", "json_file", type=NonEmptyPath(path_type=Path, dir_okay=False), default=None,
              help="Also write the figures to this JSON file.")
@click.option("--quick", is_flag=True, default=False, show_default=True,
              help="Fewer repeats, scoring for 100 and 1000 training images only: a smoke test, "
              "not figures to report.")
@_user_errors
def benchmark_command(run_dir, json_file, quick):
    """Speed and memory of inference, scoring and training on this machine.

    RUN_DIR: a fitted run folder (or model file); without it an untrained default model
    (steps 0, fitted on 8 built-in images) is used: speed does not depend on training.
    The default run takes about 3 minutes on 2 CPU cores and peaks at about 6.5 GiB of
    memory (its nearest-neighbour reference holds a 5 GiB memory bank of 10 000 training
    images); --quick takes under a minute and about 1.3 GiB (docs/benchmarks.md).
    """
    from ..benchmark import run_benchmark

    if json_file is not None:  # before minutes of measuring, not after
        _check_out_file(json_file, "--json")
    if run_dir is not None:
        run_dir = _model_path(run_dir)
    result = run_benchmark(run_dir, quick=quick, log=click.echo)
    if json_file is not None:
        _write_json(Path(json_file), result)
        click.echo(f"figures -> {json_file}")
