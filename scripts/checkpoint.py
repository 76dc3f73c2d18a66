"""Checkpoints: params and optimizer state in one safetensors file with JSON metadata, replaced atomically."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from scripts.data import MAX_FUTURE

FORMAT = "cells-checkpoint-2"  # 2: a sha256 over metadata and tensors (1 had none)
CHECKPOINT = "checkpoint.safetensors"  # the source of truth: tensors + metadata, one atomic file
SUMMARY = "checkpoint.json"  # a readable copy of the metadata (config and history)
TEMP_SUFFIX = ".tmp"  # write_atomic's temporary files: `.<name>.<random>.tmp`, left behind only by a kill -9


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the run; one line for the user."""


@dataclass
class Checkpoint:
    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # an optimizer state_dict
    config: dict[str, Any]
    history: list[dict[str, Any]]
    step: int  # completed steps
    data_stats: tuple[float, float]  # (mean, std) used to standardize the data


def write_atomic(path: Path, write: Any) -> None:
    """Call `write(temp_path)`, flush it to disk, then rename over `path`: readers see old or new, never half.

    A KeyboardInterrupt or an error while writing removes the temporary file; a kill -9 may leave it
    behind (`remove_stale_temps` clears it), but never touches `path`.
    """
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(handle)
    try:
        write(Path(temp))
        with open(temp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temp, path)
        _fsync_directory(path.parent)  # the rename itself survives a power cut
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def _fsync_directory(directory: Path) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms (Windows) cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete write_atomic's leftovers (`.checkpoint.safetensors.*.tmp` ...) from a killed run; returns them."""
    stale = [path for name in (CHECKPOINT, SUMMARY, "metrics.json") for path in Path(directory).glob(f".{name}.*{TEMP_SUFFIX}")]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, lambda temp: temp.write_text(json.dumps(value, indent=2)))


