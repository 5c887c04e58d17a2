"""Tests of the measurement tool (amlp.bench and `amlp bench`). No test asserts a wall-clock figure."""

import json
import math
import os

import pytest
import torch
from typer.testing import CliRunner

import amlp
from amlp.bench import (CROSSOVER_COLUMNS, GEN_COLUMNS, OPS_COLUMNS, GenerationSettings, OpsSettings,
                        crossover_length, parse_lengths, parse_names, read_csv, run_generation, run_ops,
                        save_generation, save_ops)
from amlp.bench.generation import _step_matches_forward
from amlp.bench.memory import PeakMeter, cpu_peak_supported
from amlp.bench.report import fmt_count, fmt_share
from amlp.bench.workloads import (Workload, count_aten_calls, count_flops, make_callable, options_for,
                                  padding_mask)
from amlp.layers.registry import accepted_options
from amlp.cli import app
from amlp.layers import Capabilities, Mixer, ProjectedMixer, register_mixer
from amlp.layers.registry import _REGISTRY
from amlp.ops.softmax import softmax_attention, softmax_attention_reference

TINY = dict(batch=1, heads=2, head_dim=4, landmarks=2, min_run_time=0.001, bandwidth_mb=1, threads=1, matmul_size=64)


# -- sweep parsing --------------------------------------------------------------------------------

def test_parse_lengths_forms():
    assert parse_lengths("256:8192") == [256, 512, 1024, 2048, 4096, 8192]
    assert parse_lengths("256,512") == [256, 512]
    assert parse_lengths("512, 256,512") == [256, 512]
    assert parse_lengths("256:8192:4") == [256, 1024, 4096]
    assert parse_lengths("100,256:1024") == [100, 256, 512, 1024]
    assert parse_lengths("3:20") == [3, 6, 12]  # the end need not be on the grid
    assert parse_lengths("7") == [7]


@pytest.mark.parametrize("bad", ["", " ", "abc", "0", "-4", "512:256", "1:8:1", "1:2:3:4", "256,,512", "a:8", "4:b"])
def test_parse_lengths_rejects(bad):
    with pytest.raises(ValueError):
        parse_lengths(bad)


def test_parse_names():
    assert parse_names("a, b,a,,c") == ["a", "b", "c"]
    assert parse_names(None) == []


# -- crossover ------------------------------------------------------------------------------------

LENGTHS = [256, 512, 1024, 2048, 4096, 8192]


def test_crossover_power_laws_exact():
    # baseline a n^2, mixer b n: equal at n* = b / a; log-log interpolation is exact for power laws
    a, n_star = 1e-9, 1000.0
    base = [a * n * n for n in LENGTHS]
    mixer = [a * n_star * n for n in LENGTHS]
    c = crossover_length(LENGTHS, mixer, base)
    assert c.status == "at"
    assert c.length == pytest.approx(n_star, rel=1e-9)


def test_crossover_between_points_matches_independent_formula():
    # ratio 2 at 512 and 0.5 at 1024, other points decisive: log-log midpoint sqrt(512 * 1024)
    base = [1.0] * 6
    mixer = [4.0, 2.0, 0.5, 0.4, 0.3, 0.2]
    c = crossover_length(LENGTHS, mixer, base)
    assert c.status == "at" and c.length == pytest.approx(math.sqrt(512 * 1024))


def test_crossover_below_and_none_in_range():
    base = [float(n) for n in LENGTHS]
    assert crossover_length(LENGTHS, [0.5 * b for b in base], base).status == "below range"
    assert crossover_length(LENGTHS, [2.0 * b for b in base], base).status == "none in range"
    # ties count as not beating the baseline
    assert crossover_length(LENGTHS, base, base).status == "none in range"
    c = crossover_length(LENGTHS, [0.5 * b for b in base], base)
    assert c.length is None and c.describe() == "below range"


def test_crossover_uses_last_losing_point_and_skips_missing():
    base = [1.0] * 6
    # wins at 256, loses at 512 and 1024, wins from 2048 on: the crossover lies in (1024, 2048)
    mixer = [0.5, 1.5, 1.2, 0.8, 0.5, 0.1]
    c = crossover_length(LENGTHS, mixer, base)
    assert c.status == "at" and 1024 < c.length < 2048
    # a missing point at 1024 moves the interval to (512, 2048)
    mixer[2] = None
    c = crossover_length(LENGTHS, mixer, base)
    assert c.status == "at" and 512 < c.length < 2048
    assert crossover_length(LENGTHS, [math.nan] * 6, base).status == "not measured"
    # unsorted input is sorted first
    c2 = crossover_length(LENGTHS[::-1], [n * 1e-6 for n in LENGTHS][::-1], [1e-9 * n * n for n in LENGTHS][::-1])
    assert c2.status == "at" and c2.length == pytest.approx(1000.0)


