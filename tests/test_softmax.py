"""Softmax attention, op and layer, against computations written here from scratch (no helper of
the package: the causal mask, the padding and the projections are spelled out in each test)."""

import math

import pytest
import torch

import amlp
from amlp.ops.softmax import causal_mask, softmax_attention, softmax_attention_reference

F64 = torch.float64


def by_hand(q, k, v, q_mask=None, kv_mask=None, causal=False):
    """One batch row, head and query at a time: the softmax over the keys the query may see."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                if q_mask is not None and not q_mask[b, i]:
                    continue
                seen = [j for j in range(Tk) if (kv_mask is None or kv_mask[b, j])
                        and (not causal or j <= i + (Tk - Tq))]
                if not seen:
                    continue
                logits = torch.stack([q[b, i, h] @ k[b, j, h] for j in seen]) / math.sqrt(D)
                weights = torch.softmax(logits, 0)
                out[b, i, h] = sum(w * v[b, j, h] for w, j in zip(weights, seen))
    return out


def test_causal_mask_is_end_aligned():
    assert causal_mask(3, 3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert causal_mask(1, 3).tolist() == [[True, True, True]]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tq,tk", [(6, 6), (3, 7)])
def test_op_and_reference_equal_the_computation_by_hand(causal, tq, tk):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, t, 2, 4, generator=g, dtype=F64) for t in (tq, tk, tk))
    q_mask = torch.ones(2, tq, dtype=torch.bool)
    q_mask[1, -1] = False
    kv_mask = torch.ones(2, tk, dtype=torch.bool)
    kv_mask[0, 1] = False  # a hole in the middle, and a one-sided mask
    for qm, km in ((None, None), (q_mask, None), (None, kv_mask), (q_mask, kv_mask)):
        expect = by_hand(q, k, v, qm, km, causal)
        torch.testing.assert_close(softmax_attention(q, k, v, q_mask=qm, kv_mask=km, causal=causal), expect)
        torch.testing.assert_close(softmax_attention_reference(q, k, v, q_mask=qm, kv_mask=km, causal=causal), expect)


@pytest.mark.parametrize("fn", [softmax_attention, softmax_attention_reference])
def test_rows_whose_keys_are_all_padding_are_zero(fn):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 5, 2, 4, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    kv_mask = torch.ones(2, 5, dtype=torch.bool)
    kv_mask[0] = False
    out = fn(q, k, v, kv_mask=kv_mask)
    assert out[0].abs().max() == 0 and torch.isfinite(out).all()
    assert out[1].abs().max() > 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    # causal with the first keys padded: the first query has no key to see
    kv_mask = torch.ones(2, 5, dtype=torch.bool)
    kv_mask[:, 0] = False
    out = fn(q, k, v, kv_mask=kv_mask, causal=True)
    assert out[:, 0].abs().max() == 0 and torch.isfinite(out).all()


@pytest.mark.parametrize("causal", [False, True])
def test_layer_equals_projections_and_attention_by_hand(causal):
    torch.manual_seed(0)
    E, H = 12, 3
    m = amlp.build_mixer("softmax", dim=E, heads=H, causal=causal).double().eval()
    with torch.no_grad():
        for lin in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
            lin.bias.normal_()
    x = torch.randn(2, 6, E, dtype=F64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False

    def proj(lin, t):
        return (t @ lin.weight.T + lin.bias).reshape(2, 6, H, E // H)

    heads = by_hand(proj(m.q_proj, x), proj(m.k_proj, x), proj(m.v_proj, x), mask, mask, causal)
    expect = heads.reshape(2, 6, E) @ m.out_proj.weight.T + m.out_proj.bias
    torch.testing.assert_close(m(x, x_mask=mask), expect)
    torch.testing.assert_close(m.reference(x, x_mask=mask), expect)


def test_masked_op_compiles_to_one_graph_and_matches_eager():
    """No data-dependent branch under torch.compile: the whole masked op is one graph, with padded
    queries, a row whose keys are all padding and a causal mask, equal to the eager op."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 5, 2, 4, generator=g) for _ in range(3))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    kv_mask = mask.clone()
    kv_mask[2] = False
    compiled = torch.compile(softmax_attention, fullgraph=True, backend="eager")
    for causal in (False, True):
        out = compiled(q, k, v, q_mask=mask, kv_mask=kv_mask, causal=causal)
        assert torch.allclose(out, softmax_attention(q, k, v, q_mask=mask, kv_mask=kv_mask, causal=causal), atol=1e-6)
        assert out[2].abs().max() == 0 and out[1, 3:].abs().max() == 0
