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
import tempfile
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
    """
    path = Path(path)
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


def load_checkpoint(path: str | os.PathLike, kind: str = "model") -> dict:
    """Read a checkpoint without executing code.

    Args:
        path: the file.
        kind: ``"model"`` (a fitted model, ``model.pt``) or ``"resume"`` (an unfinished
            training run, ``resume.pt``). Files without a kind tag are models.

    Raises:
        CheckpointError: missing file, not a torch file, tampered/unsafe content, not a
            pedenet checkpoint, the other kind, or written by an incompatible format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; run `pedenet fit` first or check the path")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only: no code ran; any failure means a bad file
        raise CheckpointError(
            f"{path}: not a loadable pedenet checkpoint (corrupt, truncated, or holding unsafe content): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a pedenet checkpoint (no '{FORMAT}' tag)")
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
