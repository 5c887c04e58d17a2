"""Time-series data for forecasting: any CSV with a date column and numeric columns, with ETT
(Electricity Transformer Temperature) as presets; reading, the Informer splits, scaling, windows.

**Any CSV** (:func:`load_series`): a date column (its name and, optionally, its ``strftime``
format: ``1/1/2010 0:00`` is ``%m/%d/%Y %H:%M``; without a format pandas infers it), the numeric
columns to use (all but the date by default), a target column, and the sampling frequency of the
time features (inferred from the median spacing of the dates when not given). Informer's split for
files other than ETT is by ratio: the first ``int(0.7 N)`` rows train, the last ``int(0.2 N)``
test, the rows between validate (``split_ratios``). Everything below (scaler, windows, settings)
is the same for every file.

**ETT presets** (:func:`load_ett`):

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


ETT_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def read_series_csv(path: str | os.PathLike, *, date_column: str = "date", date_format: str | None = None,
                    columns: list[str] | tuple[str, ...] | None = None,
                    expected_header: str | None = None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(dates as ``datetime64[ns]``, values ``float64 [rows, C]``, column names) of a CSV file
    (``.csv`` or ``.csv.gz``) with a date column and numeric columns.

    ``columns`` picks and orders the value columns (default: every column but the date). Raises
    ``ValueError`` naming the file and the problem: unreadable file, missing columns, dates that do
    not parse or do not increase, non-numeric, missing or infinite values.
    """
    import pandas as pd

    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot be read as CSV ({err})") from None
    wanted = list(columns) if columns is not None else [c for c in frame.columns if c != date_column]
    missing = [c for c in (date_column, *wanted) if c not in frame.columns]
    if missing:
        hint = f"expected header {expected_header}" if expected_header else \
            f"the file has {', '.join(map(str, frame.columns))}"
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; {hint}")
    if not wanted:
        raise ValueError(f"{path}: no value columns besides the date column {date_column!r}")
    if len(frame) == 0:
        raise ValueError(f"{path}: no data rows")
    try:
        if date_format is None:
            dates = pd.to_datetime(frame[date_column])
        else:
            dates = pd.to_datetime(frame[date_column], format=date_format)
    except (ValueError, TypeError) as err:
        example = "2016-07-01 00:00:00" if date_format == ETT_DATE_FORMAT else \
            f"the format {date_format!r}" if date_format else "a date pandas can parse (or set data.date_format)"
        raise ValueError(f"{path}: column {date_column!r} must hold timestamps like {example} ({err})") from None
    if dates.isna().any():
        row = int(np.argmax(dates.isna().to_numpy()))
        raise ValueError(f"{path}: column {date_column!r} has a missing date at data row {row} (line {row + 2})")
    steps = np.diff(dates.to_numpy().astype("datetime64[ns]").astype(np.int64))
    if (steps <= 0).any():
        row = int(np.argmax(steps <= 0)) + 1
        raise ValueError(f"{path}: dates must increase from row to row; data row {row} (line {row + 2}) has "
                         f"{frame[date_column].iloc[row]!r} after {frame[date_column].iloc[row - 1]!r}")
    values = np.empty((len(frame), len(wanted)), dtype=np.float64)
    for j, col in enumerate(wanted):
        numeric = pd.to_numeric(frame[col], errors="coerce")
        bad = numeric.isna().to_numpy()
        if bad.any():
            row = int(np.argmax(bad))
            raw = frame[col].iloc[row]
            shown = "(empty or NA)" if pd.isna(raw) else repr(raw)
            raise ValueError(f"{path}: column {col!r} has a non-numeric or missing value {shown} "
                             f"at data row {row} (line {row + 2} of the file)"
                             + ("; list the numeric columns in data.columns" if columns is None else ""))
        values[:, j] = numeric.to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: values must be finite")
    return dates.to_numpy(), values, tuple(str(c) for c in wanted)