def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for nested dicts/lists of numbers, with tensors moved into `tensors` under `name`."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().contiguous().clone()
        return {"tensor": name}
    if isinstance(value, dict):
        return {"dict": [[key, _encode(item, f"{name}.{index}", tensors)] for index, (key, item) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return {"list": [_encode(item, f"{name}.{index}", tensors) for index, item in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "dict" in node:
        return {key: _decode(item, tensors) for key, item in node["dict"]}
    if "list" in node:
        return [_decode(item, tensors) for item in node["list"]]
    return node["value"]


def _digest(meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata string and every tensor's name, dtype, shape and bytes (sorted by name)."""
    digest = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> None:
    """Write `checkpoint.safetensors` (atomic, with a sha256 of its content) and its readable `checkpoint.json`."""
    tensors = {f"params/{key}": value.detach().cpu().contiguous().clone() for key, value in checkpoint.params.items()}
    optimizer = _encode(checkpoint.optimizer, "optimizer", tensors)
    summary = {"format": FORMAT, "step": checkpoint.step, "config": checkpoint.config, "history": checkpoint.history, "data_stats": list(checkpoint.data_stats)}
    meta_json = json.dumps({**summary, "optimizer": optimizer, "param_keys": list(checkpoint.params)})
    metadata = {"cells": meta_json, "sha256": _digest(meta_json, tensors)}
    write_atomic(directory / CHECKPOINT, lambda temp: save_file(tensors, str(temp), metadata=metadata))
    write_json(directory / SUMMARY, summary)


def has_checkpoint(directory: Path) -> bool:
    return (Path(directory) / CHECKPOINT).is_file()


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Read and validate a checkpoint; CheckpointError (one line) if missing, corrupt or malformed.

    Nothing is unpickled (safetensors holds raw tensors and a JSON string), the sha256 over metadata
    and tensors is checked before anything is decoded, and every metadata field is validated before use.
    """
    path = Path(directory) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{directory}: no checkpoint here (expected {path})")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a readable cells checkpoint (truncated or corrupted?): {_first_line(error)}") from None
    if not isinstance(metadata.get("cells"), str) or not isinstance(metadata.get("sha256"), str):
        raise CheckpointError(f"{path}: not a readable cells checkpoint (truncated or corrupted?): metadata 'cells' or 'sha256' is missing")
    if _digest(metadata["cells"], tensors) != metadata["sha256"]:
        raise CheckpointError(f"{path}: not a readable cells checkpoint (truncated or corrupted?): its sha256 does not match its content")
    try:
        meta = json.loads(metadata["cells"])
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{path}: not a readable cells checkpoint (truncated or corrupted?): metadata is not JSON ({_first_line(error)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: expected format {FORMAT!r}, got {meta.get('format') if isinstance(meta, dict) else meta!r}")
    for field, kind in (("step", int), ("config", dict), ("history", list), ("param_keys", list), ("data_stats", list)):
        if not isinstance(meta.get(field), kind) or isinstance(meta.get(field), bool):
            raise CheckpointError(f"{path}: metadata field {field!r} is missing or not a {kind.__name__}")
    _check_meta(path, meta)
    params = {}
    for key in meta["param_keys"]:
        if not isinstance(key, str) or f"params/{key}" not in tensors:
            raise CheckpointError(f"{path}: tensor 'params/{key}' is missing")
        tensor = tensors[f"params/{key}"]
        if tensor.dtype not in (torch.float64, torch.float32):
            raise CheckpointError(f"{path}: tensor 'params/{key}': expected dtype float64 or float32, got {str(tensor.dtype).removeprefix('torch.')}")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor 'params/{key}' holds non-finite values")
        params[key] = tensor
    try:
        optimizer = _decode(meta.get("optimizer", {"value": None}), tensors)
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as error:
        raise CheckpointError(f"{path}: optimizer state is malformed ({type(error).__name__}: {_first_line(error)})") from None
    if optimizer is not None and not isinstance(optimizer, dict):
        raise CheckpointError(f"{path}: optimizer state: expected a dict (an optimizer state_dict), got {type(optimizer).__name__}")
    return Checkpoint(params, optimizer, meta["config"], meta["history"], meta["step"], (float(meta["data_stats"][0]), float(meta["data_stats"][1])))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# config field -> (check, what is expected); fields not listed are ignored by TrainConfig.from_dict anyway
CONFIG_FIELDS: dict[str, tuple[Any, str]] = {
    "arch": (lambda v: isinstance(v, str) and v != "", "a non-empty str"),
    "imp": (lambda v: v in ("functional", "torch"), "'functional' or 'torch'"),
    "steps": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "lr": (lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "optimizer": (lambda v: v in ("lbfgs", "adam"), "'lbfgs' or 'adam'"),
    "line_search": (lambda v: v in (None, "strong_wolfe"), "null or 'strong_wolfe'"),
    "hidden": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "layers": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "future": (lambda v: _is_int(v) and 0 <= v <= MAX_FUTURE, f"an int in [0, {MAX_FUTURE}]"),
    "dtype": (lambda v: v in ("float64", "float32"), "'float64' or 'float32'"),
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**32, "an int in [0, 2**32)"),
    "device": (lambda v: isinstance(v, str), "a str"),
    "data": (lambda v: v is None or isinstance(v, str), "null or a path"),
    "test_series": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "window": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
}
REQUIRED_CONFIG = ("arch", "imp", "hidden", "layers", "dtype", "optimizer")  # what the tensors mean; the rest has defaults
def _is_loss(value: Any) -> bool:
    """One loss, or one per ensemble member."""
    return _is_number(value) or (isinstance(value, list) and len(value) > 0 and all(_is_number(item) for item in value))


# history entry field -> (check, expected, required)
HISTORY_FIELDS = {
    "step": (_is_int, "an int", True),
    "train_loss": (_is_loss, "a number (or a list of numbers)", True),
    "test_loss": (_is_loss, "a number (or a list of numbers)", True),
    "evaluations": (_is_int, "an int", False),
    "wall_s": (_is_number, "a number", False),
}


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """Validate config, history, step and data_stats before anything uses them."""
    config = meta["config"]
    for field in REQUIRED_CONFIG:
        if field not in config:
            raise CheckpointError(f"{path}: config field {field!r} is missing")
    for field, (check, expected) in CONFIG_FIELDS.items():
        if field in config and not check(config[field]):
            raise CheckpointError(f"{path}: config field {field!r}: expected {expected}, got {config[field]!r}")
    step, history = meta["step"], meta["history"]
    if step < 0 or step != len(history):
        raise CheckpointError(f"{path}: metadata field 'step': expected the number of history entries ({len(history)}), got {step}")
    for index, entry in enumerate(history):
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: history[{index}]: expected a dict, got {type(entry).__name__}")
        for field, (check, expected, required) in HISTORY_FIELDS.items():
            if (required or field in entry) and not check(entry.get(field)):
                raise CheckpointError(f"{path}: history[{index}][{field!r}]: expected {expected}, got {entry.get(field)!r}")
        if entry["step"] != index:
            raise CheckpointError(f"{path}: history[{index}]['step']: expected {index}, got {entry['step']}")
    stats = meta["data_stats"]
    if len(stats) != 2 or not all(_is_number(value) and math.isfinite(value) for value in stats) or stats[1] <= 0:
        raise CheckpointError(f"{path}: metadata field 'data_stats': expected [mean, std] with finite values and std > 0, got {stats!r}")
