"""Training data: the example's sine waves, or the user's series from CSV/NPY, split and standardized."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange


MAX_FUTURE = 100_000  # forecast steps: 100x the example's 1000; each step is a sequential pass through every cell


class DataError(ValueError):
    """A data file or option the training cannot use; the message is one line for the user."""


@dataclass
class Dataset:
    """Series as time-major tensors `(T, N, 1)` in standardized units, and how to undo the scaling."""

    train_input: torch.Tensor  # (T, N, 1)
    train_target: torch.Tensor  # (T, N, 1): the input shifted by one step
    test_input: torch.Tensor  # (T0, M, 1)
    test_target: torch.Tensor  # (T0, M, 1)
    truth: np.ndarray | None  # (F, M) held-out future in original units, for a single series
    mean: float
    std: float
    description: str

    def to_original(self, values: torch.Tensor | np.ndarray) -> np.ndarray:
        """Standardized `(T, M, 1)` or `(T, M)` -> original units `(T, M)`."""
        array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        return array.reshape(array.shape[0], -1) * self.std + self.mean


def sine_waves(length: int = 1000, count: int = 100, period: float = 20.0, seed: int = 2) -> np.ndarray:
    """The example's data (`generate_sine_wave.py`): `count` sine waves of `length` points at random phases."""
    rng_state = np.random.get_state()
    np.random.seed(seed)
    x = np.empty((count, length), "int64")
    x[:] = np.array(range(length)) + np.random.randint(-4 * period, 4 * period, count).reshape(count, 1)
    np.random.set_state(rng_state)
    return np.sin(x / 1.0 / period).astype("float64")


def _parse_csv(path: Path) -> np.ndarray:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"--data {path}: cannot read the file ({error.__class__.__name__}: {error})") from None
    rows: list[list[float]] = []
    width = None
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cells = [cell.strip() for cell in line.split(",")]
        if not rows and width is None and not any(_is_number(cell) for cell in cells):
            width = len(cells)  # a header line: names, no numbers
            continue
        for column, cell in enumerate(cells, start=1):
            if not _is_number(cell):
                raise DataError(f"--data {path}: line {line_number}, column {column}: {cell!r} is not a number")
            if not np.isfinite(float(cell)):
                raise DataError(f"--data {path}: line {line_number}, column {column}: non-finite value {cell!r}; expected finite numbers")
        if width is not None and len(cells) != width:
            raise DataError(f"--data {path}: line {line_number} has {len(cells)} values, expected {width} like the lines before")
        width = len(cells)
        rows.append([float(cell) for cell in cells])
    if not rows:
        raise DataError(f"--data {path}: the file holds no numbers")
    return np.array(rows, dtype=np.float64)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def load_array(path: str | Path) -> np.ndarray:
    """A 2-D float64 array from `.csv` or `.npy` (never unpickles); one clear DataError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data {path}: no such file")
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as error:  # numpy raises several types for a corrupt file
            raise DataError(f"--data {path}: not a readable .npy file ({error})") from None
        if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
            raise DataError(f"--data {path}: expected real numbers, got dtype {array.dtype}")
        array = array.astype(np.float64)
    elif path.suffix.lower() in (".csv", ".txt"):
        array = _parse_csv(path)
    else:
        raise DataError(f"--data {path}: expected a .csv or .npy file, got {path.suffix or 'no extension'}")
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise DataError(f"--data {path}: expected a 1-D series or a 2-D array (one series per row), got {array.ndim}-D shape {array.shape}")
    if array.size == 0:
        raise DataError(f"--data {path}: the array is empty (shape {array.shape})")
    bad = np.argwhere(~np.isfinite(array))
    if len(bad):
        row, column = bad[0]
        raise DataError(f"--data {path}: non-finite value {array[row, column]} at row {row + 1}, column {column + 1}")
    return array


def check_future(future: int) -> None:
    """`--future` must fit in memory and time: 0 <= future <= MAX_FUTURE."""
    if not isinstance(future, int) or isinstance(future, bool) or not 0 <= future <= MAX_FUTURE:
        raise DataError(f"--future: expected an int in [0, {MAX_FUTURE}], got {future}")


def check_device(device: str) -> None:
    """A device torch knows and this machine has; a DataError naming --device otherwise."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DataError(f"--device {device}: expected cpu, cuda, cuda:N or auto") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise DataError(f"--device {device}: expected an index below {torch.cuda.device_count()} (the CUDA devices here), got {parsed.index}")
    elif parsed.type not in ("cpu", "mps"):
        raise DataError(f"--device {device}: expected cpu, cuda, cuda:N or auto")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise DataError(f"--device {device}: MPS is not available on this machine; use --device cpu or auto")


