"""Checkpoints: params and optimizer state in one safetensors file with JSON metadata, replaced atomically."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

FORMAT = "cells-checkpoint-1"
CHECKPOINT = "checkpoint.safetensors"  # the source of truth: tensors + metadata, one atomic file
SUMMARY = "checkpoint.json"  # a readable copy of the metadata (config and history)


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
    """Call `write(temp_path)`, flush it to disk, then rename over `path`: readers see old or new, never half."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temp))
        with open(temp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


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


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> None:
    """Write `checkpoint.safetensors` (atomic) and its readable `checkpoint.json`."""
    tensors = {f"params/{key}": value.detach().cpu().contiguous().clone() for key, value in checkpoint.params.items()}
    optimizer = _encode(checkpoint.optimizer, "optimizer", tensors)
    summary = {"format": FORMAT, "step": checkpoint.step, "config": checkpoint.config, "history": checkpoint.history, "data_stats": list(checkpoint.data_stats)}
    metadata = {"cells": json.dumps({**summary, "optimizer": optimizer, "param_keys": list(checkpoint.params)})}
    write_atomic(directory / CHECKPOINT, lambda temp: save_file(tensors, str(temp), metadata=metadata))
    write_json(directory / SUMMARY, summary)


def has_checkpoint(directory: Path) -> bool:
    return (Path(directory) / CHECKPOINT).is_file()


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Read and validate a checkpoint; CheckpointError (one line) if missing, corrupt or malformed."""
    path = Path(directory) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{directory}: no checkpoint here (expected {path})")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        tensors = load_file(str(path))
        meta = json.loads(metadata["cells"])
    except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable cells checkpoint (truncated or corrupted?): {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: expected format {FORMAT!r}, got {meta.get('format') if isinstance(meta, dict) else meta!r}")
    for field, kind in (("step", int), ("config", dict), ("history", list), ("param_keys", list), ("data_stats", list)):
        if not isinstance(meta.get(field), kind):
            raise CheckpointError(f"{path}: metadata field {field!r} is missing or not a {kind.__name__}")
    missing = [key for key in meta["param_keys"] if f"params/{key}" not in tensors]
    if missing:
        raise CheckpointError(f"{path}: tensor 'params/{missing[0]}' is missing")
    try:
        optimizer = _decode(meta.get("optimizer", {"value": None}), tensors)
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: optimizer state is malformed ({error})") from None
    params = {key: tensors[f"params/{key}"] for key in meta["param_keys"]}
    return Checkpoint(params, optimizer, meta["config"], meta["history"], meta["step"], tuple(meta["data_stats"]))
