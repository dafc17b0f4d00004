"""Resumable training: the resume checkpoint and interrupt handling.

While :meth:`pedenet.PEDENet.fit` trains with a ``checkpoint`` file (``pedenet fit`` uses
``RUN_DIR/resume.pt``), the training state is written to it atomically
(:func:`pedenet.checkpoint.save_checkpoint`) every ``checkpoint_every`` steps and when SIGINT
(Ctrl-C), SIGTERM or SIGHUP arrives. A signal does not stop a step half way: the step is finished, the
state saved, and :class:`TrainingInterrupted` raised. A second signal acts at once (without
saving; the file keeps the previous state). The file holds, after step ``step``:

* ``state_dict``: every network weight and buffer (the EM-initialized membership network, the
  encoder's feature standardization and reduction, the heads),
* ``optimizer``: the Adam state, ``generator``: the state of the batch-sampling
  ``torch.Generator``, ``history``: the diagnostics so far, ``de_init``: the EM summary,
* ``config`` and ``images`` (resolved path and size of each training image), which must match
  for a resume.

Resuming recomputes the frozen-feature cache (deterministic), skips the EM initialization,
loads the weights, optimizer and generator state and continues from ``step + 1``: the result
equals that of an uninterrupted run with the same seed (on the same device and thread count).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import __version__
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import PEDENetConfig

__all__ = ["TrainingInterrupted", "ResumeWriter", "deferred_interrupts", "read_resume_state",
           "ResumeMismatchError", "image_fingerprints"]


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal after the state was saved to ``path``.

    Attributes: ``step`` (steps done), ``total`` (steps asked for), ``path`` (the resume
    file), ``signum`` (``signal.SIGINT``, ``signal.SIGTERM`` or ``signal.SIGHUP``).
    """

    def __init__(self, step: int, total: int, path: Path, signum: int):
        self.step, self.total, self.path, self.signum = step, total, Path(path), signum
        name = signal.Signals(signum).name if signum in {s.value for s in signal.Signals} else str(signum)
        super().__init__(f"training interrupted by {name} after step {step}/{total}; "
                         f"state saved to {path}")


class _Stop:
    """Holder of the first signal received (``signum``; None while none arrived)."""

    signum: int | None = None


def stop_signals() -> list[int]:
    """The signals that stop a run as Ctrl-C does: SIGINT, SIGTERM and SIGHUP (those this
    platform has), without SIGHUP where the process ignores it (under ``nohup``)."""
    hup = getattr(signal, "SIGHUP", None)
    signums = [signal.SIGINT] + [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    return [s for s in signums if s != hup or signal.getsignal(s) is not signal.SIG_IGN]


@contextlib.contextmanager
def deferred_interrupts(enabled: bool = True):
    """Defer SIGINT, SIGTERM and SIGHUP to the end of the current training step (SIGHUP stays
    ignored where the process ignores it, as under ``nohup``).

    Yields a holder whose ``signum`` is set when the first signal arrives; the original
    handlers are then put back, so a second signal acts immediately. Does nothing (``signum``
    stays None) when ``enabled`` is False or outside the main thread.
    """
    stop = _Stop()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    signums = stop_signals()
    previous = {s: signal.getsignal(s) for s in signums}

    def restore():
        for s, h in previous.items():
            if h is not None:
                signal.signal(s, h)

    def handler(signum, frame):
        if stop.signum is None:
            stop.signum = signum
        restore()

    for s in signums:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        restore()


def image_fingerprint(item) -> list:
    """[resolved path, size in bytes] for a file; [description, SHA-1 of the pixels] for an
    array, tensor or PIL image."""
    if isinstance(item, (str, os.PathLike)):
        p = Path(item).resolve()
        try:
            size = p.stat().st_size
        except OSError:
            size = -1
        return [str(p), int(size)]
    if isinstance(item, Image.Image):
        data = item.tobytes()
        return [f"<PIL {item.mode} {item.size}>", hashlib.sha1(data).hexdigest()]
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(item))
    return [f"<array {arr.dtype} {tuple(arr.shape)}>", hashlib.sha1(arr.tobytes()).hexdigest()]


