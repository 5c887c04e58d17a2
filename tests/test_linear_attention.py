"""Linear attention (elu + 1 kernel): fast op vs plain reference, padding, causality, cross, recurrent step."""

import pytest
import torch
import torch.nn.functional as F

import amlp
from amlp.ops.linear_attention import DEFAULT_EPS, elu_feature_map, linear_attention, linear_attention_reference

F64 = torch.float64


def _inputs(B=2, Tq=7, Tk=9, H=3, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, T, H, D, generator=g, dtype=F64).requires_grad_() for T in (Tq, Tk, Tk))


def _masks(B, Tq, Tk):
    q_mask = torch.ones(B, Tq, dtype=torch.bool)
    kv_mask = torch.ones(B, Tk, dtype=torch.bool)
    q_mask[0, -2:] = False
    q_mask[1, 0] = False
    kv_mask[0, -3:] = False
    kv_mask[0, 1] = False  # a hole in the middle
    kv_mask[1, :2] = False  # left padding: the first causal queries of row 1 see no real key
    return q_mask, kv_mask


def _grads(out, inputs, probe):
    return torch.autograd.grad((out * probe).sum(), inputs)


@pytest.mark.parametrize("causal, chunk", [(False, 64), (True, 64), (True, 3), (True, 4)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("lengths", [(7, 9), (9, 9), (5, 13)])
def test_fast_equals_reference_outputs_and_gradients(causal, chunk, masked, lengths):
    Tq, Tk = lengths
    q, k, v = _inputs(2, Tq, Tk, 3, 5)
    q_mask, kv_mask = _masks(2, Tq, Tk) if masked else (None, None)
    kw = dict(q_mask=q_mask, kv_mask=kv_mask, causal=causal)
    fast = linear_attention(q, k, v, chunk=chunk, **kw)
    ref = linear_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    probe = torch.randn_like(fast)
    for a, b in zip(_grads(fast, (q, k, v), probe), _grads(ref, (q, k, v), probe)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_cross_with_more_queries_than_keys():
    q, k, v = _inputs(2, 11, 4, 2, 3)
    q_mask, kv_mask = _masks(2, 11, 4)
    kv_mask[0] = True
    fast = linear_attention(q, k, v, q_mask=q_mask, kv_mask=kv_mask)
    ref = linear_attention_reference(q, k, v, q_mask=q_mask, kv_mask=kv_mask)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)


def test_matches_the_equation_on_a_small_example():
    # out_i = phi(q_i)^T S / phi(q_i)^T z with S = sum_j phi(k_j) v_j^T, z = sum_j phi(k_j)
    q = torch.tensor([[0.5, -1.0]], dtype=F64)
    k = torch.tensor([[1.0, 0.0], [-2.0, 0.3]], dtype=F64)
    v = torch.tensor([[1.0, 2.0], [-1.0, 4.0]], dtype=F64)
    phi = lambda x: torch.where(x > 0, x + 1, torch.exp(x))  # noqa: E731
    S = sum(torch.outer(phi(k[j]), v[j]) for j in range(2))
    z = phi(k).sum(0)
    expected = (phi(q[0]) @ S) / (phi(q[0]) @ z)
    out = linear_attention(q.view(1, 1, 1, 2), k.view(1, 2, 1, 2), v.view(1, 2, 1, 2))
    torch.testing.assert_close(out[0, 0, 0], expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(elu_feature_map(k), phi(k))
    # causal: the first query (end-aligned to the second key) sees both keys; a query at key 0 sees one
    causal = linear_attention(torch.cat([q, q]).view(1, 2, 1, 2), k.view(1, 2, 1, 2), v.view(1, 2, 1, 2),
                              causal=True)
    torch.testing.assert_close(causal[0, 0, 0], v[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(causal[0, 1, 0], expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_is_selected_out_even_when_it_holds_nan(causal):
    q, k, v = _inputs(2, 8, 8, 2, 4)
    q_mask, kv_mask = _masks(2, 8, 8)
    clean = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    bad = [t.detach().clone() for t in (q, k, v)]
    bad[0][~q_mask] = float("nan")
    bad[1][~kv_mask] = float("inf")
    bad[2][~kv_mask] = float("nan")
    bad = [t.requires_grad_() for t in bad]
    y_clean = linear_attention(*clean, q_mask=q_mask, kv_mask=kv_mask, causal=causal, chunk=3)
    y_bad = linear_attention(*bad, q_mask=q_mask, kv_mask=kv_mask, causal=causal, chunk=3)
    assert torch.isfinite(y_bad).all()
    assert (y_bad[~q_mask] == 0).all()
    torch.testing.assert_close(y_bad, y_clean, rtol=0, atol=0)
    probe = torch.randn_like(y_clean)
    g_clean, g_bad = _grads(y_clean, clean, probe), _grads(y_bad, bad, probe)
    for a, b, mask in zip(g_clean, g_bad, (q_mask, kv_mask, kv_mask)):
        assert torch.isfinite(b).all() and (b[~mask] == 0).all()
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_queries_without_a_real_key_are_zero_and_finite():
    q, k, v = _inputs(2, 5, 6, 2, 4)
    kv_mask = torch.ones(2, 6, dtype=torch.bool)
    kv_mask[1] = False
    q_mask = torch.ones(2, 5, dtype=torch.bool)
    q_mask[0, 3:] = False
    for causal in (False, True):
        out = linear_attention(q, k, v, q_mask=q_mask, kv_mask=kv_mask, causal=causal)
        assert torch.isfinite(out).all()
        assert (out[1] == 0).all() and (out[0, 3:] == 0).all()
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)
    # causal with left-padded keys: queries before the first real key see nothing
    kv_mask = torch.tensor([[False, False, False, True, True, True]] * 2)
    out = linear_attention(q[:, :5], k, v, kv_mask=kv_mask, causal=True)  # query i sits at key i + 1
    assert (out[:, :2] == 0).all() and (out[:, 2:] != 0).any(-1).all()


def test_causal_output_ignores_later_tokens():
    q, k, v = (t.detach() for t in _inputs(2, 10, 10, 2, 4))
    out = linear_attention(q, k, v, causal=True, chunk=4)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, 6:] = torch.randn_like(t[:, 6:])
    out2 = linear_attention(q2, k2, v2, causal=True, chunk=4)
    torch.testing.assert_close(out[:, :6], out2[:, :6], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(out[:, 6:], out2[:, 6:])


def test_last_causal_query_equals_the_non_causal_output():
    q, k, v = (t.detach() for t in _inputs(2, 4, 9, 2, 3))
    causal = linear_attention(q, k, v, causal=True, chunk=2)
    full = linear_attention(q, k, v)
    torch.testing.assert_close(causal[:, -1], full[:, -1], rtol=1e-12, atol=1e-14)


def test_denominator_floor():
    # the floor changes nothing for ordinary inputs, and keeps vanishing features finite
    q, k, v = (t.detach() for t in _inputs(1, 6, 6, 2, 4))
    torch.testing.assert_close(linear_attention(q, k, v, eps=1e-30), linear_attention(q, k, v), rtol=1e-14, atol=0)
    tiny_q = torch.full_like(q, -40.0).requires_grad_()  # phi(q) = exp(-40) ~ 4e-18 in every component
    out = linear_attention(tiny_q, k, v)
    phi_k = elu_feature_map(k)
    num = torch.einsum("bthd,bhde->bthe", elu_feature_map(tiny_q), torch.einsum("bthd,bthe->bhde", phi_k, v))
    torch.testing.assert_close(out, num / DEFAULT_EPS)  # den ~ 1e-16 < eps: the floor applies
    g, = torch.autograd.grad(out.sum(), tiny_q)
    assert torch.isfinite(g).all()
    for causal in (False, True):  # large inputs in float32
        big = [20 * t.float() for t in (q, k, v)]
        assert torch.isfinite(linear_attention(*big, causal=causal)).all()
        assert torch.isfinite(linear_attention(*[-big[0], -big[1], big[2]], causal=causal)).all()


def test_half_precision_computes_in_float32_and_returns_the_input_dtype():
    q, k, v = (t.detach() for t in _inputs(1, 9, 9, 2, 8))
    for causal in (False, True):
        out = linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=causal)
        assert out.dtype == torch.bfloat16
        ref = linear_attention(q.bfloat16().double(), k.bfloat16().double(), v.bfloat16().double(), causal=causal)
        torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)


def test_bad_arguments_raise():
    q, k, v = _inputs(1, 4, 4, 2, 4)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        linear_attention(q, k[:, :2], v[:, :2], causal=True)
    with pytest.raises(ValueError, match="chunk"):
        linear_attention(q, k, v, causal=True, chunk=0)
    for eps in (0.0, -1.0, True):
        with pytest.raises(ValueError, match="eps"):
            linear_attention(q, k, v, eps=eps)
        with pytest.raises(ValueError, match="eps"):
            amlp.build_mixer("linear", dim=8, heads=2, eps=eps)
    with pytest.raises(ValueError, match="kv_mask"):
        linear_attention(q, k, v, kv_mask=torch.ones(1, 3, dtype=torch.bool))


# --- the layer -----------------------------------------------------------------------------------
def test_registered_with_its_capabilities():
    info = amlp.layers.get_mixer_info("linear")
    assert info.cls is amlp.layers.LinearAttention
    caps = info.capabilities
    assert caps.causal and caps.noncausal and caps.cross and caps.padding and caps.recurrent
    assert caps.max_length is None


def test_step_equals_the_causal_forward_and_the_op():
    torch.manual_seed(3)
    m = amlp.build_mixer("linear", dim=12, heads=2, causal=True).double().eval()
    x = torch.randn(2, 11, 12, dtype=F64)
    full = m(x)
    state = m.init_state(2, dtype=F64)
    outs = []
    for t in range(x.shape[1]):
        y, state = m.step(x[:, t], state)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-10, atol=1e-12)
    assert state["kv"].shape == (2, 2, 6, 6) and state["z"].shape == (2, 2, 6)
    assert m.state_size(11) == 2 * (6 * 6 + 6)
    # the state is the prefix sums of the equations
    k = m.split_heads(m.k_proj(x))
    v = m.split_heads(m.v_proj(x))
    phi_k = F.elu(k) + 1
    torch.testing.assert_close(state["kv"], torch.einsum("bthd,bthe->bhde", phi_k, v))
    torch.testing.assert_close(state["z"], phi_k.sum(1))


@pytest.mark.parametrize("causal", [False, True])
def test_cross_layer_with_padding_equals_reference(causal):
    torch.manual_seed(1)
    m = amlp.build_mixer("linear", dim=12, heads=3, cross=True, causal=causal).double().eval()
    x = torch.randn(2, 5, 12, dtype=F64, requires_grad=True)
    ctx = torch.randn(2, 8, 12, dtype=F64, requires_grad=True)
    x_mask, ctx_mask = _masks(2, 5, 8)
    y = m(x, ctx, x_mask=x_mask, context_mask=ctx_mask)
    ref = m.reference(x, ctx, x_mask=x_mask, context_mask=ctx_mask)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    probe = torch.randn_like(y)
    for a, b in zip(_grads(y, (x, ctx), probe), _grads(ref, (x, ctx), probe)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    if not causal:  # a projected context mixes the same numbers
        projected = m.project_context(ctx, ctx_mask)
        torch.testing.assert_close(m.mix_projected(x, projected, x_mask), y, rtol=1e-12, atol=1e-14)


def test_noncausal_layer_has_no_step():
    m = amlp.build_mixer("linear", dim=8, heads=2)
    with pytest.raises(ValueError, match="causal"):
        m.init_state(2)