def _tensor(series: np.ndarray, dtype: torch.dtype, device: str) -> torch.Tensor:
    """`(N, T)` series -> time-major `(T, N, 1)`."""
    return rearrange(torch.from_numpy(np.ascontiguousarray(series)), "n t -> t n 1").to(dtype=dtype, device=device)


def make_dataset(
    data: str | None, *, test_series: int = 3, window: int = 100, future: int = 1000, dtype: torch.dtype = torch.float64, device: str = "cpu",
    stats: tuple[float, float] | None = None,
) -> Dataset:
    """Build the train/test split.

    - No file: the example's sine waves, unscaled; train on series 3.. (`data[3:, :-1] -> data[3:, 1:]`),
      test on the first 3.
    - A 2-D file (one series per row): the same split, the first `test_series` rows for test.
    - A single series (one row or one column): its last `future` points are held out as truth; what
      precedes is cut into training windows of `window` points and is the test input.
    Values are standardized with the training part's mean and std (or the given `stats`).
    """
    check_future(future)
    check_device(device)
    if data is None:
        array, description = sine_waves(), "sine waves (pytorch/examples time_sequence_prediction)"
    else:
        array, description = load_array(data), str(data)
    if array.shape[0] == 1 or array.shape[1] == 1:
        return _single_series(array.reshape(-1), data, window=window, future=future, dtype=dtype, device=device, stats=stats, description=description)
    if array.shape[1] < 3:
        raise DataError(f"--data {data}: each series needs at least 3 points, got {array.shape[1]}")
    if not 1 <= test_series < array.shape[0]:
        raise DataError(f"--test-series: expected 1 <= N < {array.shape[0]} (the number of series), got {test_series}")
    train, test = array[test_series:], array[:test_series]
    mean, std = stats if stats else ((0.0, 1.0) if data is None else (float(train.mean()), float(train.std()) or 1.0))
    train, test = (train - mean) / std, (test - mean) / std
    return Dataset(
        _tensor(train[:, :-1], dtype, device), _tensor(train[:, 1:], dtype, device),
        _tensor(test[:, :-1], dtype, device), _tensor(test[:, 1:], dtype, device),
        None, mean, std, description,
    )


def _single_series(
    series: np.ndarray, data: str | None, *, window: int, future: int, dtype: torch.dtype, device: str, stats: tuple[float, float] | None, description: str
) -> Dataset:
    if len(series) < 3:
        raise DataError(f"--data {data}: a series needs at least 3 points, got {len(series)}")
    if len(series) - future < 3:
        raise DataError(f"--future {future}: holding out {future} points leaves {len(series) - future} of the series' {len(series)} for training; need at least 3")
    if window < 3:
        raise DataError(f"--window: expected at least 3 points, got {window}")
    known, truth = series[: len(series) - future], series[len(series) - future :]
    mean, std = stats if stats else (float(known.mean()), float(known.std()) or 1.0)
    scaled = (known - mean) / std
    width = min(window, len(scaled))
    count = len(scaled) // width
    windows = scaled[len(scaled) - count * width :].reshape(count, width)  # aligned to the end of the known part
    return Dataset(
        _tensor(windows[:, :-1], dtype, device), _tensor(windows[:, 1:], dtype, device),
        _tensor(scaled[None, :-1], dtype, device), _tensor(scaled[None, 1:], dtype, device),
        truth[:, None] if future else None, mean, std, f"{description} (single series of {len(series)} points, last {future} held out)",
    )