def image_fingerprints(items) -> list[list]:
    """Identity of the training inputs: [resolved path, size in bytes] for files, a hash of
    the pixels for in-memory images."""
    return [image_fingerprint(it) for it in items]


class ResumeWriter:
    """``on_step`` callback of :func:`pedenet.training.train_network` that writes the resume
    file every ``every`` steps and, after a deferred signal, writes it and raises
    :class:`TrainingInterrupted`."""

    def __init__(self, path, *, every: int, network, config: PEDENetConfig, items, de_init: dict):
        self.path = Path(path)
        self.every = int(every)
        self.network = network
        self.config = config
        self.images = image_fingerprints(items)
        self.de_init = dict(de_init or {})
        self.stop: _Stop | None = None

    def save(self, done: int, optimizer, generator, history) -> None:
        save_checkpoint(self.path, {
            "kind": "resume",
            "pedenet_version": __version__,
            "config": self.config.to_dict(),
            "step": int(done),
            "state_dict": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "history": history.to_dict(),
            "de_init": self.de_init,
            "images": self.images,
        })

    def __call__(self, done: int, *, optimizer, generator, history) -> None:
        signum = self.stop.signum if self.stop is not None else None
        periodic = self.every > 0 and done % self.every == 0 and done < self.config.steps
        if signum is not None or periodic:
            self.save(done, optimizer, generator, history)
        if signum is not None:
            raise TrainingInterrupted(done, self.config.steps, self.path, signum)


def resume_step(path) -> int | None:
    """The step saved in a resume file, or None if it cannot be read."""
    try:
        return int(load_checkpoint(path, kind="resume")["step"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


# Settings used only after the training steps (they may differ on resume; resume files
# written before they existed lack them).
SET_AFTER_TRAINING = ("scoring", "memory_bank_size", "image_score_fraction", "image_score_border")


class ResumeMismatchError(CheckpointError):
    """The resume file is sound but belongs to other settings or other training images."""


def read_resume_state(path, config: PEDENetConfig, items) -> dict:
    """Load a resume file and check that it belongs to this config and these images (the
    settings of ``SET_AFTER_TRAINING`` excepted).

    Raises:
        CheckpointError: unreadable file or a bad step; ResumeMismatchError (a
            CheckpointError): other settings or other images.
    """
    data = load_checkpoint(path, kind="resume")
    saved = data["config"] if isinstance(data["config"], dict) else {}
    want = config.to_dict()
    diffs = [k for k in sorted(set(saved) | set(want))
             if saved.get(k) != want.get(k) and k not in SET_AFTER_TRAINING]
    if diffs:
        listing = ", ".join(f"{k} {saved.get(k)!r} there, {want.get(k)!r} here" for k in diffs[:4])
        raise ResumeMismatchError(
            f"{path}: the interrupted run used other settings ({listing}); resume with the "
            "same options, or start over (pedenet fit --overwrite, without --resume)")
    images = image_fingerprints(items)
    if [list(x) for x in data.get("images", [])] != images:
        n_then = len(data.get("images", []))
        raise ResumeMismatchError(
            f"{path}: the training images changed since the interrupted run ({n_then} trained "
            f"on then, {len(images)} now - the held-out images not counted - or files moved or "
            "replaced); resume needs the same images - restore them, or start over (pedenet fit "
            "--overwrite, without --resume)")
    step = data["step"]
    if not isinstance(step, int) or not 0 <= step <= config.steps:
        raise CheckpointError(f"{path}: invalid step {step!r} for {config.steps} steps; start over "
                              "(pedenet fit --overwrite, without --resume)")
    if not isinstance(data["generator"], torch.Tensor):
        raise CheckpointError(f"{path}: invalid generator state; start over (pedenet fit "
                              "--overwrite, without --resume)")
    return data