# -- workloads ------------------------------------------------------------------------------------

def test_options_are_passed_only_to_mixers_that_take_them():
    assert "landmarks" in accepted_options("amlp-cov")
    assert "landmarks" not in accepted_options("softmax")
    assert options_for("softmax", {"landmarks": 16}) == {}
    assert options_for("amlp-pquery", {"landmarks": 16, "activation": "relu"}) == {"landmarks": 16,
                                                                                  "activation": "relu"}


def test_op_workload_is_the_mixers_per_head_op():
    w = Workload(kind="op", mixer="amlp-cov", batch=2, length=5, heads=2, head_dim=3, mode="fwd",
                 dtype="float64", options={"landmarks": 2, "form": "stable"})
    fn, facts = make_callable(w)
    out = fn()
    assert out.shape == (2, 5, 2, 3) and not out.requires_grad
    assert facts["io_bytes"] == 4 * 2 * 5 * 2 * 3 * 8  # q, k, v in and the output
    w.mode = "fwdbwd"
    fn, facts = make_callable(w)
    grads = fn()
    assert [g.shape for g in grads[:3]] == [torch.Size([2, 5, 2, 3])] * 3
    assert facts["io_bytes"] == 8 * 2 * 5 * 2 * 3 * 8
    with pytest.raises(ValueError, match="kind"):
        make_callable(Workload(kind="nope", mixer="softmax", batch=1, length=4, heads=1, head_dim=2))


def test_padding_mask_pads_the_end_of_every_row():
    assert padding_mask(2, 8, 0.0) is None
    mask = padding_mask(3, 8, 0.25)
    assert mask.shape == (3, 8) and mask.dtype == torch.bool
    assert mask.tolist() == [[True] * 6 + [False] * 2] * 3
    assert padding_mask(1, 4, 0.99).tolist() == [[True, False, False, False]]  # one position stays real
    for bad in (-0.1, 1.0, 1.5, True, "0.25"):
        with pytest.raises(ValueError, match="padding"):
            padding_mask(1, 4, bad)


@pytest.mark.parametrize("kind,mixer,options", [("op", "amlp-cov", {"landmarks": 2, "form": "stable"}),
                                                ("op", "softmax", {}),
                                                ("layer", "amlp-pquery", {"landmarks": 2, "form": "official"})])
def test_padded_workload_passes_the_masks(kind, mixer, options):
    """With padding, the real positions' outputs are those of the same inputs cut to the real length;
    without it (the same inputs, no masks), they are not."""
    B, T, H, D, real = 2, 8, 2, 3, 6
    w = Workload(kind=kind, mixer=mixer, batch=B, length=T, heads=H, head_dim=D, dtype="float64",
                 options=options, padding=0.25)
    fn, _ = make_callable(w)
    padded = fn()
    w.padding = 0.0
    fn_full, _ = make_callable(w)
    full = fn_full()
    # rebuild the same inputs and module (the workload seeds both) and cut them to the real length
    torch.manual_seed(w.seed)
    gen = torch.Generator().manual_seed(w.seed)
    module = amlp.build_mixer(mixer, dim=H * D, heads=H, **options).double().eval()
    with torch.no_grad():
        if kind == "op":
            q, k, v = (torch.randn(B, T, H, D, generator=gen, dtype=torch.float32).double() for _ in range(3))
            cut = module.mix_heads(q[:, :real], k[:, :real], v[:, :real], None, None)
        else:
            x = torch.randn(B, T, H * D, generator=gen, dtype=torch.float32).double()
            cut = module(x[:, :real])
    torch.testing.assert_close(padded[:, :real], cut)
    assert not torch.allclose(full[:, :real], cut)
    w.padding = 0.25
    w.mode = "fwdbwd"
    fn, _ = make_callable(w)
    assert all(torch.isfinite(g).all() for g in fn() if g is not None)


def test_padding_is_refused_where_it_means_nothing():
    with pytest.raises(ValueError, match="'op' and 'layer'"):
        make_callable(Workload(kind="nar", mixer="softmax", batch=1, length=4, heads=1, head_dim=2, padding=0.5))
    with pytest.raises(ValueError, match="padding"):
        OpsSettings(padding=1.0).validate()


def test_ar_step_gate_passes_for_softmax():
    ok, message = _step_matches_forward(GenerationSettings(heads=2))
    assert ok, message


