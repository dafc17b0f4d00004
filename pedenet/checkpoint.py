"""Saving and loading PEDENet checkpoints: atomic writes, no code execution on load.

A checkpoint is a ``torch.save`` dict of tensors and plain values only, read back with
``torch.load(weights_only=True)`` (no pickled code runs). It holds the format tag and version,
its kind, the config, the network weights (input normalization and feature standardization
included as buffers) and either the fitted mixture (φ, μ, Σ) and training history (kind
``"model"``, ``model.pt``) or the state of an unfinished training run (kind ``"resume"``,
``resume.pt``: step, optimizer state, random generator state, history so far).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

FORMAT = "pedenet-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a valid, compatible pedenet checkpoint."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync, then rename.

    A reader never sees a half-written ``path``: it either holds the old or the new content.
    The file gets the usual permissions of a new file (0o666 minus the umask), not the
    owner-only ones of a temporary file.

    Raises IsADirectoryError (naming ``path``) when ``path`` is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; give a file name (e.g. {path / 'model.pt'})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` (tensors and plain values) atomically, tagged with format and version."""
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    atomic_write_bytes(path, lambda fh: torch.save(data, fh))


REQUIRED_KEYS = {
    "model": ("config", "state_dict", "mixture"),
    "resume": ("config", "state_dict", "optimizer", "generator", "step"),
}


INSTEAD = {
    "model": "pass a run folder written by `pedenet fit` (holding model.pt) or that model.pt",
    "resume": "delete it, or start over with `pedenet fit --overwrite` (without --resume)",
}
"""What to do instead, by checkpoint kind, at the end of a load error."""

TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
"""First bytes of a file ``torch.load`` can read: a zip archive (``torch.save``) or a pickle
(the legacy format)."""


def _foreign_file(path: Path) -> str:
    """What a file that ``torch.load`` cannot read is, for an error message."""
    from PIL import Image

    if path.suffix.lower() == ".onnx":
        return "it is an ONNX model, as `pedenet export` writes: run it with onnxruntime"

    try:
        with Image.open(path) as img:
            return f"it is a {img.format} image"
    except Exception:  # not an image either
        return "not a PyTorch file"


def _load_error(path: Path, kind: str, exc: Exception) -> CheckpointError:
    """A short CheckpointError for a failed ``torch.load``, without PyTorch's long advice."""
    text = str(exc).strip()
    first = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
    if isinstance(exc, pickle.UnpicklingError) or first.startswith("Weights only load failed"):
        # the weights_only unpickler refused an object: nothing ran
        why = ("not a pedenet checkpoint (it holds objects other than tensors and plain values: "
               "unsafe to load, nothing was run)")
    else:
        why = f"not a loadable pedenet checkpoint (corrupt or truncated: {first[:120]})"
        if kind == "model":  # a damaged model.pt: the file, not the choice of file, is wrong
            return CheckpointError(f"{path}: {why}; copy it again from where it was written, "
                                   "or fit the model again with `pedenet fit`")
    return CheckpointError(f"{path}: {why}; {INSTEAD[kind]}")


def _inspect_zip(path: Path) -> tuple[bool, str | None]:
    """One pass over the zip archive ``path`` (``torch.save``'s format): whether it is a
    TorchScript archive (``torch.jit.save``: it holds compiled code, ``<name>/code/...``, which
    ``torch.save`` files never do), and the first entry whose CRC-32 does not match its bytes
    (None if all do). ``torch.load`` does not check these checksums, so flipped bytes in the
    weights would load silently and give wrong scores. A file that is not a readable zip
    (e.g. truncated) gives (False, None): ``torch.load`` then reports it."""
    try:
        with zipfile.ZipFile(path) as archive:
            if any("/code/" in name for name in archive.namelist()):
                return True, None
            return False, archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        return False, None


def load_checkpoint(path: str | os.PathLike, kind: str = "model") -> dict:
    """Read a checkpoint without executing code.

    Args:
        path: the file.
        kind: ``"model"`` (a fitted model, ``model.pt``) or ``"resume"`` (an unfinished
            training run, ``resume.pt``). Files without a kind tag are models.

    Raises:
        CheckpointError: missing file, a folder, an empty file, not a torch file (an image, text, ...),
            tampered/unsafe content, damaged bytes (a zip entry whose CRC-32 does not match),
            not a pedenet checkpoint (an exported TorchScript or ONNX model is named as
            such), the other kind, or written by an incompatible format
            version. The message names the file and is one short line.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "model.pt").is_file():
            raise CheckpointError(f"{path}: is a folder, not a pedenet checkpoint; "
                                  f"pass {path / 'model.pt'}")
        raise CheckpointError(f"{path}: is a folder without model.pt, not a pedenet checkpoint; "
                              f"{INSTEAD[kind]}")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; run `pedenet fit` first or check the path")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror or exc})") from None
    if not head:  # pedenet writes atomically, so an empty file is a failed copy or another tool's
        fix = ("copy it again from where it was written, or fit the model again with `pedenet fit`"
               if kind == "model" else INSTEAD[kind])
        raise CheckpointError(f"{path}: empty (0 bytes), not a pedenet checkpoint; {fix}")
    if not head.startswith(TORCH_MAGIC):
        raise CheckpointError(f"{path}: not a pedenet checkpoint ({_foreign_file(path)}); "
                              f"{INSTEAD[kind]}")
    torchscript, bad = _inspect_zip(path) if head.startswith(TORCH_MAGIC[0]) else (False, None)
    if torchscript:
        raise CheckpointError(f"{path}: an exported TorchScript model (`pedenet export`), not a "
                              f"pedenet checkpoint: run it with torch.jit.load; {INSTEAD[kind]}")
    if bad is not None:
        fix = ("copy it again from where it was written, or fit the model again with `pedenet fit`"
               if kind == "model" else INSTEAD[kind])
        raise CheckpointError(f"{path}: corrupt: the checksum of its part {bad!r} does not match "
                              f"its bytes (damaged on disk or in a copy); {fix}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only: no code ran; any failure means a bad file
        raise _load_error(path, kind, exc) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a pedenet checkpoint (a PyTorch file without the "
                              f"'{FORMAT}' tag); {INSTEAD[kind]}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version}, this pedenet reads version {FORMAT_VERSION}; "
            "retrain with `pedenet fit` or use the pedenet version that wrote it"
        )
    found = data.get("kind", "model")
    if found != kind:
        if found == "resume":
            raise CheckpointError(
                f"{path}: is the resume state of an unfinished `pedenet fit`, not a model; "
                "finish the run with `pedenet fit ... --resume`")
        raise CheckpointError(f"{path}: is a pedenet {found!s} checkpoint, not a {kind} checkpoint")
    for key in REQUIRED_KEYS[kind]:
        if key not in data:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'; it is incomplete")
    return data
