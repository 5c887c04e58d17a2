"""form="official": the released code's computation (``Shark-NLP/AttentiveMLP``, ``amlp.py``), its
initialisation and options.

The reference below is written from the released ``amlp.py``, read line by line, batched over (batch,
head) the way the released layer is: padded rows are zero-filled before the statistics, feature columns
are L2-normalised over the sequence axis, and so on. It shares no code with :mod:`amlp.ops.amlp`.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from amlp.layers import AMLP

F64 = torch.float64


def released_reference(m: AMLP, x, context=None, x_mask=None, context_mask=None):
    """The official AMLP layer, from its parameters, at every query position (padded ones included)."""
    B, Tq, E = x.shape
    H, D = m.heads, m.head_dim
    src = x if context is None else context
    kv_mask = x_mask if context is None else context_mask

    def heads(t):  # [B, T, E] -> [B, H, T, D]
        return t.view(t.shape[0], t.shape[1], H, D).transpose(1, 2)

    q, k, v = heads(m.q_proj(x)), heads(m.k_proj(src)), heads(m.v_proj(src))
    if m.add_norm:  # row 12
        q, k, v = m.q_norm(q), m.k_norm(k), m.v_norm(v)
    if m.ema is not None:  # row 11 (the buffer as it is after this call's update)
        q = q - m.ema_mean
    pad_q = None if x_mask is None else ~x_mask[:, None, :, None]
    pad_k = None if kv_mask is None else ~kv_mask[:, None, :, None]

    def fill(t, pad):
        return t if pad is None else t.masked_fill(pad, 0.0)

    def w_norm(mu):
        return F.layer_norm(mu, (D,), m.l_norm.weight, m.l_norm.bias) if m.add_norm else mu

    act = {"softmax": lambda z: torch.softmax(z, -1), "relu": F.relu, "sigmoid": torch.sigmoid,
           "identity": lambda z: z}[m.activation]
    if m.variant == "cov":
        tq, tk, tkv = (m.temperature[:, i].view(1, H, 1, 1) for i in range(3))
        mus = []
        for t, pad, landmark, temp in ((q, pad_q, m.cq, tq), (k, pad_k, m.ck, tk)):
            t = F.normalize(fill(t, pad), 2, 2)  # rows 1-2: columns normalised over the sequence
            prob = torch.softmax(t.transpose(2, 3) @ t * temp, -1)  # row 3
            mus.append(torch.einsum("bhdk,hcd->bhck", prob, landmark))
        weight_qk = F.relu(w_norm(mus[0] + mus[1])).transpose(-1, -2)  # row 4: [B, H, D, c]
        kn, vn = F.normalize(fill(k, pad_k), 2, 2), F.normalize(fill(v, pad_k), 2, 2)
        prob = torch.softmax(torch.einsum("bhnk,bhnl->bhkl", kn, vn) * tkv, -1)
        weight_kv = (prob @ weight_qk).transpose(-1, -2)  # row 5: (sigma_2(K^T V) L)^T
        scale = D ** -0.5 if m.scale is None else m.scale  # row 6 (the released Cov has no switch)
        out = act(q @ weight_qk * scale) @ weight_kv
    else:
        mus = []
        for t, pad, landmark in ((q, pad_q, m.cq), (k, pad_k, m.ck)):
            logits = torch.einsum("bhnd,hcd->bhcn", t, landmark)  # row 9: unscaled
            if pad is not None:
                logits = logits.masked_fill(pad.transpose(-1, -2), float("-inf"))
            mus.append(torch.einsum("bhcn,bhnd->bhcd", torch.softmax(logits, -1), t))
        w = m.w if m.w.dim() == 2 else m.w.unsqueeze(0)
        mu = w_norm(torch.cat(mus, -1) @ w + (m.w_bias if m.w_bias.dim() == 1 else m.w_bias[:, None]))  # row 8
        weight_qk = mu.transpose(-1, -2)
        logits = k @ weight_qk  # [B, H, Tk, c]
        if pad_k is not None:
            logits = logits.masked_fill(pad_k, float("-inf"))
        weight_kv = torch.softmax(logits.transpose(-1, -2), -1) @ v
        scale = 1.0 if m.scale is None else m.scale
        out = act(q @ weight_qk * scale) @ weight_kv
    if m.conv is not None:  # row 10
        out = out + F.relu(m.conv(fill(q, pad_q)))
    out = m.out_norm(out)  # row 7
    return m.out_proj(out.transpose(1, 2).reshape(B, Tq, E))


def padded_inputs(seed=0, Tq=11, Tk=7, E=24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, Tq, E, generator=g, dtype=F64)
    ctx = torch.randn(2, Tk, E, generator=g, dtype=F64)
    x_mask = torch.ones(2, Tq, dtype=torch.bool)
    x_mask[1, 8:] = False
    ctx_mask = torch.ones(2, Tk, dtype=torch.bool)
    ctx_mask[0, 5:] = False
    return x, ctx, x_mask, ctx_mask


def scramble(m):
    """Give every parameter a non-trivial value (LayerNorms included), so no option hides."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif name.endswith("bias"):  # norms' and projections' (padded tokens then project to nonzero q, k, v)
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if m.ema is not None:
            m.ema_mean.copy_(0.3 * torch.randn(m.ema_mean.shape, generator=g, dtype=m.ema_mean.dtype))
    return m


OPTIONS = [{}, {"activation": "relu"}, {"activation": "sigmoid", "landmarks": 5}, {"add_norm": True},
           {"conv_kernel_size": 3}, {"ema": 0.99}, {"add_norm": True, "ema": 0.9, "conv_kernel_size": 5},
           {"scale": 0.125}]