def test_ar_step_gate_fails_for_a_step_that_differs_from_forward():
    from amlp.layers.softmax import SoftmaxAttention

    name = "broken-step-for-bench-test"

    @register_mixer(name, description="softmax attention whose step is off by 1 % (test only)")
    class BrokenStep(SoftmaxAttention):
        def step(self, x_t, state):
            y, state = super().step(x_t, state)
            return y * 1.01, state

    try:
        ok, message = _step_matches_forward(GenerationSettings(heads=2, ar_mixer=name))
    finally:
        _REGISTRY.pop(name, None)
    assert not ok and "step() differs from forward()" in message


# -- correctness gate: a deliberately broken mixer ---------------------------------------------------

@pytest.fixture
def broken_mixer():
    name = "broken-for-bench-test"

    @register_mixer(name, description="softmax attention with a wrong fast path (test only)")
    class Broken(ProjectedMixer):
        def mix_heads(self, q, k, v, q_mask, kv_mask):
            return softmax_attention(q, k, v, q_mask=q_mask, kv_mask=kv_mask) * 1.01

        def mix_heads_reference(self, q, k, v, q_mask, kv_mask):
            return softmax_attention_reference(q, k, v, q_mask=q_mask, kv_mask=kv_mask)

    yield name
    _REGISTRY.pop(name, None)


def test_gate_refuses_broken_mixer(broken_mixer):
    result = run_ops(OpsSettings(mixers=["softmax", broken_mixer], lengths=[8, 16], memory=False, **TINY))
    broken = [r for r in result.rows if r["mixer"] == broken_mixer]
    assert len(broken) == 2
    for r in broken:
        assert r["status"] == "failed" and "correctness" in r["message"]
        assert r["fwd_time_s"] is None and r["fwdbwd_time_s"] is None and r["fwd_speedup_vs_baseline"] is None
        assert all(r[f"{m}_{c}"] is None for m in ("fwd", "fwdbwd") for c in ("aten_calls", "flops", "peak_fraction"))
    assert all(r["status"] == "ok" and r["fwd_time_s"] > 0 for r in result.rows if r["mixer"] == "softmax")
    assert not [c for c in result.crossovers if c["mixer"] == broken_mixer]


@pytest.fixture
def token_mixer():
    """A plain Mixer (no per-head op) with a maximum length of 8: doubles its input."""
    name = "token-mixer-for-bench-test"

    @register_mixer(name, description="y = 2 x (test only)")
    class Doubler(Mixer):
        capabilities = Capabilities(max_length=8)

        def mix_tokens(self, x, context, x_mask, context_mask):
            out = 2 * x
            return out if x_mask is None else out * x_mask[..., None]

        def reference_tokens(self, x, context, x_mask, context_mask):
            return self.mix_tokens(x, context, x_mask, context_mask)

    yield name
    _REGISTRY.pop(name, None)


def test_capabilities_decide_what_is_measured(token_mixer):
    # no per-head op: an op-level sweep measures the whole layer, says so, and compares it with no op
    op = run_ops(OpsSettings(mixers=[token_mixer], lengths=[8], memory=False, **TINY))
    row = [r for r in op.rows if r["mixer"] == token_mixer][0]
    assert row["status"] == "ok" and row["level"] == "layer" and "per-head op" in row["message"]
    assert row["fwd_time_s"] > 0 and row["fwd_speedup_vs_baseline"] is None
    assert [r["level"] for r in op.rows if r["mixer"] == "softmax"] == ["op"]
    # a maximum length of 8: longer points are skipped with the reason, and get no counts
    long = run_ops(OpsSettings(mixers=[token_mixer], lengths=[16], memory=False, **TINY))
    row = [r for r in long.rows if r["mixer"] == token_mixer][0]
    assert row["status"] == "skipped" and "max length" in row["message"] and row["fwd_time_s"] is None
    assert row["fwd_aten_calls"] is None and row["fwdbwd_flops"] is None and row["fwdbwd_peak_fraction"] is None
    layer = run_ops(OpsSettings(mixers=[token_mixer], lengths=[8, 16], level="layer", memory=False, **TINY))
    rows = {r["length"]: r for r in layer.rows if r["mixer"] == token_mixer}
    assert rows[8]["status"] == "ok" and rows[8]["fwd_time_s"] > 0
    assert rows[16]["status"] == "skipped" and "max length" in rows[16]["message"]


def test_broken_mixer_is_gone_after_the_fixture():
    assert "broken-for-bench-test" not in amlp.mixer_names()
    assert "token-mixer-for-bench-test" not in amlp.mixer_names()


