"""ETT data (split, scaler, windows, time features, errors), the Informer-style forecaster with any
registered cross-mixer, the CLI end to end and the study's resumable grid."""

import csv
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import amlp
from amlp.models.informer import InformerForecaster, generative_decoder_input
from amlp.tasks.forecasting.data import (ETT_COLUMNS, download_ett, find_ett_file, load_ett, read_ett_csv,
                                         split_borders, time_features)
from conftest import shared_data_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # small models are much faster on one thread than on oversubscribed cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
DATA = Path(shared_data_dir())
needs_data = pytest.mark.skipif(not (DATA / "ett" / "ETTh1.csv").is_file() and not (DATA / "ett" / "ETTh1.csv.gz").is_file(),
                                reason="ETT data not found (set AMLP_DATA_DIR)")


def raw_rows(path):
    """The file read with the csv module only (independent of the pandas loader)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="") as fh:
        rows = list(csv.reader(fh))
    header = rows[0]
    cols = [header.index(c) for c in ETT_COLUMNS]
    return [r[0] for r in rows[1:]], np.array([[float(r[c]) for c in cols] for r in rows[1:]])


@pytest.fixture(scope="module")
def etth1_raw():
    return raw_rows(find_ett_file("ETTh1", DATA))


@needs_data
@pytest.mark.parametrize("name, month", [("ETTh1", 720), ("ETTm1", 2880)])
def test_informer_split_boundaries(name, month):
    seq, label, pred = 48, 24, 24
    data = load_ett(name, features="S", seq_len=seq, label_len=label, pred_len=pred, data_dir=DATA)
    assert data.borders == {"train": (0, 12 * month), "val": (12 * month - seq, 16 * month),
                            "test": (16 * month - seq, 20 * month)}
    for split, (a, b) in data.borders.items():
        assert len(data.splits[split]) == (b - a) - seq - pred + 1


@needs_data
def test_windows_and_scaler_fitted_on_train_only(etth1_raw):
    dates, raw = etth1_raw
    seq, label, pred = 36, 12, 24
    data = load_ett("ETTh1", features="M", seq_len=seq, label_len=label, pred_len=pred, data_dir=DATA)
    train = raw[:8640]
    mean, std = train.mean(axis=0), train.std(axis=0)
    np.testing.assert_allclose(data.scaler.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(data.scaler.std, std, rtol=1e-12)
    assert not np.allclose(data.scaler.mean, raw[:14400].mean(axis=0), rtol=1e-3)
    scaled = (raw - mean) / std
    # the first validation window: input reaches back seq rows, targets start at row 8640
    item = data.splits["val"][0]
    np.testing.assert_allclose(item["x"].numpy(), scaled[8640 - seq:8640], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(item["y"].numpy(), scaled[8640 - label:8640 + pred], rtol=1e-5, atol=1e-5)
    # the last test window ends exactly at row 14400
    last = data.splits["test"][len(data.splits["test"]) - 1]
    np.testing.assert_allclose(last["y"].numpy()[-1], scaled[14399], rtol=1e-5, atol=1e-5)
    # train windows never see a validation row
    last_train = data.splits["train"][len(data.splits["train"]) - 1]
    np.testing.assert_allclose(last_train["y"].numpy()[-1], scaled[8639], rtol=1e-5, atol=1e-5)
    # S setting: only OT, scaled with OT's training statistics
    s = load_ett("ETTh1", features="S", seq_len=seq, label_len=label, pred_len=pred, data_dir=DATA)
    assert s.enc_in == 1 and s.c_out == 1
    np.testing.assert_allclose(s.splits["train"][5]["x"].numpy()[:, 0], scaled[5:5 + seq, 6], rtol=1e-5, atol=1e-5)


@needs_data
def test_time_features_of_the_first_rows(etth1_raw):
    dates, _ = etth1_raw
    assert dates[0] == "2016-07-01 00:00:00"  # a Friday, day 183 of a leap year
    import pandas as pd

    feats = time_features(pd.to_datetime(pd.Series(dates[:26])), "h")
    np.testing.assert_allclose(feats[0], [-0.5, 4 / 6 - 0.5, -0.5, 182 / 365 - 0.5], rtol=1e-6)
    np.testing.assert_allclose(feats[25], [1 / 23 - 0.5, 5 / 6 - 0.5, 1 / 30 - 0.5, 183 / 365 - 0.5], rtol=1e-6)
    assert feats.min() >= -0.5 and feats.max() <= 0.5
    m = time_features(pd.to_datetime(pd.Series(["2016-07-01 00:45:00"])), "15min")
    np.testing.assert_allclose(m[0, 0], 45 / 59 - 0.5, rtol=1e-6)


def _write(path, header, rows):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def _good_rows(n):
    import pandas as pd

    stamps = pd.date_range("2016-07-01", periods=n, freq="h").strftime("%Y-%m-%d %H:%M:%S")
    return [f"{t},1,2,3,4,5,6,{i % 7}.5" for i, t in enumerate(stamps)]


HEADER = "date," + ",".join(ETT_COLUMNS)


def test_malformed_files_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="missing column.*OT"):
        read_ett_csv(_write(tmp_path / "a.csv", HEADER.replace(",OT", ""), [r.rsplit(",", 1)[0] for r in _good_rows(5)]))
    rows = _good_rows(5)
    rows[3] = rows[3].replace(",3,", ",abc,")
    with pytest.raises(ValueError, match=r"'MUFL' has a non-numeric or missing value 'abc' at data row 3 \(line 5"):
        read_ett_csv(_write(tmp_path / "b.csv", HEADER, rows))
    rows = _good_rows(5)
    rows[1] = "yesterday" + rows[1][19:]
    with pytest.raises(ValueError, match="column 'date'"):
        read_ett_csv(_write(tmp_path / "c.csv", HEADER, rows))
    rows = _good_rows(5)
    rows[2] = rows[2].replace(",4,", ",,")
    with pytest.raises(ValueError, match="'MULL' has a non-numeric or missing value"):
        read_ett_csv(_write(tmp_path / "d.csv", HEADER, rows))
    short = _write(tmp_path / "e.csv", HEADER, _good_rows(200))
    with pytest.raises(ValueError, match="has 200 rows; the Informer split .* needs at least 14400"):
        load_ett("ETTh1", seq_len=24, label_len=12, pred_len=24, path=short)
    (tmp_path / "f.csv").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot be read"):
        read_ett_csv(tmp_path / "f.csv")


def test_too_long_windows_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="label_len"):
        load_ett("ETTh1", seq_len=24, label_len=48, pred_len=24, path=tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="AMLP_DATA_DIR.*amlp data download ett"):
        find_ett_file("ETTh1", tmp_path)
    if (DATA / "ett").is_dir():
        with pytest.raises(ValueError, match="the val split has 2980 rows, too few for one window"):
            load_ett("ETTh1", seq_len=100, label_len=10, pred_len=2900, data_dir=DATA)


def test_download_offline_is_a_clear_error(tmp_path):
    with pytest.raises(ConnectionError, match="could not download http://127.0.0.1:9/x/ETTh1.csv"):
        download_ett(tmp_path, names=("ETTh1",), base_url="http://127.0.0.1:9/x", timeout=5)
    assert not list((tmp_path / "ett").iterdir())
    from amlp.cli import app

    res = CliRunner().invoke(app, ["data", "download", "ett", "--data-dir", str(tmp_path),
                                   "--base-url", "http://127.0.0.1:9/x"])
    assert res.exit_code == 1 and "could not download" in res.output


@pytest.mark.parametrize("cross", amlp.mixer_names(cross=True))
def test_forecaster_with_every_cross_mixer(cross):
    torch.manual_seed(0)
    model = InformerForecaster(3, 3, 2, 4, pred_len=5, d_model=16, heads=2, d_ff=24, dropout=0.0,
                               cross_mixer=cross, mixer_options={"amlp-cov": {"landmarks": 4, "form": "official"},
                                                                 "amlp-pquery": {"form": "official"}})
    model.eval()
    x, xm = torch.randn(2, 11, 3), torch.rand(2, 11, 4) - 0.5
    y, ym = torch.randn(2, 9, 3), torch.rand(2, 9, 4) - 0.5
    out = model(x, xm, generative_decoder_input(y, 4, 5), ym)
    assert out.shape == (2, 5, 2) and torch.isfinite(out).all()
    # the forecast never sees the future values it predicts
    y2 = y.clone()
    y2[:, 4:] = torch.randn(2, 5, 3) * 100
    torch.testing.assert_close(model(x, xm, generative_decoder_input(y2, 4, 5), ym), out)
    # the known part does matter
    y3 = y.clone()
    y3[:, :4] += 1.0
    assert not torch.allclose(model(x, xm, generative_decoder_input(y3, 4, 5), ym), out)
    out.sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_embedding_bias_and_cross_only_options():
    plain = InformerForecaster(3, 3, 2, 4, pred_len=5, d_model=16, heads=2, d_ff=24, cross_mixer="amlp-cov",
                               mixer_options={"amlp-cov": {"form": "paper"}})
    assert plain.enc_embedding.value.bias is None and plain.dec_embedding.time.bias is None
    model = InformerForecaster(3, 3, 2, 4, pred_len=5, d_model=16, heads=2, d_ff=24, embedding_bias=True,
                               self_mixer="amlp-cov", cross_mixer="amlp-cov",
                               mixer_options={"amlp-cov": {"landmarks": 4, "form": "stable"}},
                               cross_options={"form": "official"})
    for emb in (model.enc_embedding, model.dec_embedding):
        assert emb.value.bias is not None and emb.time.bias is not None
    block = model.decoder[0]
    assert block.cross_mix.form == "official" and block.cross_mix.landmarks == 4
    assert block.self_mix.form == "stable" and model.encoder[0].mix.form == "stable"


def test_decoder_self_mixing_causality_option():
    # (the whole model is not causal along the decoder axis: Informer's value embedding is a circular
    # width-3 convolution, and AMLP cross-mixing pools statistics over all queries; so the option is
    # checked on a decoder block with softmax cross-attention)
    from amlp.models.informer import DecoderBlock

    torch.manual_seed(0)
    memory = torch.randn(1, 6, 16)
    x = torch.randn(1, 9, 16)
    x2 = x.clone()
    x2[:, -1] += 5.0
    for causal in (True, False):
        block = DecoderBlock(16, 2, 16, 0.0, "gelu", "softmax", "softmax", causal, {}, {}).eval()
        a, b = block(x, memory), block(x2, memory)
        assert torch.allclose(a[:, :-1], b[:, :-1]) == causal


TINY = ["train.max_steps=3", "train.progress=false", "model.d_model=8", "model.heads=2", "model.d_ff=8",
        "data.seq_len=24", "data.label_len=12", "data.pred_len=12", "data.val_stride=40"]


@needs_data
def test_train_and_eval_end_to_end_through_the_cli(tmp_path):
    from amlp.cli import app

    runner = CliRunner()
    args = ["train", "forecasting", "--config", str(ROOT / "configs/forecasting/cpu/etth1_S.yaml"),
            "--run-dir", str(tmp_path / "run"), "--data-dir", str(DATA), "--set", "model.cross_mixer=amlp-pquery"]
    for o in TINY:
        args += ["--set", o]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["step"] == 3 and results["config"]["model"]["cross_mixer"] == "amlp-pquery"
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    res = runner.invoke(app, ["eval", "--checkpoint", str(ckpt), "--split", "test"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)
    assert metrics["mse"] == pytest.approx(results["test"]["mse"], rel=1e-5)
    assert metrics["mae"] == pytest.approx(results["test"]["mae"], rel=1e-5)
    # a bad override is a clean error naming the key
    res = runner.invoke(app, args[:4] + ["--set", "train.lr=-1"])
    assert res.exit_code == 1 and "train.lr" in res.output
    res = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "nowhere")])
    assert res.exit_code == 1 and "does not exist" in res.output


@needs_data
def test_study_runs_the_grid_resumes_and_writes_the_report(tmp_path):
    from amlp.train.study_forecasting import load_study, run_study

    study_file = tmp_path / "study.yaml"
    study_file.write_text(
        "mechanisms: [softmax, 'amlp-cov:form=official']\nseeds: [0]\n"
        f"configs: ['{ROOT / 'configs/forecasting/cpu/etth1_S.yaml'}']\n"
        f"run_root: runs\ndoc: docs/forecasting.md\noverrides: {TINY + ['train.max_steps=2']!r}\n")
    logs = []
    extra = [f"data.data_dir={DATA}"]
    # a partial grid: the report goes next to the results, the tracked document is refused
    report = run_study(load_study(study_file), command="amlp study forecasting --config study.yaml",
                       mechanisms=["softmax"], extra_overrides=extra, root=tmp_path, log=logs.append)
    assert report == tmp_path / "runs" / "report.md" and report.is_file()
    with pytest.raises(ValueError, match=r"1 cell\(s\).*ETTh1/S/amlp-cov:form=official/seed0"):
        run_study(load_study(study_file), command="x", mechanisms=["softmax"], extra_overrides=extra, root=tmp_path,
                  log=logs.append, write_doc=True)
    assert not (tmp_path / "docs").exists()
    doc = run_study(load_study(study_file), command="amlp study forecasting --config study.yaml --write-doc",
                    extra_overrides=extra, root=tmp_path, log=logs.append, write_doc=True)
    assert doc == tmp_path / "docs" / "forecasting.md"
    results = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert sorted(results) == ["ETTh1/S/amlp-cov:form=official/seed0", "ETTh1/S/softmax/seed0", "reference/ETTh1/S"]
    official = results["ETTh1/S/amlp-cov:form=official/seed0"]
    assert official["model"]["cross_options"] == {"form": "official"} and official["model"]["cross_mixer"] == "amlp-cov"
    cfg = json.loads((tmp_path / official["run_dir"] / "config.json").read_text())
    assert cfg["model"]["cross_options"] == {"form": "official"}
    text = doc.read_text()
    assert "amlp study forecasting --config study.yaml --write-doc" in text
    ours = official["test"]
    assert (f"| Univariate | amlp-cov:form=official | {ours['mse']:.3f} ± 0.000 | {ours['mae']:.3f} ± 0.000 | 1 |"
            in text)
    ref = results["reference/ETTh1/S"]["test"]
    assert f"| Univariate | *repeat the last value* | {ref['repeat-last']['mse']:.3f} |" in text
    assert "| Multivariate | AMLP | 1.247 | 0.894 | 2.748 | 1.312 | 1.015 | 0.792 |" in text  # quoted
    logs.clear()
    run_study(load_study(study_file), command="again", extra_overrides=extra, root=tmp_path, log=logs.append)
    assert sum("done before, skipped" in line for line in logs) == 2


@needs_data
def test_trivial_forecasts_window_by_window():
    from amlp.tasks.forecasting.task import ForecastingTask
    from amlp.train import load_config
    from amlp.train.study_forecasting import trivial_forecasts

    for features in ("S", "M"):
        cfg = load_config(ROOT / "configs/forecasting/cpu/etth1_M.yaml",
                          TINY + [f"data.data_dir={DATA}", f"data.features={features}"])
        got = trivial_forecasts(cfg)
        windows = ForecastingTask(cfg).dataset("test")
        col = slice(None) if features == "M" else slice(6, 7) if windows[0]["x"].shape[-1] == 7 else slice(0, 1)
        sq_last = ab_mean = n = 0.0
        for i in range(len(windows)):
            item = windows[i]
            future = item["y"][-12:, col].double()
            sq_last += float((future - item["x"][-1, col].double()).square().sum())
            ab_mean += float(future.abs().sum())
            n += future.numel()
        assert got["repeat-last"]["mse"] == pytest.approx(sq_last / n, rel=1e-9)
        assert got["train-mean"]["mae"] == pytest.approx(ab_mean / n, rel=1e-9)


@pytest.mark.parametrize("label,message", [
    ("sofmax", "unknown mechanism 'sofmax'"), ("amlp-cov:form", "key=value"), ("amlp-cov:", "nothing after"),
    ("gmlp", "cross form"),
])
def test_study_mechanism_labels_are_checked(label, message):
    from amlp.train.study_forecasting import parse_mechanism

    with pytest.raises(ValueError, match=message):
        parse_mechanism(label)
    assert parse_mechanism("amlp-cov:form=official, landmarks=8") == ("amlp-cov", {"form": "official", "landmarks": 8})


def test_study_cli_refuses_bad_arguments_without_a_traceback(tmp_path):
    from amlp.cli import app

    runner = CliRunner()
    config = str(ROOT / "configs/forecasting/study/cpu.yaml")
    for args, needle in ((["--mechanisms", "sofmax"], "unknown mechanism 'sofmax'"),
                         (["--datasets", "ETTh9"], "--datasets: 'ETTh9' not in this study"),
                         (["--settings", "Q"], "--settings: 'Q'"),
                         (["--seeds", "x"], "--seeds must be comma-separated integers")):
        res = runner.invoke(app, ["study", "forecasting", "--config", config, *args])
        assert res.exit_code in (1, 2), res.output
        assert needle in res.output and "Traceback" not in res.output
    assert not (tmp_path / "runs").exists()


# --- any CSV -----------------------------------------------------------------------------------------
WEATHER = DATA / "weather_wth" / "WTH.csv.gz"
needs_weather = pytest.mark.skipif(not WEATHER.is_file(), reason="Weather data not found (set AMLP_DATA_DIR)")


@needs_weather
def test_weather_csv_with_its_own_dates_columns_and_the_ratio_split():
    from amlp.tasks.forecasting.data import load_series

    seq, label, pred = 48, 24, 24
    data = load_series(WEATHER, name="Weather", target="WetBulbCelsius", features="M", seq_len=seq,
                       label_len=label, pred_len=pred)
    n = 35064
    assert data.enc_in == 12 and data.columns[-1] == "WetBulbCelsius" and data.target_index == 11
    n_train, n_test = int(0.7 * n), int(0.2 * n)
    assert (n_train, n_test) == (24544, 7012)  # as the data's README gives Informer's split
    assert data.borders == {"train": (0, n_train), "val": (n_train - seq, n - n_test), "test": (n - n_test - seq, n)}
    # dates like 1/1/2010 0:00 parse, hourly features (hour, weekday, day, day of year)
    assert data.n_time_features == 4
    first = data.splits["train"][0]["x_mark"][1].numpy()  # 2010-01-01 01:00, a Friday
    np.testing.assert_allclose(first, [1 / 23 - 0.5, 4 / 6 - 0.5, -0.5, -0.5], rtol=1e-6, atol=1e-7)
    with gzip.open(WEATHER, "rt") as fh:
        rows = list(csv.reader(fh))
    raw = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    np.testing.assert_allclose(data.scaler.mean, raw[:n_train].mean(axis=0), rtol=1e-10)
    s = load_series(WEATHER, target="WetBulbCelsius", features="S", seq_len=seq, label_len=label, pred_len=pred,
                    columns=["Visibility", "WetBulbCelsius"])
    assert s.columns == ("WetBulbCelsius",) and s.enc_in == 1


@needs_weather
def test_forecasting_config_on_a_csv_of_ones_own(tmp_path):
    from amlp.train import load_config
    from amlp.tasks.forecasting.task import ForecastingTask

    cfg = load_config(ROOT / "configs/forecasting/cpu/weather_S.yaml", TINY + [f"data.data_dir={DATA}"])
    task = ForecastingTask(cfg)
    assert task.data.name == "Weather" and task.data.c_out == 1
    assert task.data.borders["test"][1] == 35064
    model = task.build_model()
    batch = {k: v.unsqueeze(0) for k, v in task.dataset("val")[0].items()}
    pred, target = task.forecast(model.eval(), batch)
    assert pred.shape == target.shape == (1, 12, 1)
    # an absolute path works as well, and a missing one names both places it looked
    ok = load_config(raw={**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "path": str(WEATHER)}})
    assert ForecastingTask(ok).data.enc_in == 1
    bad = load_config(raw={**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "path": "nope/WTH.csv"}})
    with pytest.raises(FileNotFoundError, match="data.path 'nope/WTH.csv' was found neither"):
        ForecastingTask(bad)


def test_csv_errors_name_the_file_and_the_problem(tmp_path):
    from amlp.tasks.forecasting.data import load_series, read_series_csv

    def write(name, text):
        path = tmp_path / name
        path.write_text(text)
        return path

    good = "when,a,b\n" + "\n".join(f"1/{d}/2020 {h}:00,{d + h},{h}" for d in range(1, 29) for h in range(24))
    kw = dict(seq_len=24, label_len=12, pred_len=12)
    data = load_series(write("g.csv", good), target="b", date_column="when", **kw)
    assert data.enc_in == 2 and data.n_time_features == 4
    with pytest.raises(ValueError, match="missing column.*date.*the file has when, a, b"):
        read_series_csv(write("g2.csv", good))
    with pytest.raises(ValueError, match="target column 'c' is not among"):
        load_series(write("g3.csv", good), target="c", date_column="when", **kw)
    with pytest.raises(ValueError, match=r"must hold timestamps like the format '%Y-%m-%d'"):
        load_series(write("g4.csv", good), target="b", date_column="when", date_format="%Y-%m-%d", **kw)
    swapped = good.replace("1/2/2020 0:00", "1/1/2019 0:00")
    with pytest.raises(ValueError, match=r"dates must increase.*line 26.*1/1/2019 0:00"):
        load_series(write("g5.csv", swapped), target="b", date_column="when", **kw)
    text = good.replace(",5,", ",abc,", 1)
    with pytest.raises(ValueError, match="column 'a' has a non-numeric or missing value 'abc'.*data.columns"):
        load_series(write("g6.csv", text), target="b", date_column="when", **kw)
    text = good.replace(",5,", ",n/a,", 1)
    with pytest.raises(ValueError, match=r"column 'a' has a non-numeric or missing value \(empty or NA\)"):
        load_series(write("g6.csv", text), target="b", date_column="when", **kw)
    with pytest.raises(ValueError, match="too few for the split"):
        load_series(write("g7.csv", "when,a\n1/1/2020 0:00,1\n1/1/2020 1:00,2\n"), target="a", date_column="when",
                    **kw)


@pytest.mark.parametrize("override,message", [
    ("data.dataset=Weather", "ETT presets.*set data.path"),
    ("data.split_ratios=[0.7, 0.2, 0.2]", "summing to 1"),
    ("data.freq=fortnight", "data.freq"),
    ("data.columns=[a, a]", "distinct"),
])
def test_csv_config_errors(override, message):
    from amlp.train import load_config

    with pytest.raises(ValueError, match=message):
        load_config(ROOT / "configs/forecasting/cpu/etth1_S.yaml", [override])


@needs_data
def test_resume_needs_only_the_run_dir_and_refuses_a_contradicting_config(tmp_path):
    from amlp.cli import app

    runner = CliRunner()
    cfg = str(ROOT / "configs/forecasting/cpu/etth1_S.yaml")
    run = str(tmp_path / "run")
    args = ["train", "forecasting", "--config", cfg, "--run-dir", run, "--data-dir", str(DATA),
            *sum((["--set", o] for o in TINY + ["model.cross_mixer=amlp-cov"]), [])]
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, ["train", "forecasting", "--run-dir", run, "--resume", "--set", "train.progress=false"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "results.json").read_text())["config"]["model"]["cross_mixer"] == "amlp-cov"
    # the README's old line: the config file without the run's --set contradicts the recorded config
    res = runner.invoke(app, ["train", "forecasting", "--config", cfg, "--run-dir", run, "--resume"])
    assert res.exit_code == 1 and "model.cross_mixer: recorded 'amlp-cov', given 'softmax'" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["train", "forecasting", "--run-dir", run, "--resume", "--set", "train.lr=0.5"])
    assert res.exit_code == 1 and "train.lr: recorded 0.001, given 0.5" in res.output
    res = runner.invoke(app, ["train", "forecasting", "--run-dir", str(tmp_path / "empty"), "--resume"])
    assert res.exit_code == 1 and "holds no recorded config" in res.output
    res = runner.invoke(app, ["train", "forecasting"])
    assert res.exit_code == 2 and "give --config" in res.output