@pytest.mark.parametrize("variant", ["cov", "pquery"])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("cross", [False, True])
def test_official_layer_equals_the_released_computation(variant, options, cross):
    torch.manual_seed(0)
    m = scramble(AMLP(24, 3, variant=variant, form="official", cross=cross, **options).double().eval())
    x, ctx, x_mask, ctx_mask = padded_inputs()
    args = dict(context=ctx, x_mask=x_mask, context_mask=ctx_mask) if cross else dict(x_mask=x_mask)
    ours = m(x, **args)
    expect = released_reference(m, x, **args)
    real = x_mask
    torch.testing.assert_close(ours[real], expect[real], rtol=1e-10, atol=1e-10)
    # the parameter gradients agree too (at the real positions)
    grad = torch.randn_like(ours)
    params = [p for p in m.parameters()]
    g_ours = torch.autograd.grad(ours[real], params, grad[real], allow_unused=True)
    g_ref = torch.autograd.grad(released_reference(m, x, **args)[real], params, grad[real], allow_unused=True)
    for (name, _), a, b in zip(m.named_parameters(), g_ours, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)


def test_official_cov_differs_from_the_printed_value_map():
    """Row 5: the value map enters transposed; with a non-symmetric sigma_2(K^T V) that changes the output."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 24, dtype=F64)
    official = AMLP(24, 3, variant="cov", form="official").double().eval()
    stable = AMLP(24, 3, variant="cov", form="stable").double().eval()
    stable.load_state_dict(official.state_dict())
    assert not torch.allclose(official(x), stable(x), atol=1e-4)


def test_official_initialisation_matches_the_released_code():
    torch.manual_seed(0)
    m = AMLP(512, 8, variant="pquery", form="official", landmarks=16)
    D = 64
    expected = 1.0 / math.sqrt(D * (16 + 8))  # xavier-normal, gain 2**-0.5, on [H, c, D]: about 0.026
    for landmarks in (m.cq, m.ck):
        assert abs(landmarks.std().item() / expected - 1) < 0.05
    assert m.temperature is None  # the released PQuery has no temperatures
    bound = 1 / math.sqrt(2 * D)  # nn.Linear(2D, D)'s default for weight and bias
    assert m.w_bias.abs().max() <= bound and m.w_bias.abs().min() > 0 and m.w.abs().max() <= bound
    cov = AMLP(64, 64, variant="cov", form="official")  # many heads: 192 temperatures
    t = cov.temperature.detach()
    assert abs(t.std().item() / math.sqrt(1 / 65) - 1) < 0.25
    assert (t > 0).any() and (t < 0).any()
    assert cov.out_norm is not None and AMLP(16, 2, form="official", variant="pquery").out_norm is not None


def test_ema_buffer_is_detached_updated_in_training_only_over_real_positions():
    torch.manual_seed(0)
    m = AMLP(16, 2, variant="pquery", form="official", ema=0.9)
    x = torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    m.train()
    m(x, x_mask=mask).sum().backward()
    assert not m.ema_mean.requires_grad and m.ema_mean.grad is None
    q = m.q_proj(x).view(2, 6, 2, 8)
    torch.testing.assert_close(m.ema_mean, 0.1 * q[mask].mean(dim=(0, 1)).detach())
    # junk in padded positions does not move the buffer
    before = m.ema_mean.clone()
    junk = x.clone()
    junk[1, 4:] = 1e4
    m(junk, x_mask=mask)
    second = m.ema_mean.clone()
    m.ema_mean.copy_(before)
    m(x, x_mask=mask)
    torch.testing.assert_close(m.ema_mean, second)
    m.eval()
    frozen = m.ema_mean.clone()
    m(x)
    torch.testing.assert_close(m.ema_mean, frozen)


def test_conv_branch_ignores_padded_queries():
    """The padded queries that reach the conv are nonzero (random projection biases: the layer's
    zeroing of padded tokens alone would hide a conv without its mask), and the conv changes the
    output of the same weights without it."""
    torch.manual_seed(0)
    m = scramble(AMLP(16, 2, variant="cov", form="official", conv_kernel_size=3).double().eval())
    x = torch.randn(1, 7, 16, dtype=F64)
    mask = torch.ones(1, 7, dtype=torch.bool)
    mask[0, 5:] = False
    unmasked = m(x)  # positions 5 and 6 as real tokens: the conv at 4 reads position 5
    padded = m(x, x_mask=mask)
    assert not torch.allclose(unmasked[0, 4], padded[0, 4])
    # what the conv of a padded sequence reads is the queries of the real tokens only: the same as
    # a sequence cut at the padding
    torch.testing.assert_close(padded[0, :5], m(x[:, :5])[0], rtol=1e-10, atol=1e-12)
    without = copy.deepcopy(m)
    without.conv = None
    assert not torch.allclose(m(x[:, :5]), without(x[:, :5]))


@pytest.mark.parametrize("kwargs,message", [
    (dict(form="official", causal=True, variant="cov"), "no causal form"),
    (dict(conv_kernel_size=4), "odd"),
    (dict(conv_kernel_size=True), "odd"),
    (dict(ema=1.0), "ema"),
    (dict(ema=True), "ema"),
    (dict(scale=float("nan")), "scale"),
    (dict(conv_dropout=1.0), "conv_dropout"),
    (dict(variant="cov", causal=True, ema=0.9), "non-causal"),
])
def test_bad_official_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AMLP(16, 2, **{"form": "official", **kwargs})
