"""Exit codes of every command follow one rule (docs/conventions.md, "Exit codes").

0 success; 1 the content of files or the environment; 2 a wrong command line or a refusal to
replace outputs; 128+N a signal. Each case below also checks that the error is one
``Error: ...`` line, without a traceback. One tiny fitted run serves every case.
"""

from __future__ import annotations

import functools
import json
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import pedenet.estimator as estimator
import pedenet.training as training
from pedenet.builtin import make_builtin_dataset
from pedenet.cli import main
from pedenet.cli import common

FIT = ("--image-size", "64", "--steps", "2", "--seed", "1", "--quiet")


@pytest.fixture(scope="module", autouse=True)
def _fast():
    mp = pytest.MonkeyPatch()
    # EM initialization on fewer samples: same code path, a fraction of the time
    mp.setattr(estimator, "init_membership",
               functools.partial(training.init_membership, n_samples=3000, steps=30))
    yield
    mp.undo()


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True,
                              terminal_width=200)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = make_builtin_dataset(tmp_path_factory.mktemp("exit") / "ds", categories=("grass",),
                                n_train=5, n_test_good=1, n_test_defect=1, size=64)
    return root / "grass"


@pytest.fixture(scope="module")
def run_dir(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "grass"
    result = run(["fit", dataset, "--out", out, *FIT])
    assert result.exit_code == 0, result.output
    return out


class Case:
    """What a case's ``build`` gets: the module's data and run, a scratch folder, monkeypatch."""

    def __init__(self, dataset: Path, run_dir: Path, tmp: Path, mp: pytest.MonkeyPatch):
        self.ds, self.run, self.tmp, self.mp = dataset, run_dir, tmp, mp
        self.image = sorted((dataset / "test" / "good").iterdir())[0]

    def copy_run(self, **files) -> Path:
        """A copy of the fitted run with some files replaced (name=text) or removed (name=None)."""
        rd = self.tmp / "run_copy"
        shutil.copytree(self.run, rd)
        for name, text in files.items():
            name = name.replace("_json", ".json").replace("_pt", ".pt")
            if text is None:
                (rd / name).unlink()
            else:
                (rd / name).write_text(text)
        return rd

    def config(self, **changes) -> str:
        return json.dumps({**json.loads((self.run / "config.json").read_text()), **changes})

    def folder(self, name: str = "empty", *files: str) -> Path:
        d = self.tmp / name
        d.mkdir(parents=True, exist_ok=True)
        for f in files:
            (d / f).write_text("x")
        return d

    def folder_with_image(self, name: str) -> Path:
        d = self.folder(name)
        shutil.copy(self.image, d)
        return d

    def file(self, name: str = "a_file.txt") -> Path:
        p = self.tmp / name
        p.write_text("not what it should be")
        return p

    def corrupt_png(self, name: str = "bad.png") -> Path:
        p = self.tmp / name
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(p)
        p.write_bytes(p.read_bytes()[:60])
        return p

    def without_module(self, name: str) -> Path:
        """Make ``import name`` fail as if the package were not installed; returns the scratch
        folder (for use inside an argument list)."""
        self.mp.setitem(sys.modules, name, None)
        return self.tmp

    def no_write_permission(self, folder: Path) -> Path:
        """``folder`` refuses new entries as a folder without write permission does (tests may
        run as root, where permission bits do not stop writing)."""
        real = common.tempfile.mkdtemp

        def denied(*args, **kwargs):
            if Path(kwargs.get("dir", "")) == folder:
                raise PermissionError(13, "Permission denied")
            return real(*args, **kwargs)

        self.mp.setattr(common.tempfile, "mkdtemp", denied)
        return folder

    def read_only_run(self) -> Path:
        """A copy of the run on what behaves as a read-only mount (the write check fails)."""
        import tempfile

        rd = self.copy_run()
        real = tempfile.NamedTemporaryFile

        def read_only(*args, **kwargs):
            if Path(kwargs.get("dir", "")) == rd:
                raise OSError(30, "Read-only file system")
            return real(*args, **kwargs)

        self.mp.setattr(common.tempfile, "NamedTemporaryFile", read_only)
        return rd

    def load_raises(self, exc: BaseException) -> Path:
        def load(*args, **kwargs):
            raise exc
        self.mp.setattr(estimator.PEDENet, "load", staticmethod(load))
        return self.run


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

# (verb, case, expected exit code, arguments built from a Case, fragment of the error line)
CASES = [
    # ---- fit
    ("fit", "unknown option", 2, lambda c: ["fit", c.ds, "--out", c.tmp / "r", "--bogus"], "--bogus"),
    ("fit", "DATA does not exist", 2, lambda c: ["fit", c.tmp / "nowhere", "--out", c.tmp / "r", *FIT],
     "does not exist"),
    ("fit", "DATA is a file", 2, lambda c: ["fit", c.file(), "--out", c.tmp / "r", *FIT], "not a folder"),
    ("fit", "--verbose --quiet", 2, lambda c: ["fit", c.ds, "--out", c.tmp / "r", *FIT, "--verbose"],
     "contradict"),
    ("fit", "--memory-bank-size without distance", 2,
     lambda c: ["fit", c.ds, "--out", c.tmp / "r", *FIT, "--memory-bank-size", "5"], "--scoring distance"),
    ("fit", "contradictory settings", 2,
     lambda c: ["fit", c.ds, "--out", c.tmp / "r", "--keep-aspect", "--image-size", "0"], "keep_aspect"),
    ("fit", "--out is a file", 2, lambda c: ["fit", c.ds, "--out", c.file("out"), *FIT], "is a file"),
    ("fit", "existing model", 2, lambda c: ["fit", c.ds, "--out", c.run, *FIT], "--overwrite"),
    ("fit", "--resume --overwrite", 2,
     lambda c: ["fit", c.ds, "--out", c.run, *FIT, "--resume", "--overwrite"], "pass one"),
    ("fit", "--out not a run, not empty", 2, lambda c: ["fit", c.ds, "--out", c.folder("o", "x.txt"), *FIT],
     "not empty"),
    ("fit", "no images", 1, lambda c: ["fit", c.folder(), "--out", c.tmp / "r", *FIT], "no images"),
    ("fit", "corrupt image", 1,
     lambda c: ["fit", c.corrupt_png().parent, "--out", c.tmp / "r", *FIT], "bad.png"),
    ("fit", "no write permission", 1,
     lambda c: ["fit", c.ds, "--out", c.no_write_permission(c.folder("ro")) / "r", *FIT], "Permission denied"),
    pytest.param("fit", "no CUDA", 1, lambda c: ["fit", c.ds, "--out", c.tmp / "r", *FIT, "--device", "cuda"],
                 "CUDA", marks=no_cuda),
    # ---- evaluate
    ("evaluate", "RUN_DIR does not exist", 2, lambda c: ["evaluate", c.tmp / "nowhere"], "does not exist"),
    ("evaluate", "--data does not exist", 2,
     lambda c: ["evaluate", c.copy_run(), "--data", c.tmp / "nowhere", "--quiet"], "does not exist"),
    ("evaluate", "bad --fpr", 2, lambda c: ["evaluate", c.run, "--fpr", "2"], "--fpr"),
    ("evaluate", "earlier results", 2, lambda c: ["evaluate", c.copy_run(metrics_json="{}"), "--quiet"],
     "--overwrite"),
    ("evaluate", "no model.pt", 1, lambda c: ["evaluate", c.folder("x", "notes.txt")], "not a pedenet run"),
    ("evaluate", "corrupt model.pt", 1, lambda c: ["evaluate", c.copy_run(model_pt="garbage")], "model.pt"),
    ("evaluate", "damaged config.json", 1, lambda c: ["evaluate", c.copy_run(config_json="{oops"), "--quiet"],
     "config.json"),
    ("evaluate", "recorded data gone", 1,
     lambda c: ["evaluate", c.copy_run(config_json=c.config(category_dir=str(c.tmp / "gone"),
                                                            data=str(c.tmp / "gone"))), "--quiet"],
     "does not exist"),
    ("evaluate", "--data without the MVTec AD layout", 1,
     lambda c: ["evaluate", c.copy_run(), "--data", c.folder(), "--quiet"], "MVTec AD layout"),
    ("evaluate", "read-only run folder", 1, lambda c: ["evaluate", c.read_only_run(), "--quiet"],
     "cannot write results"),
    ("evaluate", "out of memory", 1, lambda c: ["evaluate", c.load_raises(MemoryError())], "out of memory"),
    ("evaluate", "CUDA out of memory", 1,
     lambda c: ["evaluate", c.load_raises(torch.cuda.OutOfMemoryError("CUDA out of memory."))],
     "out of memory on the GPU"),
    ("evaluate", "Ctrl-C", 130, lambda c: ["evaluate", c.load_raises(KeyboardInterrupt())], "Ctrl-C"),
    ("evaluate", "SIGTERM", 143,
     lambda c: ["evaluate", c.load_raises(common.Terminated(signal.SIGTERM))], "SIGTERM"),
    # ---- predict
    ("predict", "INPUT does not exist", 2,
     lambda c: ["predict", c.run, c.tmp / "nowhere.png", "--out", c.tmp / "p"], "does not exist"),
    ("predict", "INPUT is no image file", 2,
     lambda c: ["predict", c.run, c.file("notes.txt"), "--out", c.tmp / "p"], "not an image file"),
    ("predict", "RUN_DIR does not exist", 2,
     lambda c: ["predict", c.tmp / "nowhere", c.image, "--out", c.tmp / "p"], "does not exist"),
    ("predict", "bad --format", 2,
     lambda c: ["predict", c.run, c.image, "--out", c.tmp / "p", "--format", "gif"], "--format"),
    ("predict", "--resume --overwrite", 2,
     lambda c: ["predict", c.run, c.image, "--out", c.tmp / "p", "--resume", "--overwrite"], "pass one"),
    ("predict", "--resume, nothing to resume", 2,
     lambda c: ["predict", c.run, c.image, "--out", c.tmp / "p", "--resume"], "no interrupted prediction"),
    ("predict", "--out not empty", 2,
     lambda c: ["predict", c.run, c.image, "--out", c.folder("p", "x.txt")], "--overwrite"),
    ("predict", "inputs inside --out", 2,
     lambda c: ["predict", c.run, c.folder_with_image("p"), "--out", c.tmp / "p", "--overwrite"],
     "inside the --out folder"),
    ("predict", "corrupt image", 1,
     lambda c: ["predict", c.run, c.corrupt_png(), "--out", c.tmp / "p", "--quiet"], "bad.png"),
    ("predict", "folder without images", 1,
     lambda c: ["predict", c.run, c.folder("in", "notes.txt"), "--out", c.tmp / "p"], "no image files"),
    ("predict", "corrupt model.pt", 1,
     lambda c: ["predict", c.copy_run(model_pt="garbage"), c.image, "--out", c.tmp / "p"], "model.pt"),
    pytest.param("predict", "no CUDA", 1,
                 lambda c: ["predict", c.run, c.image, "--out", c.tmp / "p", "--device", "cuda"], "CUDA",
                 marks=no_cuda),
    # ---- validate
    ("validate", "RUN_DIR does not exist", 2, lambda c: ["validate", c.tmp / "nowhere"], "does not exist"),
    ("validate", "bad --kinds", 2, lambda c: ["validate", c.run, "--kinds", "dent"], "--kinds"),
    ("validate", "validation.json exists", 2,
     lambda c: ["validate", c.copy_run(validation_json="{}")], "--overwrite"),
    ("validate", "--data is a file", 2, lambda c: ["validate", c.copy_run(), "--data", c.file()],
     "not a folder"),
    ("validate", "held-out images not under --data", 1,
     lambda c: ["validate", c.copy_run(), "--data", c.folder(), "--quiet"], "held-out image not found"),
    ("validate", "damaged config.json", 1,
     lambda c: ["validate", c.copy_run(config_json="[1,"), "--data", c.folder()], "config.json"),
    ("validate", "corrupt model.pt", 1, lambda c: ["validate", c.copy_run(model_pt="garbage")], "model.pt"),
    ("validate", "read-only run folder", 1, lambda c: ["validate", c.read_only_run()], "cannot write results"),
    # ---- rescore
    ("rescore", "RUN_DIR does not exist", 2,
     lambda c: ["rescore", c.tmp / "nowhere", "--scoring", "distance", "--out", c.tmp / "r"], "does not exist"),
    ("rescore", "bad --scoring", 2,
     lambda c: ["rescore", c.run, "--scoring", "knn", "--out", c.tmp / "r"], "--scoring"),
    ("rescore", "--out inside RUN_DIR", 2,
     lambda c: ["rescore", c.run, "--scoring", "distance", "--out", c.run / "sub"], "inside it"),
    ("rescore", "nothing to change", 2,
     lambda c: ["rescore", c.run, "--scoring", "mixture", "--out", c.tmp / "r"], "nothing to change"),
    ("rescore", "existing model in --out", 2,
     lambda c: ["rescore", c.run, "--scoring", "distance", "--out", c.copy_run()], "--overwrite"),
    ("rescore", "--data is a file", 2,
     lambda c: ["rescore", c.run, "--scoring", "distance", "--out", c.tmp / "r", "--data", c.file()],
     "not a folder"),
    ("rescore", "--data without train/good", 1,
     lambda c: ["rescore", c.run, "--scoring", "distance", "--out", c.tmp / "r", "--data", c.folder()],
     "no train/good"),
    ("rescore", "recorded data gone", 1,
     lambda c: ["rescore", c.copy_run(config_json=c.config(category_dir=str(c.tmp / "gone"))),
                "--scoring", "distance", "--out", c.tmp / "r"], "is gone"),
    ("rescore", "no config.json", 1,
     lambda c: ["rescore", c.copy_run(config_json=None), "--scoring", "distance", "--out", c.tmp / "r"],
     "config.json"),
    # ---- demo
    ("demo", "unknown category", 2, lambda c: ["demo", "--categories", "sand", "--out", c.tmp / "d"], "sand"),
    ("demo", "bad --steps", 2, lambda c: ["demo", "--steps", "0", "--out", c.tmp / "d"], "--steps"),
    ("demo", "--out is a file", 2, lambda c: ["demo", "--out", c.file("d")], "is a file"),
    ("demo", "no write permission", 1,
     lambda c: ["demo", "--out", c.no_write_permission(c.folder("ro")) / "d"], "Permission denied"),
    # ---- export
    ("export", "RUN_DIR does not exist", 2,
     lambda c: ["export", c.tmp / "nowhere", "--out", c.tmp / "m.ts"], "does not exist"),
    ("export", "format from an unknown extension", 2,
     lambda c: ["export", c.run, "--out", c.tmp / "m.json"], "cannot tell the format"),
    ("export", "--format contradicts the extension", 2,
     lambda c: ["export", c.run, "--out", c.tmp / "m.ts", "--format", "onnx"], "--format"),
    ("export", "--out exists", 2, lambda c: ["export", c.run, "--out", c.file("m.ts")], "--overwrite"),
    ("export", "--out is the run's model", 2,
     lambda c: ["export", c.run, "--out", c.run / "model.pt", "--overwrite"], "run's own files"),
    ("export", "corrupt model.pt", 1,
     lambda c: ["export", c.copy_run(model_pt="garbage"), "--out", c.tmp / "m.ts"], "model.pt"),
    ("export", "onnx package not installed", 1,
     lambda c: ["export", c.run, "--out", c.without_module("onnx") / "m.onnx"], "pip install"),
    ("export", "no write permission", 1,
     lambda c: ["export", c.run, "--out", c.no_write_permission(c.folder("ro")) / "m.ts"], "Permission denied"),
    # ---- benchmark
    ("benchmark", "RUN_DIR does not exist", 2, lambda c: ["benchmark", c.tmp / "nowhere"], "does not exist"),
    ("benchmark", "--json under a file", 2,
     lambda c: ["benchmark", c.run, "--json", c.file("f") / "b.json"], "is a file"),
    ("benchmark", "unknown option", 2, lambda c: ["benchmark", "--fast"], "--fast"),
    ("benchmark", "no write permission for --json", 1,
     lambda c: ["benchmark", c.run, "--json", c.no_write_permission(c.folder("ro")) / "b.json"],
     "Permission denied"),
    ("benchmark", "corrupt model file", 1,
     lambda c: ["benchmark", c.copy_run(model_pt="garbage") / "model.pt", "--quick"], "model.pt"),
]


def _values(case) -> tuple:
    return case.values if hasattr(case, "values") else case  # a pytest.param or a tuple


def _id(case) -> str:
    verb, what, code = _values(case)[:3]
    return f"{verb}: {what} -> {code}"


@pytest.mark.parametrize("verb,case,code,build,fragment", CASES, ids=[_id(c) for c in CASES])
def test_exit_code(verb, case, code, build, fragment, dataset, run_dir, tmp_path, monkeypatch):
    c = Case(dataset, run_dir, tmp_path, monkeypatch)
    result = run(build(c))
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.output  # one line, the last
    assert fragment in errors[0], (fragment, errors[0])


def test_every_verb_has_a_case_of_each_code():
    covered = {(_values(c)[0], _values(c)[2]) for c in CASES}
    for verb in ("fit", "evaluate", "predict", "validate", "rescore", "demo", "export", "benchmark"):
        assert {(verb, 1), (verb, 2)} <= covered, verb


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("verb", ["predict", "export"])
def test_out_in_a_pseudo_filesystem_is_refused_before_work(verb, dataset, run_dir, tmp_path):
    """/proc takes no new files even for root, whose permission bits let everything through:
    the up-front check tries, and says so in one line instead of an errno after the work."""
    out = Path("/proc") / f"pedenet-exit-code-test-{verb}"
    args = (["predict", run_dir, dataset / "test" / "good", "--out", out] if verb == "predict"
            else ["export", run_dir, "--out", out.with_suffix(".onnx")])
    result = run(args)
    assert result.exit_code == 1, result.output
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert last.startswith("Error: /proc/pedenet-exit-code-test") and "choose another --out" in last
    assert "Traceback" not in result.output and "thresholds" not in result.output  # before the work
