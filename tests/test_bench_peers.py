"""Tests of ``amlp bench peers`` (amlp.bench.peers). Tiny sizes; no test asserts a wall-clock figure."""

import json
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from amlp.bench import read_csv
from amlp.bench.markdown import peers_markdown
from amlp.bench.memory import cpu_peak_supported, forked_peak_bytes
from amlp.bench.peers import (PAIRS, PEERS_COLUMNS, RELEASED_PAIRS, SPECS, PeersSettings, _time_interleaved,
                              load_released_amlp, pair_outputs, run_peers, save_peers)
from amlp.cli import app

TINY = dict(batch=1, heads=2, head_dim=4, landmarks=2, wsize=5, features=4, proj_len=4, min_run_time=0.005,
            rounds=2, threads=1)
QUICK_CLI = ["bench", "peers", "--quick", "--heads", "2", "--head-dim", "4", "--landmarks", "2", "--wsize", "5",
             "--features", "4", "--proj-len", "4", "--min-run-time", "0.005"]


def _rows(result, pair):
    return [r for r in result.rows if r["pair"] == pair]


# -- peers that are not installed ------------------------------------------------------------------

def test_a_missing_peer_is_a_not_installed_row(monkeypatch):
    monkeypatch.setitem(sys.modules, "linformer", None)  # makes `import linformer` fail as if not installed
    result = run_peers(PeersSettings(pairs=["linformer", "softmax"], lengths=[8], **TINY))
    (row,) = _rows(result, "linformer")
    assert row["status"] == "not installed"
    assert "pip install linformer" in row["message"]
    assert row["amlp_fwd_s"] is None and row["length"] is None
    assert all(r["status"] == "ok" for r in _rows(result, "softmax"))