def read_ett_csv(path: str | os.PathLike) -> tuple["np.ndarray", np.ndarray]:
    """(dates as ``datetime64[ns]``, values ``float64 [rows, 7]`` in :data:`ETT_COLUMNS` order)."""
    dates, values, _ = read_series_csv(path, date_format=ETT_DATE_FORMAT, columns=ETT_COLUMNS,
                                       expected_header=f"date,{','.join(ETT_COLUMNS)}")
    return dates, values


#: frequencies of the time features: the finest calendar field each one starts from
FREQUENCIES = ("s", "min", "h", "d")


def normalise_freq(freq: str) -> str:
    """``15min``, ``10min``, ``t`` -> ``min``; ``H`` -> ``h``; ``b``, ``w``, ``m`` -> ``d``; raises on others."""
    f = str(freq).strip().lower().lstrip("0123456789")
    aliases = {"s": "s", "sec": "s", "min": "min", "t": "min", "h": "h", "d": "d", "b": "d", "w": "d", "m": "d"}
    if f not in aliases:
        raise ValueError(f"unknown time-feature frequency {freq!r}; use s, min (or 15min), h or d")
    return aliases[f]


def infer_freq(dates) -> str:
    """The time-feature frequency from the median spacing of ``dates``: s, min, h or d."""
    import pandas as pd

    idx = pd.DatetimeIndex(dates)
    if len(idx) < 2:
        raise ValueError("cannot infer the sampling frequency from fewer than two dates; set data.freq")
    step = float(np.median(np.diff(idx.values.astype("datetime64[ns]").astype(np.int64)))) / 1e9  # seconds
    return "s" if step < 60 else "min" if step < 3600 else "h" if step < 86400 else "d"


def time_features(dates, freq: str) -> np.ndarray:
    """Informer ``timeF`` features of ``dates`` (see the module docstring), ``float32 [rows, F]``:
    from the finest field of ``freq`` (second, minute, hour or day) up to the day of the year."""
    import pandas as pd

    f = normalise_freq(freq)
    idx = pd.DatetimeIndex(dates)
    cols = []
    if f == "s":
        cols.append(idx.second / 59.0 - 0.5)
    if f in ("s", "min"):
        cols.append(idx.minute / 59.0 - 0.5)
    if f in ("s", "min", "h"):
        cols.append(idx.hour / 23.0 - 0.5)
    cols += [idx.day_of_week / 6.0 - 0.5, (idx.day - 1) / 30.0 - 0.5, (idx.day_of_year - 1) / 365.0 - 0.5]
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


def ratio_borders(n_rows: int, seq_len: int, ratios=(0.7, 0.1, 0.2)) -> dict[str, tuple[int, int]]:
    """Informer's split of files other than ETT: the first ``int(ratios[0] N)`` rows train, the last
    ``int(ratios[2] N)`` test, the rest validate; val/test slices start ``seq_len`` rows early."""
    n_train, n_test = int(n_rows * ratios[0]), int(n_rows * ratios[2])
    n_val = n_rows - n_train - n_test
    if min(n_train, n_val, n_test) < 1:
        raise ValueError(f"{n_rows} rows are too few for the split {list(ratios)} (train {n_train}, val {n_val}, "
                         f"test {n_test} rows)")
    if n_train < seq_len:
        raise ValueError(f"the training split has {n_train} rows, fewer than seq_len={seq_len}")
    return {"train": (0, n_train), "val": (n_train - seq_len, n_train + n_val),
            "test": (n_rows - n_test - seq_len, n_rows)}


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
class SeriesData:
    """One file split, scaled and windowed for a setting (``M``, ``S`` or ``MS``)."""

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


#: the former name, kept for code that imports it
ETTData = SeriesData


