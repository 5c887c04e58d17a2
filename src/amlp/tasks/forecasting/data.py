"""ETT (Electricity Transformer Temperature) data: reading, the Informer split, scaling, windows.

Files: ``<data_dir>/ett/ETTh1.csv`` (or ``.csv.gz``), ``ETTh2``, ``ETTm1``, ``ETTm2``, with header
``date,HUFL,HULL,MUFL,MULL,LUFL,LULL,OT`` (Zhou et al. 2021, Informer). ``data_dir`` is, in order:
the argument, the environment variable ``AMLP_DATA_DIR``, ``../shared/data`` beside the repository
root if it exists, else ``./data``. ``amlp data download ett`` fetches the files.

The split is Informer's, with 30-day months: the first 12 months train, the next 4 validate, the
next 4 test (hourly rows ``[0, 8640)``, ``[8640, 11520)``, ``[11520, 14400)``; four times as many
rows for the 15-minute ETTm files). The validation and test slices start ``seq_len`` rows early so
their first window's input may reach back into the previous split; targets never do. A standard
scaler (mean and population standard deviation per column) is fitted on the training rows only
and applied to everything; MSE and MAE are reported on this standardised scale.

Each window ``s`` gives (Informer's layout)::

    x      = data[s : s + seq_len]                                   encoder input
    y      = data[s + seq_len - label_len : s + seq_len + pred_len]  decoder span (known + future)
    x_mark, y_mark                                                   time features of those rows

Settings: ``M`` (all 7 columns in, all 7 out), ``S`` (the target column in and out), ``MS`` (all 7
in, the target out).

Time features (Informer's ``timeF`` encoding): each calendar field scaled to [-0.5, 0.5], in the
order [minute of hour (15-minute data only)], hour of day, day of week, day of month, day of year:
``minute / 59 - 0.5``, ``hour / 23 - 0.5``, ``weekday / 6 - 0.5``, ``(day - 1) / 30 - 0.5``,
``(day_of_year - 1) / 365 - 0.5``.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

ETT_DATASETS = {"ETTh1": "h", "ETTh2": "h", "ETTm1": "15min", "ETTm2": "15min"}
ETT_COLUMNS = ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")
#: rows per 30-day month at each sampling frequency
ROWS_PER_MONTH = {"h": 30 * 24, "15min": 30 * 24 * 4}
ETT_BASE_URL = "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small"
SPLITS = ("train", "val", "test")


# -- locating and reading ---------------------------------------------------------------------------
def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: the argument, else ``$AMLP_DATA_DIR``, else ``../shared/data`` beside
    the repository root when it exists, else ``./data``."""
    if data_dir:
        return Path(data_dir)
    env = os.environ.get("AMLP_DATA_DIR")
    if env:
        return Path(env)
    beside_repo = Path(__file__).resolve().parents[4].parent / "shared" / "data"
    if beside_repo.is_dir():
        return beside_repo
    return Path("data")


def find_ett_file(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    if name not in ETT_DATASETS:
        raise ValueError(f"unknown ETT dataset {name!r}; expected one of {', '.join(ETT_DATASETS)}")
    folder = resolve_data_dir(data_dir) / "ett"
    for suffix in (".csv", ".csv.gz"):
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"ETT file not found: looked for {name}.csv and {name}.csv.gz in {str(folder)!r}. Set AMLP_DATA_DIR or "
        f"--data-dir to the folder that holds ett/, or fetch the files with `amlp data download ett`.")


def read_ett_csv(path: str | os.PathLike) -> tuple["np.ndarray", np.ndarray]:
    """(dates as ``datetime64[ns]``, values ``float64 [rows, 7]`` in :data:`ETT_COLUMNS` order).

    Raises ``ValueError`` naming the file and the problem: missing columns, unparsable dates,
    non-numeric or missing values.
    """
    import pandas as pd

    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot be read as CSV ({err})") from None
    missing = [c for c in ("date", *ETT_COLUMNS) if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected header "
                         f"date,{','.join(ETT_COLUMNS)}")
    try:
        dates = pd.to_datetime(frame["date"], format="%Y-%m-%d %H:%M:%S")
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: column 'date' must hold timestamps like 2016-07-01 00:00:00 ({err})") from None
    values = np.empty((len(frame), len(ETT_COLUMNS)), dtype=np.float64)
    for j, col in enumerate(ETT_COLUMNS):
        numeric = pd.to_numeric(frame[col], errors="coerce")
        bad = numeric.isna().to_numpy()
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"{path}: column {col!r} has a non-numeric or missing value {frame[col].iloc[row]!r} "
                             f"at data row {row} (line {row + 2} of the file)")
        values[:, j] = numeric.to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: values must be finite")
    return dates.to_numpy(), values


def time_features(dates, freq: str) -> np.ndarray:
    """Informer ``timeF`` features of ``dates`` (see the module docstring), ``float32 [rows, F]``."""
    import pandas as pd

    idx = pd.DatetimeIndex(dates)
    cols = []
    if freq == "15min":
        cols.append(idx.minute / 59.0 - 0.5)
    cols += [idx.hour / 23.0 - 0.5, idx.day_of_week / 6.0 - 0.5, (idx.day - 1) / 30.0 - 0.5,
             (idx.day_of_year - 1) / 365.0 - 0.5]
    return np.stack([np.asarray(c, dtype=np.float64) for c in cols], axis=1).astype(np.float32)