def test_cli_with_a_missing_peer_exits_cleanly(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "performer_pytorch", None)
    res = CliRunner().invoke(app, QUICK_CLI + ["--pairs", "performer", "--lengths", "8", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    frame, _ = read_csv(str(tmp_path / "peers.csv"))
    assert list(frame["status"]) == ["not installed"]
    assert "pip install performer-pytorch" in frame["message"][0]
    assert "pip install performer-pytorch" in (tmp_path / "peers.md").read_text()


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs Linux's /proc/self/clear_refs")
def test_forked_peak_counts_what_each_call_allocates():
    def alloc(mib):
        def fn():
            x = torch.ones(mib * 2**18)  # float32: mib MiB, every page touched
            return float(x[-1])
        return fn

    small, big = forked_peak_bytes([alloc(1), alloc(48)])
    assert 47 * 2**20 <= big <= 56 * 2**20
    assert small < 8 * 2**20 and big - small >= 40 * 2**20

    def fails():
        raise RuntimeError("no")

    assert forked_peak_bytes([alloc(1), fails]) == [None, None]  # a failing child measures nothing


# -- the softmax / SDPA pair, end to end ---------------------------------------------------------------

def test_quick_softmax_pair_end_to_end(tmp_path):
    res = CliRunner().invoke(app, QUICK_CLI + ["--pairs", "softmax", "--lengths", "8,16", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "peer time / amlp time" in res.output and "wrote" in res.output
    frame, header = read_csv(str(tmp_path / "peers.csv"))
    assert list(frame.columns) == PEERS_COLUMNS
    for key in ("cpu_model", "cpu_count", "torch", "cuda", "gpu_model", "torch_threads", "timestamp_utc",
                "load_average_1m", "command", "settings.pairs", "settings.lengths", "settings.heads",
                "timing_method", "memory_method"):
        assert key in header, key
    assert header["torch_threads"] == "1" and header["settings.rounds"] == "2"
    assert json.loads(header["settings.lengths"]) == [8, 16]
    assert list(frame["length"]) == [8, 16] and (frame["status"] == "ok").all()
    for mode in ("fwd", "fwdbwd"):
        assert (frame[f"amlp_{mode}_s"] > 0).all() and (frame[f"peer_{mode}_s"] > 0).all()
        assert frame[f"{mode}_ratio"].to_numpy() == pytest.approx(
            (frame[f"peer_{mode}_s"] / frame[f"amlp_{mode}_s"]).to_numpy())
        assert (frame[f"{mode}_ratio_min"] <= frame[f"{mode}_ratio_max"]).all()
        assert (frame[f"amlp_{mode}_runs"] > 0).all()
    assert (frame["max_abs_diff"] < 1e-5).all()  # the same function on the same numbers
    assert set(frame["out_shape"]) == {"1x2x8x4", "1x2x16x4"}
    assert (frame["level"] == "op").all()
    # CPU peak memory: both sides measured in this process, the same way, and the header says how
    if cpu_peak_supported():
        for col in ("amlp_fwd_peak_bytes", "peer_fwd_peak_bytes", "amlp_fwdbwd_peak_bytes", "peer_fwdbwd_peak_bytes"):
            assert (frame[col] >= 0).all(), col
        assert "forked_peak_bytes" in header["memory_method"]
    else:
        assert frame["amlp_fwd_peak_bytes"].isna().all() and "not measured" in header["memory_method"]
    data = json.loads((tmp_path / "peers.json").read_text())
    assert set(data) == {"header", "rows"} and set(data["rows"][0]) == set(PEERS_COLUMNS)
    md = (tmp_path / "peers.md").read_text()
    assert md.startswith("**peers**") and "load average" in md and "1 threads" in md
    assert "`amlp bench peers" in md  # the command line (under CliRunner: the default, sys.argv is pytest's)
    assert "| softmax | op | 8 |" in md and "| softmax | op | 16 |" in md
    assert "scaled_dot_product_attention" in md


def test_ratio_is_peer_over_amlp_and_rounds_alternate():
    calls = []

    def a():
        calls.append("a")

    def b():
        calls.append("b")

    t = _time_interleaved(a, b, min_run_time=0.004, rounds=3, threads=1)
    # rounds a b | b a | a b: runs of the same call merge at the round borders
    order = [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]
    assert order == ["a", "b", "a", "b"]  # without alternation: a b a b a b
    assert t["ratio"] == pytest.approx(t["b"] / t["a"]) and t["ratio_min"] <= t["ratio_max"]


# -- each installed peer: both sides on the same input ----------------------------------------------

#: pairs that compute the same function (on the shared parameters) and must agree to rounding
EXACT = {"softmax", "local", "linformer"}


@pytest.mark.parametrize("pair", ["softmax", "performer", "local", "nystrom", "linformer"])
@pytest.mark.parametrize("length", [12, 17])
def test_installed_peer_gives_the_shape_of_amlp_on_the_same_input(pair, length):
    if SPECS[pair].module != "torch":
        pytest.importorskip(SPECS[pair].module)
    settings = PeersSettings(pairs=[pair], lengths=[length], **TINY)
    a, b = pair_outputs(pair, settings, length)
    assert a.shape == b.shape
    expected = (1, 2, length, 4) if SPECS[pair].level == "op" else (1, length, 8)
    assert tuple(a.shape) == expected
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    if pair in EXACT:  # T = 17 is not a multiple of the local window's blocks: padding must stay out
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    elif pair == "nystrom" and length % TINY["landmarks"] == 0:  # small differences of its own (see the notes
        # column); the peer pads T to a multiple of c with unmasked zeros, so only then
        assert float((a - b).abs().max()) < 0.1 * float(a.abs().max()) + 1e-3


def test_performer_pair_differs_only_by_the_peers_epsilon(monkeypatch):
    """With the peer's eps (added to every feature) set to 0, the two Performers agree: the features
    are shared and the kernels are the same."""
    pp = pytest.importorskip("performer_pytorch.performer_pytorch")
    from functools import partial

    monkeypatch.setattr(pp, "softmax_kernel", partial(pp.softmax_kernel, eps=0.0))
    settings = PeersSettings(pairs=["performer"], **{**TINY, "heads": 2, "head_dim": 8, "features": 16})
    a, b = pair_outputs("performer", settings, 20)
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_installed_pairs_run_in_a_quick_sweep():
    installed = [p for p in ("performer", "local", "nystrom", "linformer")
                 if __import__("importlib").util.find_spec(SPECS[p].module) is not None]
    if not installed:
        pytest.skip("no peer package installed (pip install amlp[peers])")
    result = run_peers(PeersSettings(pairs=installed, lengths=[16], **TINY))
    for row in result.rows:
        assert row["status"] == "ok", row
        assert row["fwdbwd_ratio"] > 0 and row["hyper"] and row["notes"]
        assert row["peer_version"] not in ("", None)


# -- the released AMLP code -----------------------------------------------------------------------------

def test_released_pairs_say_how_to_measure_them_without_the_option():
    result = run_peers(PeersSettings(pairs=list(RELEASED_PAIRS), lengths=[8], **TINY))
    assert [r["status"] for r in result.rows] == ["not measured", "not measured"]
    assert all("pass --released-amlp" in r["message"] for r in result.rows)


def test_released_amlp_nonexistent_path_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nowhere" / "amlp.py")
    with pytest.raises(ValueError, match="does not exist"):
        PeersSettings(released_amlp=missing).validate()
    with pytest.raises(ValueError, match="folder without amlp.py"):
        load_released_amlp(str(tmp_path))
    res = CliRunner().invoke(app, QUICK_CLI + ["--released-amlp", missing, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "does not exist" in res.output and "Shark-NLP/AttentiveMLP" in res.output
    assert "Traceback" not in res.output


# A stand-in for a checkout of the released code, written for this test: the same file layout
# (amlp.py importing its sibling multihead_attention.py, which imports abstract_attention, absent
# from the checkout), a fairseq import, and the same class interface (constructor keywords, parameter
# names, _apply_attention on [B*H, T, D]); the computation is a simple one of its own.
FAKE_MHA = '''
import torch
from torch import nn
from abstract_attention import AbstractAttention


class MultiheadAttention(AbstractAttention):
    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.head_dim = embed_dim // num_heads
        self.q_proj, self.k_proj = nn.Linear(embed_dim, embed_dim), nn.Linear(embed_dim, embed_dim)
        self.v_proj, self.out_proj = nn.Linear(embed_dim, embed_dim), nn.Linear(embed_dim, embed_dim)
'''

FAKE_AMLP = '''
import torch
import torch.nn.functional as F
from torch import nn
from fairseq.incremental_decoding_utils import with_incremental_state
from fairseq.modules.quant_noise import quant_noise
from fairseq import utils

from multihead_attention import MultiheadAttention


def _pool(landmarks, q, k, v, heads):
    bh, t, d = q.shape
    lm = landmarks.repeat(bh // heads, 1, 1)  # [B*H, c, D]
    values = utils.softmax(lm @ k.transpose(1, 2), dim=-1) @ v
    return F.softmax(q @ lm.transpose(1, 2), dim=-1) @ values


@with_incremental_state
class AMLPCov(MultiheadAttention):
    def __init__(self, ffn_dimension=16, *args, **kwargs):
        super().__init__(*args, **kwargs)
        h, d = self.num_heads, self.head_dim
        self.q_landmarks = nn.Parameter(torch.randn(h, ffn_dimension, d))
        self.k_landmarks = nn.Parameter(torch.randn(h, ffn_dimension, d))
        self.qq_temperature, self.kk_temperature, self.kv_temperature = (
            nn.Parameter(torch.ones(h, 1, 1)) for _ in range(3))
        self.out_norm = nn.LayerNorm(d)

    def _apply_attention(self, q, k, v, bsz, attn_mask=None, query_padding_mask=None, key_padding_mask=None,
                         incremental_state=None):
        out = _pool(self.q_landmarks + self.k_landmarks, q, k, v, self.num_heads)
        return self.out_norm(out), None


class AMLPQuery(MultiheadAttention):
    def __init__(self, *args, ffn_dimension=16, **kwargs):
        super().__init__(*args, **kwargs)
        h, d = self.num_heads, self.head_dim
        self.q_approx = nn.Parameter(torch.randn(h, ffn_dimension, d))
        self.k_approx = nn.Parameter(torch.randn(h, ffn_dimension, d))
        self.approx_out_proj = quant_noise(nn.Linear(2 * d, d), 0.0, 8)
        self.out_norm = nn.LayerNorm(d)

    def _apply_attention(self, q, k, v, bsz, attn_mask=None, query_padding_mask=None, key_padding_mask=None,
                         incremental_state=None):
        lm = self.approx_out_proj(torch.cat([self.q_approx, self.k_approx], -1))
        return self.out_norm(_pool(lm, q, k, v, self.num_heads)), None
'''


@pytest.fixture
def fake_checkout(tmp_path):
    folder = tmp_path / "AttentiveMLP"
    folder.mkdir()
    (folder / "multihead_attention.py").write_text(textwrap.dedent(FAKE_MHA))
    (folder / "amlp.py").write_text(textwrap.dedent(FAKE_AMLP))
    return folder


def test_released_code_is_imported_with_stubs_and_measured(fake_checkout, tmp_path):
    before = {n for n in ("fairseq", "abstract_attention", "multihead_attention") if n in sys.modules}
    settings = PeersSettings(pairs=list(RELEASED_PAIRS), lengths=[8], released_amlp=str(fake_checkout / "amlp.py"),
                             **TINY)
    result = run_peers(settings)
    for row in result.rows:
        assert row["status"] == "ok", row
        assert row["out_shape"] == "1x2x8x4" and row["level"] == "op+head-norm"
        assert row["amlp_fwdbwd_s"] > 0 and row["peer_fwdbwd_s"] > 0 and row["fwdbwd_ratio"] > 0
        assert "form='official'" in row["amlp"] and row["max_abs_diff"] is not None
    used = result.header["released_stubs_used"]
    assert "abstract_attention" in used and "fairseq.incremental_decoding_utils" in used
    assert "fairseq.utils" in used
    assert "stub" in result.header["released_import"]
    # nothing of the stubs or of the checkout stays importable afterwards
    for name in ("fairseq", "fairseq.utils", "abstract_attention", "multihead_attention"):
        assert name not in sys.modules or name in before, name
    # a folder works too, and the markdown names the stubs
    module, _ = load_released_amlp(str(fake_checkout))
    assert hasattr(module, "AMLPCov")
    save_peers(result, str(tmp_path / "out"))
    assert "stubs for: " in (tmp_path / "out" / "peers.md").read_text()


def test_released_code_that_fails_to_import_is_a_clear_error(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "amlp.py").write_text("from fairseq.models import register_model\n")
    with pytest.raises(ValueError, match="could not be imported.*fairseq.models.*stubbed: fairseq"):
        load_released_amlp(str(folder / "amlp.py"))
    assert "fairseq" not in sys.modules or sys.modules["fairseq"].__file__


# -- settings ---------------------------------------------------------------------------------------------

def test_settings_are_validated(tmp_path):
    with pytest.raises(ValueError, match="unknown pair"):
        PeersSettings(pairs=["softmax", "flash"]).validate()
    with pytest.raises(ValueError, match="wsize"):
        PeersSettings(wsize=0).validate()
    with pytest.raises(ValueError, match="dtype"):
        PeersSettings(dtype="float8").validate()
    res = CliRunner().invoke(app, ["bench", "peers", "--pairs", "flash", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown pair(s) 'flash'" in res.output
    assert set(PAIRS) == set(SPECS)


def test_markdown_of_saved_results(tmp_path):
    header = {"command": "amlp bench peers --threads 1", "cpu_model": "cpu", "cpu_count": 2, "torch": "x",
              "torch_threads": 1, "load_average_1m": 2.5, "timestamp_utc": "t", "timing_method": "tm",
              "memory_method": "mm", "settings": {"dtype": "float32", "batch": 1, "heads": 8, "head_dim": 64,
                                                  "rounds": 3}}
    row = {c: None for c in PEERS_COLUMNS}
    row.update(pair="local", level="op", length=256, status="ok", amlp_fwd_s=0.002, peer_fwd_s=0.004,
               fwd_ratio=2.0, fwd_ratio_min=1.9, fwd_ratio_max=2.1, amlp_fwdbwd_s=0.01, peer_fwdbwd_s=0.015,
               fwdbwd_ratio=1.5, fwdbwd_ratio_min=1.4, fwdbwd_ratio_max=1.6, max_abs_diff=2e-7,
               hyper="wsize 15", notes="same function", peer="local_attention.LocalAttention",
               package="local-attention", peer_version="1.11.2", amlp="amlp local")
    missing = {c: None for c in PEERS_COLUMNS}
    missing.update(pair="nystrom", level="layer", status="not installed",
                   message="not installed: pip install nystrom-attention (or pip install amlp[peers])")
    md = peers_markdown({"header": header, "rows": [row, missing]})
    assert "`amlp bench peers --threads 1`" in md and "load average 2.5" in md and "1 threads" in md
    assert "| local | op | 256 | 2.00 ms | 4.00 ms | 2.00x [1.90, 2.10] | 10.00 ms | 15.00 ms | 1.50x [1.40, 1.60] " \
           "| 2.0e-07 | ok |" in md
    assert "| nystrom | layer | - |" in md and "pip install nystrom-attention" in md
    assert "local-attention (1.11.2)" in md and "wsize 15" in md
    (tmp_path / "peers.json").write_text(json.dumps({"header": header, "rows": [row]}))
    from amlp.bench.markdown import report_markdown

    assert "**peers**" in report_markdown(str(tmp_path))