def load_ett(name: str, *, features: str = "M", target: str = "OT", seq_len: int, label_len: int, pred_len: int,
             data_dir: str | os.PathLike | None = None, path: str | os.PathLike | None = None,
             val_stride: int = 1) -> SeriesData:
    """Read, split, scale and window one ETT dataset (see the module docstring)."""
    if name not in ETT_DATASETS:
        raise ValueError(f"unknown ETT dataset {name!r}; expected one of {', '.join(ETT_DATASETS)}")
    if target not in ETT_COLUMNS:
        raise ValueError(f"target must be one of {ETT_COLUMNS}, got {target!r}")
    _check_windows(features, seq_len, label_len)
    path = Path(path) if path is not None else find_ett_file(name, data_dir)
    dates, values = read_ett_csv(path)
    borders = split_borders(name, len(values), seq_len)
    return _build(name, dates, values, ETT_COLUMNS, borders, ETT_DATASETS[name], features=features, target=target,
                  seq_len=seq_len, label_len=label_len, pred_len=pred_len, val_stride=val_stride)


def load_series(path: str | os.PathLike, *, name: str | None = None, features: str = "M", target: str,
                seq_len: int, label_len: int, pred_len: int, date_column: str = "date",
                date_format: str | None = None, columns: list[str] | None = None, freq: str | None = None,
                split: str = "ratio", split_ratios=(0.7, 0.1, 0.2), val_stride: int = 1) -> SeriesData:
    """Read, split, scale and window any CSV time series (see the module docstring).

    ``split="ratio"`` is Informer's split of non-ETT files; ``split="ett"`` is ETT's 12/4/4 months
    of 30 days, counted in rows from the median spacing of the dates.
    """
    _check_windows(features, seq_len, label_len)
    if split not in ("ratio", "ett"):
        raise ValueError(f"split must be 'ratio' or 'ett', got {split!r}")
    path = Path(path)
    dates, values, cols = read_series_csv(path, date_column=date_column, date_format=date_format, columns=columns)
    if target not in cols:
        raise ValueError(f"{path}: the target column {target!r} is not among the value columns ({', '.join(cols)})")
    f = normalise_freq(freq) if freq else infer_freq(dates)
    if split == "ratio":
        borders = ratio_borders(len(values), seq_len, tuple(split_ratios))
    else:
        step = float(np.median(np.diff(dates.astype("datetime64[ns]").astype(np.int64)))) / 1e9
        month = int(round(30 * 86400 / step))
        ends = {"train": 12 * month, "val": 16 * month, "test": 20 * month}
        if len(values) < ends["test"]:
            raise ValueError(f"{path} has {len(values)} rows; the 12/4/4-month split needs at least {ends['test']}")
        borders = {"train": (0, ends["train"]), "val": (ends["train"] - seq_len, ends["val"]),
                   "test": (ends["val"] - seq_len, ends["test"])}
    return _build(name or path.name.split(".")[0], dates, values, cols, borders, f, features=features, target=target,
                  seq_len=seq_len, label_len=label_len, pred_len=pred_len, val_stride=val_stride)


def _check_windows(features: str, seq_len: int, label_len: int) -> None:
    if features not in ("M", "S", "MS"):
        raise ValueError(f"features must be M, S or MS, got {features!r}")
    if not 0 < label_len <= seq_len:
        raise ValueError(f"label_len must be in [1, seq_len={seq_len}], got {label_len}")


def _build(name, dates, values, columns, borders, freq, *, features, target, seq_len, label_len, pred_len,
           val_stride) -> SeriesData:
    columns = tuple(columns)
    if features == "S":
        values = values[:, [columns.index(target)]]
        columns = (target,)
    target_index = columns.index(target)
    t0, t1 = borders["train"]
    scaler = Scaler.fit(values[t0:t1])
    scaled = scaler.transform(values)
    marks = time_features(dates, freq)
    splits = {}
    for split, (a, b) in borders.items():
        windows = ForecastWindows(scaled[a:b], marks[a:b], seq_len, label_len, pred_len,
                                  stride=val_stride if split == "val" else 1)
        if len(windows) == 0:
            raise ValueError(f"{name}: the {split} split has {b - a} rows, too few for one window of "
                             f"seq_len={seq_len} + pred_len={pred_len}")
        splits[split] = windows
    return SeriesData(name, features, columns, target_index, scaler, borders, splits, marks.shape[1])


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
