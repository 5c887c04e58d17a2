"""Long-sequence time-series forecasting (ETT presets or any CSV) with an Informer-style encoder-decoder.

Loss: mean squared error on the standardised scale over the ``pred_len`` forecast steps (and, in
setting M, all columns; in S and MS the target column). Evaluation reports ``mse`` and ``mae``
averaged over every forecast value of the split, as Informer does.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ...models.informer import InformerForecaster, generative_decoder_input
from .config import ForecastingDataConfig, InformerModelConfig
from .data import ETT_DATASETS, load_ett, load_series, resolve_data_dir


def load_data(d: ForecastingDataConfig):
    """The series a ``data:`` section names: an ETT preset, or the CSV file at ``d.path``."""
    windows = dict(features=d.features, target=d.target, seq_len=d.seq_len, label_len=d.label_len,
                   pred_len=d.pred_len, val_stride=d.val_stride)
    if d.path is None:
        return load_ett(d.dataset, data_dir=d.data_dir, **windows)
    path = Path(d.path)
    if not path.is_absolute():
        in_data_dir = resolve_data_dir(d.data_dir) / path
        if in_data_dir.is_file():
            path = in_data_dir
        elif not path.is_file():
            raise FileNotFoundError(f"data.path {d.path!r} was found neither in the data directory "
                                    f"({str(resolve_data_dir(d.data_dir))!r}) nor in the working directory")
    elif not path.is_file():
        raise FileNotFoundError(f"data.path {d.path!r} does not exist")
    split = d.split if d.split != "auto" else ("ett" if d.dataset in ETT_DATASETS else "ratio")
    return load_series(path, name=d.dataset, date_column=d.date_column, date_format=d.date_format,
                       columns=d.columns, freq=d.freq, split=split, split_ratios=d.split_ratios, **windows)


class ForecastingTask:
    data_config = ForecastingDataConfig
    model_config = InformerModelConfig

    def __init__(self, config):
        self.config = config
        d: ForecastingDataConfig = config.data
        self.data = load_data(d)

    def build_model(self) -> InformerForecaster:
        m: InformerModelConfig = self.config.model
        return InformerForecaster(
            self.data.enc_in, self.data.enc_in, self.data.c_out, self.data.n_time_features, self.config.data.pred_len,
            d_model=m.d_model, heads=m.heads, e_layers=m.e_layers, d_layers=m.d_layers, d_ff=m.d_ff,
            dropout=m.dropout, activation=m.activation, distil=m.distil, self_mixer=m.self_mixer,
            cross_mixer=m.cross_mixer, decoder_causal=m.decoder_causal, mixer_options=m.mixer_options,
            embedding_bias=m.embedding_bias, cross_options=m.cross_options)

    def dataset(self, split: str):
        return self.data.splits.get(split)

    def forecast(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target), both ``[B, pred_len, c_out]`` in float32."""
        d = self.config.data
        x_dec = generative_decoder_input(batch["y"], d.label_len, d.pred_len)
        pred = model(batch["x"], batch["x_mark"], x_dec, batch["y_mark"]).float()
        target = batch["y"][:, -d.pred_len:]
        if d.features != "M":
            t = self.data.target_index
            target = target[..., t:t + 1]
        return pred, target.float()

    def loss(self, model, batch) -> torch.Tensor:
        pred, target = self.forecast(model, batch)
        return F.mse_loss(pred, target)

    def evaluate(self, model, batches) -> dict[str, float]:
        sq = ab = 0.0
        count = 0
        for batch in batches:
            pred, target = self.forecast(model, batch)
            err = (pred - target).double()
            sq += float((err ** 2).sum())
            ab += float(err.abs().sum())
            count += err.numel()
        return {"loss": sq / count, "mse": sq / count, "mae": ab / count}
