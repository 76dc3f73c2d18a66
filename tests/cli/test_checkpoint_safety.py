"""Checkpoints are untrusted files: never unpickled, checksummed, every metadata field validated; a bad one is one line and exit 2."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import scripts.checkpoint as checkpoint_module
from scripts.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint, remove_stale_temps
from scripts.train import TrainConfig, run

ROOT = Path(__file__).resolve().parents[2]


def small_series(path: Path) -> Path:
    rng = np.random.default_rng(0)
    t = np.arange(30)
    np.save(path, np.sin(t[None, :] / 4 + rng.uniform(0, 6, size=(5, 1))))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Two real runs of two steps each (LBFGS and Adam), trained once for the module."""
    root = tmp_path_factory.mktemp("checkpoints")
    data = small_series(root / "series.npy")
    runs = {}
    with pytest.MonkeyPatch.context() as patch:  # the figures play no part in the checkpoint
        patch.setattr("scripts.train.plot_forecast", lambda *args, **kwargs: None)
        patch.setattr("scripts.train.plot_losses", lambda *args, **kwargs: None)
        for optimizer in ("lbfgs", "adam"):
            config = TrainConfig(arch="gru", hidden=3, steps=2, future=4, data=str(data), optimizer=optimizer, lr=0.8 if optimizer == "lbfgs" else 0.01)
            (root / optimizer).mkdir()
            run(config, root / optimizer)
            runs[optimizer] = root / optimizer
    return runs


@pytest.fixture
def run_dir(saved, tmp_path) -> Path:
    """A private copy of the LBFGS run, free to corrupt."""
    return Path(shutil.copytree(saved["lbfgs"], tmp_path / "run"))


def same_checkpoint(a, b) -> bool:
    def flat(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", value.dtype, tuple(value.shape), value.tolist())
        if isinstance(value, dict):
            return {key: flat(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [flat(item) for item in value]
        return value

    return all(flat(getattr(a, field)) == flat(getattr(b, field)) for field in ("params", "optimizer", "config", "history", "step", "data_stats"))


def one_line_error(directory: Path, expected: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    message = str(info.value)
    assert "\n" not in message, message
    assert expected in message, message
    return message


def rewrite(directory: Path, meta=None, tensors=None, sha=True) -> None:
    """Re-save the checkpoint with its metadata JSON and tensors changed by `meta(dict)` / `tensors(dict)`, and a valid sha256."""
    path = directory / CHECKPOINT
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    content = load_file(str(path))
    decoded = json.loads(metadata["cells"])
    if meta:
        decoded = meta(decoded) or decoded
    if tensors:
        content = tensors(content) or content
    text = decoded if isinstance(decoded, str) else json.dumps(decoded)
    digest = checkpoint_module._digest(text, content) if sha else metadata["sha256"]
    save_file(content, str(path), metadata={"cells": text, "sha256": digest})


# --- never unpickled ---------------------------------------------------------------------------------------------


def test_no_code_path_can_unpickle():
    """No pickle import and no torch.load without weights_only=True anywhere in the package; data .npy files are read with allow_pickle=False."""
    for source in [*ROOT.glob("scripts/*.py"), *ROOT.glob("functional/*.py"), *ROOT.glob("parity/*.py")]:
        text = source.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M), source
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{source}: {call}"
        for call in re.findall(r"np\.load\([^)]*\)", text):
            assert "allow_pickle=False" in call, f"{source}: {call}"


def test_the_file_is_plain_safetensors(saved):
    """The checkpoint is an 8-byte header length, a JSON header, then raw tensor bytes: nothing executable."""
    raw = (saved["lbfgs"] / CHECKPOINT).read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_length])
    assert set(header["__metadata__"]) == {"cells", "sha256"}
    assert all(entry["dtype"] in ("F64", "F32", "I64") for key, entry in header.items() if key != "__metadata__")


# --- truncation and byte flips -------------------------------------------------------------------------------------


def test_truncated_at_random_offsets_is_always_a_one_line_error(run_dir):
    path = run_dir / CHECKPOINT
    raw = path.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    rng = random.Random(7)
    offsets = sorted({0, 1, 7, 8, 9, header_end - 1, header_end, header_end + 1, len(raw) - 1, *rng.sample(range(len(raw)), 40)})
    for offset in offsets:
        path.write_bytes(raw[:offset])
        one_line_error(run_dir, "not a readable cells checkpoint (truncated or corrupted?)")


def test_flipped_bytes_are_detected_or_harmless(run_dir):
    """Random single-byte corruptions anywhere: a one-line CheckpointError, or (whitespace in the JSON header) the very same checkpoint."""
    path = run_dir / CHECKPOINT
    raw = path.read_bytes()
    original = load_checkpoint(run_dir)
    rng = random.Random(11)
    header_end = 8 + int.from_bytes(raw[:8], "little")
    positions = [rng.randrange(len(raw)) for _ in range(150)] + [rng.randrange(header_end, len(raw)) for _ in range(50)]  # + 50 in tensor data
    detected = 0
    for position in positions:
        corrupted = bytearray(raw)
        corrupted[position] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(corrupted))
        try:
            loaded = load_checkpoint(run_dir)
        except CheckpointError as error:
            assert "\n" not in str(error)
            detected += 1
            continue
        assert same_checkpoint(loaded, original), f"byte {position} changed the checkpoint without an error"
    assert detected >= len(positions) - 10  # only flips inside the header's JSON whitespace can be harmless


