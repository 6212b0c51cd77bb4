"""Checkpoints a run can resume from without trusting them: safe loading, a manifest, ``latest``.

A checkpoint is the tag folder ``checkpoints/step-N/`` that DeepSpeed's ``save_checkpoint`` fills
(model, optimizer, scheduler, loss scaler) plus what fastvl adds: every rank's RNG states
(``rng-rank{R}.pt``) and ``fastvl-checkpoint.json``, the manifest (the run's world size, ZeRO stage,
precision, model family and parameter count, and the size of every file in the folder). ``latest``
is written by fastvl, atomically, only after the manifest: it names a whole checkpoint or nothing.

Loading never runs code from the folder unless asked to: every file DeepSpeed reads goes through
``torch.load(weights_only=True)`` with an allow-list of the few DeepSpeed types its checkpoints hold
(:data:`DEEPSPEED_SAFE_GLOBALS`); a file that needs anything else is refused, naming the file and the
type (``trust=True``, the command line's ``--trust-checkpoint``, loads it with full pickle).

:func:`resume_latest` is what a command calls: it checks ``latest`` and the manifest (missing or
truncated files, a changed world size / ZeRO stage / precision / model) before DeepSpeed opens a
file, falls back to the previous kept checkpoint with a warning when the newest is not whole, and
raises :class:`CheckpointError` with a message for the user otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
import pickle
import re
import shutil

import torch

MANIFEST = "fastvl-checkpoint.json"
LATEST = "latest"
TAG_PREFIX = "step-"
# (module, name) of every non-torch type DeepSpeed 0.1x stores in its checkpoint files: the ZeRO stage
# enum and loss scaler (optimizer states) and the fragment addresses of ZeRO-1/2's flat buffers
DEEPSPEED_SAFE_GLOBALS = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
# what the manifest records about the run, compared on resume, with the option that sets it
RUN_SETTINGS = {"world_size": "the number of ranks", "zero_stage": "--zero-stage", "precision": "--precision",
                "family": "--model", "parameters": "--model (its size)"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says which file or setting and what to do."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file that would need full pickle (arbitrary code) to load."""


class IncompatibleCheckpoint(CheckpointError):
    """A checkpoint of another run setup (world size, ZeRO stage, precision, model)."""


class DiskFull(CheckpointError):
    """The filesystem filled up while a checkpoint was written."""


def tag_name(global_step: int) -> str:
    return f"{TAG_PREFIX}{global_step:08d}"


def _safe_globals() -> list:
    found = []
    for module, name in DEEPSPEED_SAFE_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: one type fewer to allow
            continue
    return found


def load_weights_only(path: str, map_location=None):
    """``torch.load(path, weights_only=True)`` allowing DeepSpeed's checkpoint types; raises
    :class:`UnsafeCheckpoint` for a file that needs anything else and :class:`CheckpointError` for one
    that is not a readable torch file (truncated, garbage, empty)."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(error))
        if wanted:
            raise UnsafeCheckpoint(
                f"{path}: refusing to load it: unpickling it would call {wanted.group(1)}, which is none of the "
                "types DeepSpeed checkpoints hold (a file planted in a copied, shared or downloaded run folder "
                "runs code this way). Resume with --trust-checkpoint only if your own runs wrote every file in "
                "this folder.") from None
        raise CheckpointError(f"{path}: not a readable checkpoint file (garbage or damaged: "
                              f"{_last_line(error)})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint file (truncated or damaged: "
                              f"{_last_line(error) or type(error).__name__})") from None


def _last_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    meaningful = [line for line in lines if "GLOBAL" in line or "Unsupported" in line or "failed" in line]
    return (meaningful or lines or [""])[0].strip()[:200]


@contextlib.contextmanager
def deepspeed_loads_safely(engine, trust: bool = False):
    """Within the block, every file ``engine.load_checkpoint`` reads goes through
    :func:`load_weights_only` (``trust``: through DeepSpeed's own full-pickle load, but damaged files are
    still reported by name). Raises if DeepSpeed read its checkpoint some other way (a version that
    bypasses its checkpoint engine would otherwise unpickle unchecked)."""
    checkpoint_engine = engine.checkpoint_engine
    original = checkpoint_engine.load
    loaded = []

    def load(path, map_location=None):
        loaded.append(path)
        if not trust:
            return load_weights_only(path, map_location)
        try:
            return original(path, map_location=map_location)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            raise CheckpointError(f"{path}: not a readable checkpoint file ({_last_line(error)})") from None

    checkpoint_engine.load = load
    try:
        yield loaded
    finally:
        checkpoint_engine.load = original
    if not loaded:
        raise CheckpointError("DeepSpeed loaded the checkpoint without its checkpoint engine, so fastvl could not "
                              "check the files; resume with --trust-checkpoint if you trust them")


# manifest and latest ----------------------------------------------------------------------------------


def write_manifest(tag_dir: str, settings: dict) -> None:
    """Records ``settings`` and the size of every file in ``tag_dir`` (call once all ranks have written)."""
    files = {name: os.path.getsize(os.path.join(tag_dir, name)) for name in sorted(os.listdir(tag_dir))
             if name != MANIFEST and os.path.isfile(os.path.join(tag_dir, name))}
    _write_atomically(os.path.join(tag_dir, MANIFEST), json.dumps({"format": 1, **settings, "files": files}, indent=1))


def write_latest(checkpoint_dir: str, tag: str) -> None:
    _write_atomically(os.path.join(checkpoint_dir, LATEST), tag)


def _write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def read_latest(checkpoint_dir: str) -> str | None:
    """The tag ``latest`` names; None without a ``latest``. Raises for an unreadable one."""
    path = os.path.join(checkpoint_dir, LATEST)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read it ({error})") from None


def kept_tags(checkpoint_dir: str) -> list[str]:
    """The ``step-N`` folders, newest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    return sorted((t for t in os.listdir(checkpoint_dir)
                   if t.startswith(TAG_PREFIX) and os.path.isdir(os.path.join(checkpoint_dir, t))), reverse=True)


