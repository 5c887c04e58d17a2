"""Long-sequence time-series forecasting on ETT (the AMLP paper's cross-attention study)."""

from .config import ForecastingDataConfig, InformerModelConfig
from .data import ETT_COLUMNS, ETT_DATASETS, ETTData, ForecastWindows, download_ett, load_ett, read_ett_csv

__all__ = ["ETTData", "ETT_COLUMNS", "ETT_DATASETS", "ForecastWindows", "ForecastingDataConfig",
           "InformerModelConfig", "download_ett", "load_ett", "read_ett_csv"]