def test_flipped_tensor_byte_is_caught_by_the_checksum(run_dir):
    path = run_dir / CHECKPOINT
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # the last tensor's data: still a valid float, silently wrong without a checksum
    path.write_bytes(bytes(raw))
    one_line_error(run_dir, "its sha256 does not match its content")


# --- metadata validated before use ------------------------------------------------------------------------------------


def drop(key):
    return lambda meta: {k: v for k, v in meta.items() if k != key}


def config_field(field, value):
    def mutate(meta):
        meta["config"][field] = value

    return mutate


METADATA_CASES = {
    "not JSON": (lambda meta: "{not json", "metadata is not JSON"),
    "JSON list": (lambda meta: [1, 2], "expected format 'cells-checkpoint-2', got [1, 2]"),
    "other format": (lambda meta: {**meta, "format": "cells-checkpoint-1"}, "expected format 'cells-checkpoint-2', got 'cells-checkpoint-1'"),
    "missing step": (drop("step"), "metadata field 'step' is missing or not a int"),
    "step a string": (lambda meta: {**meta, "step": "2"}, "metadata field 'step' is missing or not a int"),
    "step beyond history": (lambda meta: {**meta, "step": 5}, "metadata field 'step': expected the number of history entries (2), got 5"),
    "config a list": (lambda meta: {**meta, "config": []}, "metadata field 'config' is missing or not a dict"),
    "missing arch": (lambda meta: meta["config"].pop("arch") and None, "config field 'arch' is missing"),
    "hidden a string": (config_field("hidden", "3"), "config field 'hidden': expected an int >= 1, got '3'"),
    "hidden zero": (config_field("hidden", 0), "config field 'hidden': expected an int >= 1, got 0"),
    "dtype unknown": (config_field("dtype", "float16"), "config field 'dtype': expected 'float64' or 'float32', got 'float16'"),
    "lr nan": (config_field("lr", float("nan")), "config field 'lr': expected a finite number >= 0, got nan"),
    "future huge": (config_field("future", 10**7), "config field 'future': expected an int in [0, 100000], got 10000000"),
    "imp unknown": (config_field("imp", "jax"), "config field 'imp': expected 'functional' or 'torch', got 'jax'"),
    "history entry": (lambda meta: meta["history"].__setitem__(1, {"step": 1}), "history[1]['train_loss']: expected a number (or a list of numbers), got None"),
    "history order": (lambda meta: meta["history"][1].__setitem__("step", 0), "history[1]['step']: expected 1, got 0"),
    "data_stats zero std": (lambda meta: {**meta, "data_stats": [0.0, 0.0]}, "metadata field 'data_stats': expected [mean, std] with finite values and std > 0, got [0.0, 0.0]"),
    "missing param key": (lambda meta: meta["param_keys"].append("cells.0.weight_xx"), "tensor 'params/cells.0.weight_xx' is missing"),
    "optimizer tensor gone": (lambda meta: meta.__setitem__("optimizer", {"tensor": "optimizer.nowhere"}), "optimizer state is malformed (KeyError"),
    "optimizer node garbage": (lambda meta: meta.__setitem__("optimizer", {"dict": [[1, 2, 3]]}), "optimizer state is malformed"),
    "optimizer a list": (lambda meta: meta.__setitem__("optimizer", {"list": []}), "optimizer state: expected a dict (an optimizer state_dict), got list"),
}