def check_whole(tag_dir: str) -> dict | None:
    """The manifest of a whole checkpoint (None for a folder without one: written before manifests
    existed); raises :class:`CheckpointError` naming what is missing or truncated."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(path):
        if not os.path.isdir(tag_dir):
            raise CheckpointError(f"{tag_dir}: no such checkpoint folder")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: damaged manifest ({error})") from None
    problems = []
    for name, size in files.items():
        file = os.path.join(tag_dir, name)
        if not os.path.isfile(file):
            problems.append(f"{name} is missing")
        elif os.path.getsize(file) != size:
            problems.append(f"{name} has {os.path.getsize(file)} bytes, {size} were written")
    if problems:
        raise CheckpointError(f"{tag_dir}: not a whole checkpoint: " + "; ".join(problems))
    return manifest


def check_compatible(manifest: dict | None, settings: dict, tag_dir: str) -> None:
    """Raises naming every run setting that differs between the checkpoint and this run."""
    if manifest is None:
        return
    differ = [f"{key}: checkpoint {manifest[key]!r}, this run {settings[key]!r} ({RUN_SETTINGS[key]})"
              for key in RUN_SETTINGS if key in manifest and key in settings and manifest[key] != settings[key]]
    if differ:
        raise IncompatibleCheckpoint(
            f"{tag_dir} was written by a different run setup: " + "; ".join(differ) + ". Resume with the "
            "checkpoint's settings (DeepSpeed's files are partitioned for its world size, ZeRO stage and "
            "precision), or start a new run with another --out or --no-resume.")


def resume_latest(engine, checkpoint_dir: str, settings: dict, *, trust: bool = False, warn=print):
    """Loads the newest whole checkpoint into ``engine``: returns ``(tag_dir, client_state)``, or None
    when ``checkpoint_dir`` has no ``latest`` (nothing to resume).

    ``latest`` first; if it is empty or dangling, or names a checkpoint with missing or truncated
    files (or, on one rank, a file that does not load), the next older kept one, with a warning
    through ``warn``. A file that needs pickle (without ``trust``) or a changed run setup raises
    :class:`CheckpointError` at once, as does having no whole checkpoint left."""
    latest = read_latest(checkpoint_dir)
    if latest is None:
        return None
    candidates = kept_tags(checkpoint_dir)
    if latest in candidates:
        candidates = [latest] + [t for t in candidates if t < latest]
    else:
        warn(f"warning: {os.path.join(checkpoint_dir, LATEST)} names {latest!r}, which is not a checkpoint "
             "folder; trying the newest kept checkpoint")
    single_rank = settings.get("world_size", 1) == 1
    problems = []
    for tag in candidates:
        tag_dir = os.path.join(checkpoint_dir, tag)
        try:
            manifest = check_whole(tag_dir)
            if manifest is None and tag != latest:
                continue  # a folder without a manifest that latest does not name: an interrupted save
            check_compatible(manifest, settings, tag_dir)
        except IncompatibleCheckpoint:
            raise
        except CheckpointError as error:
            problems.append(str(error))
            warn(f"warning: {error}; trying the previous kept checkpoint")
            continue
        try:
            with deepspeed_loads_safely(engine, trust):
                path, client_state = engine.load_checkpoint(checkpoint_dir, tag=tag, load_optimizer_states=True,
                                                            load_lr_scheduler_states=True)
        except UnsafeCheckpoint:
            raise
        except CheckpointError as error:
            if not single_rank:  # the other ranks may have loaded theirs: no consistent fallback
                raise
            problems.append(str(error))
            warn(f"warning: {error}; trying the previous kept checkpoint")
            continue
        except Exception as error:  # DeepSpeed's own checks (e.g. a folder written before manifests existed)
            raise CheckpointError(f"{tag_dir}: DeepSpeed could not load it: {type(error).__name__}: "
                                  f"{_last_line(error)}") from error
        if path is None or client_state is None:
            problems.append(f"{tag_dir}: DeepSpeed found no model states for this rank")
            warn(f"warning: {problems[-1]}; trying the previous kept checkpoint")
            continue
        return tag_dir, client_state
    raise CheckpointError(f"no whole checkpoint to resume from in {checkpoint_dir}: " + " | ".join(problems) +
                          ". Remove the damaged folders, or start over with --no-resume or another --out.")


# saving -----------------------------------------------------------------------------------------------


def is_disk_full(error: BaseException, path: str) -> bool:
    """Whether ``error`` (from writing under ``path``) means the filesystem is full: ENOSPC / EDQUOT, or
    any write error with less than 1 MiB left (torch's zip writer reports a full disk as a position
    mismatch)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(path).free < 2**20
    except OSError:
        return False


def remove_partial(tag_dir: str) -> None:
    """Deletes the folder of a checkpoint that was not completely written (``latest`` never named it)."""
    shutil.rmtree(tag_dir, ignore_errors=True)