def split_borders(name: str, n_rows: int, seq_len: int) -> dict[str, tuple[int, int]]:
    """Row range ``[start, end)`` of each split's slice (val/test start ``seq_len`` early)."""
    month = ROWS_PER_MONTH[ETT_DATASETS[name]]
    ends = {"train": 12 * month, "val": 16 * month, "test": 20 * month}
    if n_rows < ends["test"]:
        raise ValueError(f"{name} has {n_rows} rows; the Informer split (12/4/4 months) needs at least "
                         f"{ends['test']}")
    starts = {"train": 0, "val": ends["train"] - seq_len, "test": ends["val"] - seq_len}
    return {s: (starts[s], ends[s]) for s in SPLITS}


@dataclass
class Scaler:
    """Per-column standardisation ``(x - mean) / std`` (population std, as scikit-learn's)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray) -> "Scaler":
        std = values.std(axis=0)
        if (std == 0).any():
            raise ValueError(f"cannot standardise: column(s) {np.flatnonzero(std == 0).tolist()} are constant "
                             "on the training rows")
        return cls(values.mean(axis=0), std)

    def transform(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.std

    def inverse(self, values: np.ndarray) -> np.ndarray:
        return values * self.std + self.mean


# -- windows ------------------------------------------------------------------------------------------
class ForecastWindows(Dataset):
    """Sliding windows over one split; items are dicts of float32 tensors ``x, x_mark, y, y_mark``."""

    def __init__(self, data: np.ndarray, marks: np.ndarray, seq_len: int, label_len: int, pred_len: int,
                 stride: int = 1):
        self.data = torch.as_tensor(data, dtype=torch.float32)
        self.marks = torch.as_tensor(marks, dtype=torch.float32)
        self.seq_len, self.label_len, self.pred_len = seq_len, label_len, pred_len
        n = len(data) - seq_len - pred_len + 1
        self.starts = list(range(0, max(n, 0), stride))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.starts[i]
        e = s + self.seq_len
        y0, y1 = e - self.label_len, e + self.pred_len
        return {"x": self.data[s:e], "x_mark": self.marks[s:e], "y": self.data[y0:y1], "y_mark": self.marks[y0:y1]}


@dataclass
class ETTData:
    """One ETT file split, scaled and windowed for a setting (``M``, ``S`` or ``MS``)."""

    name: str
    features: str
    columns: tuple[str, ...]
    target_index: int
    scaler: Scaler
    borders: dict[str, tuple[int, int]]
    splits: dict[str, ForecastWindows]
    n_time_features: int

    @property
    def enc_in(self) -> int:
        return len(self.columns)

    @property
    def c_out(self) -> int:
        return len(self.columns) if self.features == "M" else 1


def load_ett(name: str, *, features: str = "M", target: str = "OT", seq_len: int, label_len: int, pred_len: int,
             data_dir: str | os.PathLike | None = None, path: str | os.PathLike | None = None,
             val_stride: int = 1) -> ETTData:
    """Read, split, scale and window one ETT dataset (see the module docstring)."""
    if features not in ("M", "S", "MS"):
        raise ValueError(f"features must be M, S or MS, got {features!r}")
    if target not in ETT_COLUMNS:
        raise ValueError(f"target must be one of {ETT_COLUMNS}, got {target!r}")
    if not 0 < label_len <= seq_len:
        raise ValueError(f"label_len must be in [1, seq_len={seq_len}], got {label_len}")
    path = Path(path) if path is not None else find_ett_file(name, data_dir)
    dates, values = read_ett_csv(path)
    borders = split_borders(name, len(values), seq_len)
    if features == "S":
        columns = (target,)
        values = values[:, [ETT_COLUMNS.index(target)]]
    else:
        columns = ETT_COLUMNS
    target_index = columns.index(target)
    t0, t1 = borders["train"]
    scaler = Scaler.fit(values[t0:t1])
    scaled = scaler.transform(values)
    marks = time_features(dates, ETT_DATASETS[name])
    splits = {}
    for split, (a, b) in borders.items():
        windows = ForecastWindows(scaled[a:b], marks[a:b], seq_len, label_len, pred_len,
                                  stride=val_stride if split == "val" else 1)
        if len(windows) == 0:
            raise ValueError(f"{name}: the {split} split has {b - a} rows, too few for one window of "
                             f"seq_len={seq_len} + pred_len={pred_len}")
        splits[split] = windows
    return ETTData(name, features, columns, target_index, scaler, borders, splits, marks.shape[1])


# -- download -----------------------------------------------------------------------------------------
def download_ett(data_dir: str | os.PathLike | None = None, names: tuple[str, ...] = tuple(ETT_DATASETS),
                 base_url: str = ETT_BASE_URL, timeout: float = 30.0, overwrite: bool = False) -> list[Path]:
    """Fetch the ETT CSV files from the upstream repository into ``<data_dir>/ett/``.

    Raises ``ConnectionError`` with the URL and the reason when a file cannot be fetched.
    """
    folder = resolve_data_dir(data_dir) / "ett"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        if name not in ETT_DATASETS:
            raise ValueError(f"unknown ETT dataset {name!r}; expected one of {', '.join(ETT_DATASETS)}")
        dest = folder / f"{name}.csv"
        if not overwrite and (dest.is_file() or (folder / f"{name}.csv.gz").is_file()):
            written.append(dest if dest.is_file() else folder / f"{name}.csv.gz")
            continue
        url = f"{base_url.rstrip('/')}/{name}.csv"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                payload = response.read()
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise ConnectionError(f"could not download {url}: {reason}. Check the network connection, or copy "
                                  f"{name}.csv by hand into {str(folder)!r}.") from None
        if not payload.startswith(b"date,"):
            raise ConnectionError(f"{url} did not return an ETT CSV file (it starts with {payload[:40]!r})")
        tmp = dest.with_suffix(".csv.part")
        tmp.write_bytes(payload)
        os.replace(tmp, dest)
        written.append(dest)
    return written