@pytest.mark.parametrize("case", METADATA_CASES)
def test_bad_metadata_is_a_one_line_error(run_dir, case):
    mutate, message = METADATA_CASES[case]
    rewrite(run_dir, meta=mutate)
    one_line_error(run_dir, message)


TENSOR_CASES = {
    "integer params": (lambda t: t.__setitem__("params/head.bias", t["params/head.bias"].long()), "tensor 'params/head.bias': expected dtype float64 or float32, got int64"),
    "nan params": (lambda t: t.__setitem__("params/head.bias", torch.full_like(t["params/head.bias"], float("nan"))), "tensor 'params/head.bias' holds non-finite values"),
    "missing tensor": (lambda t: t.pop("params/head.bias") and None, "tensor 'params/head.bias' is missing"),
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_bad_tensors_are_a_one_line_error(run_dir, case):
    mutate, message = TENSOR_CASES[case]
    rewrite(run_dir, tensors=mutate)
    one_line_error(run_dir, message)


def test_metadata_without_checksum_or_with_a_wrong_one(run_dir):
    path = run_dir / CHECKPOINT
    raw = path.read_bytes()
    rewrite(run_dir, meta=config_field("hidden", 5), sha=False)  # edited metadata, old checksum
    one_line_error(run_dir, "its sha256 does not match its content")
    path.write_bytes(raw)
    content = load_file(str(path))
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    save_file(content, str(path), metadata={"cells": metadata["cells"]})
    one_line_error(run_dir, "metadata 'cells' or 'sha256' is missing")


def test_params_that_do_not_fit_the_config_are_refused_on_resume(invoke, run_dir):
    """Tensors of a hidden-3 GRU under a config claiming hidden 4: refused before training, with the key and both shapes."""
    rewrite(run_dir, meta=config_field("hidden", 4))
    load_checkpoint(run_dir)  # well-formed on its own
    before = (run_dir / CHECKPOINT).read_bytes()
    code, output = invoke("train", "--resume", run_dir, "--steps", "3")
    assert code == 2, output
    assert "params['cells.0.weight_ih']: expected shape (12, 1) for a 2-layer gru predictor with hidden 4, got (9, 1)" in output
    assert output.strip().count("\n") == 0 and (run_dir / CHECKPOINT).read_bytes() == before


def test_params_of_another_arch_are_refused_on_resume(invoke, run_dir):
    rewrite(run_dir, meta=config_field("arch", "lstm"))
    code, output = invoke("train", "--resume", run_dir, "--steps", "3")
    assert code == 2 and "expected shape (12, 1) for a 2-layer lstm predictor with hidden 3, got (9, 1)" in output, output


def lbfgs_state(mutate):
    def apply(meta):
        optimizer = meta["optimizer"]
        mutate(optimizer)

    return apply


def pairs(node):
    """The encoded dict node as a Python dict of key -> child node (the list of pairs is shared, so edits stick)."""
    return {key: item for key, item in node["dict"]}


def set_pair(node, key, value):
    for pair in node["dict"]:
        if pair[0] == key:
            pair[1] = value


def lbfgs_entry(optimizer):
    return pairs(pairs(optimizer)["state"])[0]


OPTIMIZER_CASES = {
    "lr a string": (lambda o: set_pair(pairs(o)["param_groups"]["list"][0], "lr", {"value": "fast"}), "optimizer state param_groups[0]['lr']: expected a value like 0.8, got 'fast'"),
    "unknown line search": (
        lambda o: set_pair(pairs(o)["param_groups"]["list"][0], "line_search_fn", {"value": "backtracking"}),
        "optimizer state param_groups[0]['line_search_fn']: expected None or 'strong_wolfe', got 'backtracking'",
    ),
    "param group of another optimizer": (lambda o: pairs(o)["param_groups"]["list"][0]["dict"].pop(2), "optimizer state param_groups[0]: expected keys"),
    "n_iter a float": (lambda o: set_pair(lbfgs_entry(o), "n_iter", {"value": 1.5}), "optimizer state state[0]['n_iter']: expected an int, got 1.5"),
    "unknown state key": (lambda o: lbfgs_entry(o)["dict"].append(["momentum", {"value": 1}]), "optimizer state state[0]: expected LBFGS keys"),
}


@pytest.mark.parametrize("case", OPTIMIZER_CASES)
def test_bad_optimizer_state_is_refused_on_resume(invoke, run_dir, case):
    mutate, message = OPTIMIZER_CASES[case]
    rewrite(run_dir, meta=lbfgs_state(mutate))
    code, output = invoke("train", "--resume", run_dir, "--steps", "3")
    assert code == 2, output
    assert message in output and output.strip().count("\n") == 0, output


def test_optimizer_vectors_of_the_wrong_length_are_refused(invoke, run_dir):
    """LBFGS's flat direction `d` of another model's size would fail inside torch; it is checked against the params first."""
    rewrite(run_dir, tensors=lambda t: t.__setitem__(next(k for k in t if k.startswith("optimizer.") and t[k].dim() == 1 and t[k].numel() > 5), torch.zeros(3, dtype=torch.float64)))
    code, output = invoke("train", "--resume", run_dir, "--steps", "3")
    assert code == 2 and re.search(r"optimizer state state\[0\]\['\w+'\](\[\d+\])?: expected a floating-point tensor of shape \(\d+,\), got shape \(3,\)", output), output


def test_adam_state_with_wrong_moment_shapes_is_refused(invoke, saved, tmp_path):
    run_dir = Path(shutil.copytree(saved["adam"], tmp_path / "adam"))

    def mutate(tensors):
        key = next(k for k in tensors if k.startswith("optimizer.") and tensors[k].dim() == 2)
        tensors[key] = torch.zeros(2, 2, dtype=torch.float64)

    rewrite(run_dir, tensors=mutate)
    code, output = invoke("train", "--resume", run_dir, "--steps", "3")
    assert code == 2 and re.search(r"optimizer state state\[\d+\]\['exp_avg(_sq)?'\]: expected a floating-point tensor of shape \(\d+, \d+\), got shape \(2, 2\)", output), output


def test_cli_reports_a_corrupted_checkpoint_in_one_line(invoke, run_dir):
    raw = bytearray((run_dir / CHECKPOINT).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (run_dir / CHECKPOINT).write_bytes(bytes(raw))
    for args in (("predict", "--checkpoint", run_dir), ("train", "--resume", run_dir, "--steps", "3")):
        code, output = invoke(*args)
        assert code == 2 and "not a readable cells checkpoint" in output and output.strip().count("\n") == 0, output


# --- kill -9 in the middle of a write ---------------------------------------------------------------------------------


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(run_dir):
    """A process writing the next checkpoint is killed (SIGKILL) half-way through the file: the old checkpoint loads unchanged,
    the half-written temporary file is the only trace, and remove_stale_temps clears it."""
    before = load_checkpoint(run_dir)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the writer: save the next checkpoint, but stop (forever) after half of the file
        try:
            def half_then_hang(tensors, filename, metadata=None):
                data = safetensors.torch.save(tensors, metadata=metadata)
                with open(filename, "wb") as file:
                    file.write(data[: len(data) // 2])
                    file.flush()
                os.write(write_end, b"half written")
                time.sleep(60)

            checkpoint_module.save_file = half_then_hang
            before.step, before.history = 0, []
            checkpoint_module.save_checkpoint(run_dir, before)
        finally:
            os._exit(1)
    os.close(write_end)
    try:
        assert os.read(read_end, 64) == b"half written"
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(read_end)
    temps = list(run_dir.glob(".checkpoint.safetensors.*.tmp"))
    assert len(temps) == 1 and 0 < temps[0].stat().st_size < (run_dir / CHECKPOINT).stat().st_size
    assert same_checkpoint(load_checkpoint(run_dir), before)
    assert remove_stale_temps(run_dir) == temps and not temps[0].exists()