def test_cli_exit_code_on_failed_mixer(broken_mixer, tmp_path):
    res = CliRunner().invoke(app, ["bench", "ops", "--mixers", broken_mixer, "--lengths", "8", "--no-memory",
                                   "--no-plots", "--min-run-time", "0.001", "--bandwidth-mb", "1",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 1, res.output
    assert "failed" in res.output
    frame, _ = read_csv(str(tmp_path / "ops.csv"))
    assert list(frame["mixer"]) == ["softmax", broken_mixer]  # the baseline is added for the comparison
    assert list(frame["status"]) == ["ok", "failed"]


# -- results schema -------------------------------------------------------------------------------

def test_ops_csv_and_json_schema(tmp_path):
    settings = OpsSettings(mixers=["softmax", "amlp-cov"], lengths=[8, 16], memory=False, **TINY)
    result = run_ops(settings)
    paths = save_ops(result, str(tmp_path), plots=False)
    assert sorted(os.path.basename(p) for p in paths) == ["ops.csv", "ops.json", "ops_crossover.csv"]
    frame, header = read_csv(str(tmp_path / "ops.csv"))
    assert list(frame.columns) == OPS_COLUMNS
    assert len(frame) == 4
    for key in ("cpu_model", "cpu_count", "torch", "cuda", "gpu_model", "timestamp_utc", "settings.dtype",
                "settings.lengths", "settings.level", "settings.landmarks", "bandwidth_bytes_per_s",
                "matmul_flops_per_s", "memory_method"):
        assert key in header, key
    assert json.loads(header["settings.lengths"]) == [8, 16]
    assert (frame["fwd_time_s"] > 0).all() and frame["fwd_peak_bytes"].isna().all()
    soft = frame[frame["mixer"] == "softmax"]
    assert (soft["fwd_speedup_vs_baseline"] == 1.0).all()
    cov = frame[frame["mixer"] == "amlp-cov"]
    assert (cov["landmarks"] == 2).all() and soft["landmarks"].isna().all()
    # distance to the floor is the time over io_bytes / bandwidth
    bw = float(header["bandwidth_bytes_per_s"])
    row = cov.iloc[0]
    assert row["fwd_floor_s"] == pytest.approx(4 * 1 * 8 * 2 * 4 * 4 / bw)
    assert row["fwd_x_floor"] == pytest.approx(row["fwd_time_s"] / row["fwd_floor_s"])
    cross, _ = read_csv(str(tmp_path / "ops_crossover.csv"))
    assert list(cross.columns) == CROSSOVER_COLUMNS
    assert set(cross["metric"]) == {"fwd time", "fwd+bwd time", "fwd memory", "fwd+bwd memory"}
    assert set(cross[cross["metric"].str.contains("memory")]["status"]) == {"not measured"}
    data = json.loads((tmp_path / "ops.json").read_text())
    assert set(data) == {"header", "rows", "crossovers"}
    assert set(data["rows"][0]) == set(OPS_COLUMNS)
    assert data["header"]["settings"]["heads"] == 2


def test_settings_are_validated():
    with pytest.raises(ValueError, match="unknown mixer"):
        OpsSettings(mixers=["no-such-mixer"]).validate()
    with pytest.raises(ValueError, match="level"):
        OpsSettings(level="model").validate()
    with pytest.raises(ValueError, match="unknown mixer"):
        OpsSettings(baseline="no-such-mixer").validate()
    with pytest.raises(ValueError, match="dtype"):
        OpsSettings(dtype="float8").validate()
    with pytest.raises(ValueError, match="recurrent"):
        GenerationSettings(ar_mixer="amlp-pquery").validate()


def test_cli_reports_bad_options(tmp_path):
    res = CliRunner().invoke(app, ["bench", "ops", "--lengths", "8:4", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "error" in res.output
    res = CliRunner().invoke(app, ["bench", "ops", "--mixers", "no-such-mixer", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown mixer" in res.output


# -- operator calls and FLOPs ----------------------------------------------------------------------

COUNT_COLUMNS = [f"{m}_{c}" for m in ("fwd", "fwdbwd") for c in ("aten_calls", "flops", "peak_fraction")]


@pytest.fixture
def per_query_mixer():
    """Softmax attention computed one query at a time in a Python loop: correct, but its number of
    operator calls grows with the length (the regression the aten_calls columns are there to show)."""
    name = "per-query-for-bench-test"

    @register_mixer(name, description="softmax attention, one query per call (test only)")
    class PerQuery(ProjectedMixer):
        def mix_heads(self, q, k, v, q_mask, kv_mask):
            rows = [softmax_attention(q[:, i:i + 1], k, v, kv_mask=kv_mask,
                                      q_mask=None if q_mask is None else q_mask[:, i:i + 1])
                    for i in range(q.shape[1])]
            return torch.cat(rows, dim=1)

        def mix_heads_reference(self, q, k, v, q_mask, kv_mask):
            return softmax_attention_reference(q, k, v, q_mask=q_mask, kv_mask=kv_mask)

    yield name
    _REGISTRY.pop(name, None)


def test_counts_are_positive_and_peak_fraction_is_flops_over_time_over_matmul_rate():
    result = run_ops(OpsSettings(mixers=["softmax", "amlp-cov"], lengths=[8, 16], memory=False, **TINY))
    rate = result.header["matmul_flops_per_s"]
    assert rate > 0 and "64x64" in result.header["matmul_method"]
    assert len(result.rows) == 4
    for r in result.rows:
        assert r["status"] == "ok"
        assert all(r[c] > 0 for c in COUNT_COLUMNS), r
        assert isinstance(r["fwd_aten_calls"], int) and isinstance(r["fwdbwd_flops"], int)
        assert r["fwdbwd_aten_calls"] > r["fwd_aten_calls"] and r["fwdbwd_flops"] > r["fwd_flops"]
        for mode in ("fwd", "fwdbwd"):
            assert r[f"{mode}_peak_fraction"] == pytest.approx(r[f"{mode}_flops"] / r[f"{mode}_time_s"] / rate)


def test_softmax_flops_grow_with_the_square_of_the_length():
    # fused attention is two [T, D] x [D, T]-sized products per head: 4 B H T^2 D FLOPs forward; the
    # backward recomputes the logits and adds four more products (7 in all)
    result = run_ops(OpsSettings(mixers=["softmax"], lengths=[16, 32], memory=False, **TINY))
    by_length = {r["length"]: r for r in result.rows}
    for t, r in by_length.items():
        assert r["fwd_flops"] == 4 * 1 * 2 * t * t * 4
        assert r["fwdbwd_flops"] == 7 * 2 * 1 * 2 * t * t * 4
    assert by_length[32]["fwd_flops"] / by_length[16]["fwd_flops"] == pytest.approx(4.0)
    assert by_length[32]["fwdbwd_flops"] / by_length[16]["fwdbwd_flops"] == pytest.approx(4.0)


def test_count_flops_counts_products_and_not_elementwise_work():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert count_flops(lambda: a @ b) == 2 * 3 * 5 * 7
    assert count_flops(lambda: (a.exp() + 1).softmax(-1)) == 0


def test_aten_calls_do_not_depend_on_the_length_for_softmax(per_query_mixer):
    result = run_ops(OpsSettings(mixers=["softmax", per_query_mixer], lengths=[8, 32], memory=False, **TINY))
    rows = {(r["mixer"], r["length"]): r for r in result.rows}
    for mode in ("fwd", "fwdbwd"):
        assert rows[("softmax", 8)][f"{mode}_aten_calls"] == rows[("softmax", 32)][f"{mode}_aten_calls"]
        # a Python loop over positions shows as calls growing with T
        assert rows[(per_query_mixer, 32)][f"{mode}_aten_calls"] > 2 * rows[(per_query_mixer, 8)][f"{mode}_aten_calls"]


def test_count_aten_calls_counts_nested_calls_once_each():
    x, w = torch.randn(4, 3), torch.randn(2, 3)
    # aten::linear calls aten::t and aten::addmm (with views below): more than one call in all
    linear = count_aten_calls(lambda: torch.nn.functional.linear(x, w))
    add = count_aten_calls(lambda: x + x)
    assert add == 1 and linear > 2
    assert count_aten_calls(lambda: (x + x, x + x)) == 2
    assert count_aten_calls(lambda: (x + x, torch.nn.functional.linear(x, w))) == 1 + linear


def test_no_counts_leaves_the_count_columns_empty(tmp_path):
    res = CliRunner().invoke(app, ["bench", "ops", "--quick", "--no-counts", "--mixers", "softmax,amlp-cov",
                                   "--lengths", "8", "--heads", "2", "--head-dim", "4", "--landmarks", "2",
                                   "--min-run-time", "0.001", "--bandwidth-mb", "1", "--no-memory", "--no-plots",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    frame, header = read_csv(str(tmp_path / "ops.csv"))
    assert (frame["status"] == "ok").all() and (frame["fwd_time_s"] > 0).all()
    assert frame[COUNT_COLUMNS].isna().all().all()
    assert header["settings.counts"] == "False" and header["matmul_flops_per_s"] == "None"
    assert "matmul rate" not in res.output


def test_cli_counts_on_a_quick_run(tmp_path):
    res = CliRunner().invoke(app, ["bench", "ops", "--quick", "--mixers", "softmax,amlp-cov", "--lengths", "8,16",
                                   "--heads", "2", "--head-dim", "4", "--landmarks", "2", "--min-run-time", "0.001",
                                   "--bandwidth-mb", "1", "--matmul-size", "64", "--no-memory", "--no-plots",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    frame, header = read_csv(str(tmp_path / "ops.csv"))
    assert set(frame["mixer"]) == {"softmax", "amlp-cov"}
    assert (frame[COUNT_COLUMNS] > 0).all().all()
    assert float(header["matmul_flops_per_s"]) > 0 and header["settings.matmul_size"] == "64"
    assert "matmul rate (64x64 float32 torch.mm)" in res.output and "aten calls" in res.output
    data = json.loads((tmp_path / "ops.json").read_text())
    assert data["header"]["matmul_flops_per_s"] > 0
    assert all(r["fwdbwd_aten_calls"] > 0 for r in data["rows"])


def test_fmt_share_and_fmt_count():
    assert [fmt_share(x) for x in (0.4123, 0.034, 0.0027, None, math.nan)] == ["41%", "3.4%", "0.27%", "-", "-"]
    assert [fmt_count(x) for x in (1140, 1140.0, None, math.nan)] == ["1,140", "1,140", "-", "-"]


# -- memory ---------------------------------------------------------------------------------------

@pytest.mark.skipif(not cpu_peak_supported(), reason="needs Linux /proc")
def test_cpu_peak_memory_counts_the_output():
    # the forward output alone is B*T*H*D floats: the peak must be at least that and grow with T
    small = Workload(kind="op", mixer="amlp-cov", batch=1, length=64, heads=4, head_dim=64, mode="fwd",
                     options={"form": "stable"})
    big = Workload(kind="op", mixer="amlp-cov", batch=1, length=8192, heads=4, head_dim=64, mode="fwd",
                   options={"form": "stable"})
    with PeakMeter(threads=1) as meter:
        p_small, both = meter.measure(small), meter.measure_both(big)
    out_bytes = 8192 * 4 * 64 * 4
    # both ways: the first call in a fresh process and a repeated call hold the output at their peak
    assert set(both) == {"first", "steady"}
    assert both["steady"] >= 0.9 * out_bytes and both["first"] >= 0.9 * out_bytes
    assert both["steady"] > p_small


def test_ops_rows_report_first_call_and_steady_memory():
    result = run_ops(OpsSettings(mixers=["amlp-cov"], lengths=[2048], level="op", **{**TINY, "head_dim": 16}))
    if not cpu_peak_supported():
        pytest.skip("needs Linux /proc")
    row = {r["mixer"]: r for r in result.rows}["amlp-cov"]
    for mode in ("fwd", "fwdbwd"):
        assert row[f"{mode}_peak_bytes"] > 0 and row[f"{mode}_first_peak_bytes"] > 0
        assert row[f"{mode}_first_memory_ratio_vs_baseline"] == pytest.approx(
            row[f"{mode}_first_peak_bytes"] / {r["mixer"]: r for r in result.rows}["softmax"][f"{mode}_first_peak_bytes"])


# -- end to end -----------------------------------------------------------------------------------

def test_cli_ops_end_to_end(tmp_path):
    res = CliRunner().invoke(app, ["bench", "ops", "--quick", "--lengths", "8,16", "--heads", "2", "--head-dim", "4",
                                   "--landmarks", "2", "--min-run-time", "0.001", "--bandwidth-mb", "1",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    for name in ("ops.csv", "ops.json", "ops_crossover.csv"):
        assert (tmp_path / name).exists()
    frame, header = read_csv(str(tmp_path / "ops.csv"))
    assert set(frame["mixer"]) == {"softmax", "amlp-cov", "amlp-pquery"}
    assert (frame["status"] == "ok").all()
    if cpu_peak_supported():
        # every point has a measured peak (tiny inputs may fit in pages already resident, so 0 is
        # possible here; test_cpu_peak_memory_counts_the_output checks the size on a large input)
        assert frame["fwdbwd_peak_bytes"].notna().all() and frame["fwd_peak_bytes"].notna().all()
    assert header["settings.threads"] == "1"
    assert "crossover" in res.output
    if pytest.importorskip("matplotlib"):
        assert (tmp_path / "ops_time.png").stat().st_size > 0
        assert (tmp_path / "ops_memory.png").stat().st_size > 0
        (tmp_path / "ops_time.png").unlink()
        res = CliRunner().invoke(app, ["bench", "plot", str(tmp_path)])
        assert res.exit_code == 0, res.output
        assert (tmp_path / "ops_time.png").stat().st_size > 0
    res = CliRunner().invoke(app, ["bench", "plot", str(tmp_path / "missing")])
    assert res.exit_code == 2


def _tiny_ops(tmp_path, *options):
    """`amlp bench ops` at T = 8 on tiny heads, no memory, no plots, with the given options."""
    return CliRunner().invoke(app, ["bench", "ops", "--lengths", "8", "--heads", "2", "--head-dim", "4", "--landmarks",
                                    "2", "--min-run-time", "0.001", "--bandwidth-mb", "1", "--no-memory", "--no-plots",
                                    "--out", str(tmp_path), *options])


def test_cli_padded_run_records_the_padding(tmp_path):
    res = _tiny_ops(tmp_path, "--mixers", "amlp-pquery", "--padding", "0.25", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert "25% of positions padded" in res.output
    frame, header = read_csv(str(tmp_path / "ops.csv"))
    assert (frame["padding"] == 0.25).all() and (frame["status"] == "ok").all()
    assert header["settings.padding"] == "0.25"
    res = CliRunner().invoke(app, ["bench", "report", str(tmp_path)])
    assert res.exit_code == 0 and "25% of positions padded" in res.output
    res = CliRunner().invoke(app, ["bench", "ops", "--padding", "1", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "padding" in res.output


def test_cli_layer_level(tmp_path):
    res = _tiny_ops(tmp_path, "--level", "layer", "--mixers", "amlp-pquery", "--baseline", "none")
    assert res.exit_code == 0, res.output
    frame, _ = read_csv(str(tmp_path / "ops.csv"))
    assert (frame["level"] == "layer").all() and (frame["fwdbwd_time_s"] > 0).all()
    assert list(frame["mixer"]) == ["amlp-pquery"] and frame["fwd_speedup_vs_baseline"].isna().all()
    cross, _ = read_csv(str(tmp_path / "ops_crossover.csv"))
    assert len(cross) == 0


def test_cli_generation_end_to_end(tmp_path):
    res = CliRunner().invoke(app, ["bench", "generation", "--quick", "--lengths", "4,8", "--dim", "8", "--heads", "2",
                                   "--layers", "1", "--landmarks", "2", "--min-run-time", "0.001", "--no-memory",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    frame, header = read_csv(str(tmp_path / "generation.csv"))
    assert list(frame.columns) == GEN_COLUMNS
    assert list(dict.fromkeys(frame["method"])) == ["AR", "NAR", "NAR amlp-cov", "NAR amlp-pquery"]
    ar = frame[frame["method"] == "AR"]
    assert (ar["time_ratio_to_ar"] == 1.0).all() and (ar["speedup_vs_ar"] == 1.0).all()
    nar = frame[frame["method"] == "NAR"]
    assert (nar["memory_saving_vs_nar"].fillna(0.0) == 0.0).all()
    assert header["settings.activation"] == "relu" and header["settings.batch"] == "1"
    data = json.loads((tmp_path / "generation.json").read_text())
    assert [h["method"] for h in data["headline"]] == ["NAR", "NAR amlp-cov", "NAR amlp-pquery"]
    assert all(h["length"] == 8 for h in data["headline"])
    assert "headline" in res.output
    if pytest.importorskip("matplotlib"):
        assert (tmp_path / "generation_ratio.png").stat().st_size > 0


def test_generation_ratios_from_rows(tmp_path):
    result = run_generation(GenerationSettings(lengths=[4], batch=1, dim=8, heads=2, layers=1, landmarks=2,
                                               min_run_time=0.001, memory=False, threads=1))
    by = {r["method"]: r for r in result.rows}
    for method in ("NAR", "NAR amlp-cov", "NAR amlp-pquery"):
        r = by[method]
        assert r["time_ratio_to_ar"] == pytest.approx(r["time_s"] / by["AR"]["time_s"])
        assert r["speedup_vs_ar"] == pytest.approx(by["AR"]["time_s"] / r["time_s"])
    paths = save_generation(result, str(tmp_path), plots=False)
    assert sorted(os.path.basename(p) for p in paths) == ["generation.csv", "generation.json"]


@pytest.mark.gpu
def test_ops_on_gpu():
    result = run_ops(OpsSettings(mixers=["softmax", "amlp-cov"], lengths=[64, 128], device="cuda",
                                 **{**TINY, "bandwidth_mb": 16}))
    assert all(r["status"] == "ok" and r["fwdbwd_peak_bytes"] > 0 for r in result.rows)
    assert result.header["matmul_flops_per_s"] > 0
    assert all(r["fwdbwd_aten_calls"] > 0 and r["fwdbwd_flops"] > 0 and r["fwdbwd_peak_fraction"] > 0
               for r in result.rows)


def test_markdown_report_is_written_into_its_block_and_replaced(tmp_path):
    import json

    from amlp.bench.markdown import report_markdown, update_document

    header = {"command": "amlp bench ops", "cpu_model": "cpu", "cpu_count": 2, "torch": "x", "torch_threads": 1,
              "load_average_1m": 0.1, "timestamp_utc": "t", "bandwidth_bytes_per_s": 5e9,
              "settings": {"level": "op", "dtype": "float32", "batch": 1, "heads": 8, "head_dim": 64, "landmarks": 16}}
    header["matmul_flops_per_s"] = 4.5e10
    row = {"mixer": "amlp-cov", "length": 8192, "status": "ok", "fwd_time_s": 0.05, "fwdbwd_time_s": 0.2,
           "fwd_peak_bytes": 2**24, "fwdbwd_peak_bytes": 2**26, "fwdbwd_speedup_vs_baseline": 40.0,
           "fwdbwd_memory_ratio_vs_baseline": 0.99, "fwd_x_floor": 3.0, "fwdbwd_peak_fraction": 0.234,
           "fwdbwd_aten_calls": 1140}
    crossover = {"mixer": "amlp-cov", "baseline": "softmax", "metric": "fwd+bwd time", "status": "at", "length": 400.2}
    (tmp_path / "ops.json").write_text(json.dumps({"header": header, "rows": [row], "crossovers": [crossover]}))
    body = report_markdown(str(tmp_path))
    assert "| amlp-cov | 8192 |" in body
    assert "40.0x" in body and "0.990x" in body and "| fwd+bwd time | 400 |" in body
    assert "% of peak (fwd+bwd) | aten calls (fwd+bwd) |" in body and "| 3.0x | 23% | 1,140 | ok |" in body
    assert "matmul rate 45.0 GFLOP/s" in body
    doc = tmp_path / "doc.md"
    doc.write_text("# title\n\ntext before\n")
    update_document(str(doc), "cpu", "first")
    update_document(str(doc), "cpu", "second")
    text = doc.read_text()
    assert text.startswith("# title") and "second" in text and "first" not in text
    assert text.count("amlp bench report: begin cpu") == 1
    with pytest.raises(FileNotFoundError):
        report_markdown(str(tmp_path / "nothing"))


def test_step_bench_measures_each_position_and_refuses_stepless_mixers():
    from amlp.bench.step import StepSettings, run_step

    header, rows = run_step(StepSettings(mixers=["causal-rn", "softmax"], positions=[2, 5], steps=2, dim=16,
                                         heads=2, threads=1))
    assert [(r["mixer"], r["position"]) for r in rows] == [("causal-rn", 2), ("causal-rn", 5), ("softmax", 2),
                                                          ("softmax", 5)]
    assert all(r["status"] == "ok" and r["seconds_per_step"] > 0 for r in rows)
    assert rows[0]["ratio_to_first_position"] == 1.0
    # a constant state for CausalRN, a growing cache for softmax attention
    assert rows[0]["state_floats"] == rows[1]["state_floats"]
    assert rows[3]["state_floats"] > rows[2]["state_floats"]
    assert "command" in header
    with pytest.raises(ValueError, match="recurrent"):
        StepSettings(mixers=["amlp-pquery"]).validate()


def test_op_level_measures_token_mixers_as_layers_and_option_maxima_follow_the_length():
    # abc is a ProjectedMixer without a per-head op: measured at layer level, with a message
    op = run_ops(OpsSettings(mixers=["abc", "linformer", "gmlp"], lengths=[8, 600], memory=False, **TINY))
    rows = {(r["mixer"], r["length"]): r for r in op.rows}
    assert rows[("abc", 8)]["status"] == "ok" and rows[("abc", 8)]["level"] == "layer"
    assert "per-head op" in rows[("abc", 8)]["message"] and rows[("abc", 8)]["fwd_time_s"] > 0
    # linformer's maximum is an option, built to each length: measured past its default of 512
    assert rows[("linformer", 600)]["status"] == "ok" and rows[("linformer", 600)]["fwd_time_s"] > 0
    layer = run_ops(OpsSettings(mixers=["gmlp", "abc"], lengths=[600], level="layer", memory=False, **TINY))
    assert all(r["status"] == "ok" and r["fwd_time_s"] > 0 for r in layer.rows if r["mixer"] in ("gmlp", "abc"))
