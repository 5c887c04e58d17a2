"""`amlp bench ops` over every registered mixer, at op and layer level, causal and not, with and without
padding: each point is measured or skipped with a stated reason, never an error."""

import pytest

from amlp.bench.ops import OpsSettings, run_ops
from amlp.layers import mixer_names


@pytest.mark.parametrize("level,causal,padding", [("op", False, 0.0), ("op", True, 0.0), ("layer", False, 0.0),
                                                  ("layer", True, 0.0), ("op", False, 0.25), ("layer", True, 0.25)])
def test_bench_ops_measures_every_registered_mixer(level, causal, padding):
    names = mixer_names(causal=causal)
    assert len(names) >= 8
    settings = OpsSettings(mixers=names, lengths=[16, 32], heads=2, head_dim=8, landmarks=4, level=level,
                           causal=causal, padding=padding, min_run_time=0.001, memory=False, counts=False, threads=1,
                           bandwidth_mb=1, device="cpu")
    result = run_ops(settings)
    rows = {(r["mixer"], r["length"]): r for r in result.rows}
    for name in names:
        for length in (16, 32):
            row = rows[(name, length)]
            assert row["status"] in ("ok", "skipped"), (name, length, row["status"], row.get("message"))
            if row["status"] == "skipped":
                assert row["message"], (name, length)
    measured = {name for (name, _), row in rows.items() if row["status"] == "ok"}
    assert measured == set(names), sorted(set(names) - measured)  # every registered mixer takes padding masks
    assert all(row["padding"] == padding for row in result.rows)
    for (name, _), row in rows.items():
        assert row["fwd_time_s"] > 0 and row["fwdbwd_time_s"] > 0, name
        if level == "op" and row["level"] == "layer":
            assert "per-head op" in row["message"]
