"""``amlp bench peers``: amlp's mixers side by side with the implementations a researcher would
otherwise reach for.

Each pair is one amlp mixer and one outside implementation of the same mechanism, built at the same
sizes (B, H, D; E = H D) and the same hyper-parameters, fed the same numbers, and timed forward
(under ``torch.no_grad()``) and forward + backward (``torch.autograd.grad`` of a fixed random output
gradient to the inputs and every parameter the call uses) with :func:`amlp.bench.timing.measure_time`,
both sides in this process, with the same torch threads. The two sides are timed in alternating
rounds (amlp then peer, then peer then amlp, ...), each round a ``min_run_time / rounds`` budget per
side, so that a change in the machine's load during a point reaches both; the reported time of a side
is the median of its round medians, the ratio ``peer time / amlp time`` (> 1: amlp faster) is that of
these medians, and the smallest and largest per-round ratio say how steady it was.

Pairs and the level at which they are compared (the level where both sides do the same work):

* ``softmax``: ``torch.nn.functional.scaled_dot_product_attention``, op level (``[B, H, T, D]``);
* ``performer``: ``performer_pytorch.FastAttention``, op level;
* ``local``: ``local_attention.LocalAttention``, op level;
* ``nystrom``: ``nystrom_attention.NystromAttention``, layer level (``[B, T, E]``; no per-head op);
* ``linformer``: ``linformer.LinformerSelfAttention``, layer level;
* ``amlp-cov-released`` / ``amlp-pquery-released``: the authors' ``AMLPCov`` / ``AMLPQuery``
  (``released_amlp``), op level plus the per-head LayerNorm their ``_apply_attention`` includes.

At op level the amlp side is ``mixer.mix_heads(q, k, v, None, None)`` on ``[B, T, H, D]``; each side
gets its own layout as a contiguous tensor holding the same numbers (so no side pays for the other's
transposes). At layer level both sides are whole modules (projections included) on ``[B, T, E]``.
Whatever parameters the two sides have in common are copied from the amlp module into the peer (the
projections at layer level, Linformer's E and F, the Performer's random features, the AMLP landmarks,
temperatures, ``W`` and head LayerNorm), so the two compute on the same parameters; the
``max_abs_diff`` column then says how far apart their outputs are, and the ``notes`` column whether
they should agree to rounding.

Peers are optional (``pip install amlp[peers]``): a pair whose package cannot be imported is a row
with status ``not installed`` and the pip name. The released AMLP code (``Shark-NLP/AttentiveMLP``,
``amlp.py``) is not on PyPI; pass the path of a local checkout's ``amlp.py`` as ``released_amlp`` to
measure it (see :func:`load_released_amlp` for what is stubbed to import it without fairseq).

Peak memory, after the timing of each mode: on CUDA with :func:`amlp.bench.memory.timed_peak` (one
untimed call: ``max_memory_allocated`` minus what was allocated before the call); on Linux CPUs with
:func:`amlp.bench.memory.forked_peak_bytes` (in a child forked from the benchmark, one torch thread,
glibc's mmap threshold fixed at 64 KiB, heap trimmed, the resident high-water mark reset, one call:
``VmHWM`` minus ``VmRSS`` before it; the smallest of five calls per side, the two sides
alternating). Both sides are measured the same way, in the steady state after their timing, and the
benchmark process itself keeps its allocator settings.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import statistics
import sys
import types
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import build_mixer
from .environment import invocation, machine_header, parse_dtype, resolve_device, torch_threads
from .timing import measure_time

MODES = ("fwd", "fwdbwd")
PAIRS = ("softmax", "performer", "local", "nystrom", "linformer", "amlp-cov-released", "amlp-pquery-released")
RELEASED_PAIRS = ("amlp-cov-released", "amlp-pquery-released")
PEERS_INSTALL = "pip install amlp[peers]"

#: row columns, in order (the CSV/JSON schema)
PEERS_COLUMNS = [
    "pair", "level", "amlp", "peer", "package", "peer_version", "hyper", "status", "message",
    "length", "batch", "heads", "head_dim", "dtype", "device",
    "amlp_fwd_s", "peer_fwd_s", "fwd_ratio", "fwd_ratio_min", "fwd_ratio_max",
    "amlp_fwdbwd_s", "peer_fwdbwd_s", "fwdbwd_ratio", "fwdbwd_ratio_min", "fwdbwd_ratio_max",
    "amlp_fwd_runs", "peer_fwd_runs", "amlp_fwdbwd_runs", "peer_fwdbwd_runs",
    "amlp_fwd_peak_bytes", "peer_fwd_peak_bytes", "amlp_fwdbwd_peak_bytes", "peer_fwdbwd_peak_bytes",
    "out_shape", "max_abs_diff", "notes",
]


class PairSkipped(Exception):
    """A pair that cannot be built at these settings (the message says why)."""


# -- the pairs -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairSpec:
    name: str
    amlp_mixer: str
    peer: str  # what is called on the peer side
    package: str  # pip name ("" for torch itself and the released code)
    module: str  # import name
    level: str  # "op", "layer" or "op+head-norm"
    layout: str  # what the two sides take


SPECS = {
    "softmax": PairSpec("softmax", "softmax", "torch.nn.functional.scaled_dot_product_attention", "torch", "torch",
                        "op", "amlp mix_heads on [B,T,H,D]; peer on [B,H,T,D]"),
    "performer": PairSpec("performer", "performer", "performer_pytorch.FastAttention", "performer-pytorch",
                          "performer_pytorch", "op", "amlp mix_heads on [B,T,H,D]; peer on [B,H,T,D]"),
    "local": PairSpec("local", "local", "local_attention.LocalAttention", "local-attention", "local_attention",
                      "op", "amlp mix_heads on [B,T,H,D]; peer on [B,H,T,D]"),
    "nystrom": PairSpec("nystrom", "nystrom", "nystrom_attention.NystromAttention", "nystrom-attention",
                        "nystrom_attention", "layer", "whole modules on [B,T,E] (no per-head op in the peer)"),
    "linformer": PairSpec("linformer", "linformer", "linformer.LinformerSelfAttention", "linformer", "linformer",
                          "layer", "whole modules on [B,T,E] (no per-head op in the peer)"),
    "amlp-cov-released": PairSpec("amlp-cov-released", "amlp-cov", "released amlp.AMLPCov._apply_attention", "",
                                  "amlp.py", "op+head-norm",
                                  "amlp head_output(mix_heads) on [B,T,H,D]; released _apply_attention on [B*H,T,D]"),
    "amlp-pquery-released": PairSpec("amlp-pquery-released", "amlp-pquery",
                                     "released amlp.AMLPQuery._apply_attention", "", "amlp.py", "op+head-norm",
                                     "amlp head_output(mix_heads) on [B,T,H,D]; released _apply_attention on "
                                     "[B*H,T,D]"),
}


@dataclass
class PeersSettings:
    pairs: list[str] = field(default_factory=lambda: list(PAIRS))
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096])
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    #: c: Nystromformer landmarks and the AMLP hidden width (amlp's defaults: 16)
    landmarks: int = 16
    #: local attention window (amlp's default: 15, the AMLP paper's TTS / SR / LSTF setting)
    wsize: int = 15
    #: m, the Performer's random features (amlp's default: 64)
    features: int = 64
    #: k, Linformer's projected length (amlp's default: 64)
    proj_len: int = 64
    dtype: str = "float32"
    device: str = "auto"
    min_run_time: float = 1.0
    #: alternating rounds per point and mode (amlp, peer; then peer, amlp; ...)
    rounds: int = 3
    threads: int = 1
    memory: bool = True
    #: path of the released ``amlp.py`` (a local checkout of Shark-NLP/AttentiveMLP), or None
    released_amlp: str | None = None
    seed: int = 0

    def validate(self) -> None:
        unknown = [p for p in self.pairs if p not in SPECS]
        if unknown:
            raise ValueError(f"unknown pair(s) {', '.join(map(repr, unknown))}; pairs: {', '.join(PAIRS)}")
        if not self.pairs:
            raise ValueError("no pairs to measure")
        if not self.lengths:
            raise ValueError("no lengths to measure")
        for name in ("batch", "heads", "head_dim", "landmarks", "wsize", "features", "proj_len", "rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        if not self.min_run_time > 0:
            raise ValueError(f"min_run_time must be > 0, got {self.min_run_time}")
        parse_dtype(self.dtype)
        resolve_device(self.device)
        if self.released_amlp is not None:
            released_file(self.released_amlp)


@dataclass
class PeersResult:
    header: dict
    rows: list[dict]


# -- the two sides of a pair ----------------------------------------------------------------------

@dataclass
class Side:
    """One side of a pair: ``forward()`` computes the output from ``inputs`` (leaves that require
    grad); ``targets`` are the tensors the backward pass differentiates; ``canonical`` maps the
    output to the layout both sides are compared in."""

    forward: Callable[[], torch.Tensor]
    inputs: list[torch.Tensor]
    params: list[torch.Tensor]
    grad_out: torch.Tensor
    canonical: Callable[[torch.Tensor], torch.Tensor]

    def call(self, mode: str) -> Callable[[], Any]:
        if mode == "fwd":
            def fn():
                with torch.no_grad():
                    return self.forward()
            return fn
        targets = self.inputs + self.params

        def fn():
            return torch.autograd.grad(self.forward(), targets, self.grad_out, allow_unused=True)
        return fn


@dataclass
class Built:
    amlp: Side
    peer: Side
    hyper: str
    notes: str


_PROJECTIONS = ("q_proj.", "k_proj.", "v_proj.", "out_proj.")


def _op_params(module: nn.Module) -> list[torch.Tensor]:
    """Parameters an op-level call uses: all but the q, k, v and output projections."""
    return [p for n, p in module.named_parameters() if p.requires_grad and not n.startswith(_PROJECTIONS)]


def _all_params(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


class _Inputs:
    """The numbers both sides get: q, k, v and the output gradient as ``[B, H, T, D]`` (op level) or
    x and the output gradient as ``[B, T, E]`` (layer level), drawn once from a seeded generator."""

    def __init__(self, s: PeersSettings, length: int, device: torch.device, dtype: torch.dtype):
        gen = torch.Generator(device="cpu").manual_seed(s.seed)
        B, H, T, D = s.batch, s.heads, length, s.head_dim
        self.B, self.H, self.T, self.D, self.E = B, H, T, D, H * D
        self.device, self.dtype = device, dtype

        def draw(*shape):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        self.qkv = [draw(B, H, T, D) for _ in range(3)]
        self.grad_heads = draw(B, H, T, D)
        self.x = draw(B, T, self.E)
        self.grad_tokens = draw(B, T, self.E)

    @staticmethod
    def _leaf(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().detach().clone().requires_grad_(True)

    def heads(self, layout: str) -> tuple[list[torch.Tensor], torch.Tensor, Callable]:
        """(q, k, v leaves, output gradient, output -> [B, H, T, D]) in ``layout``."""
        B, H, T, D = self.B, self.H, self.T, self.D
        if layout == "bthd":
            to, back = (lambda t: t.transpose(1, 2)), (lambda o: o.transpose(1, 2))
        elif layout == "bhtd":
            to, back = (lambda t: t), (lambda o: o)
        elif layout == "(bh)td":
            to, back = (lambda t: t.reshape(B * H, T, D)), (lambda o: o.reshape(B, H, T, D))
        else:  # pragma: no cover - programming error
            raise ValueError(layout)
        return [self._leaf(to(t)) for t in self.qkv], to(self.grad_heads).contiguous(), back

    def tokens(self) -> tuple[list[torch.Tensor], torch.Tensor, Callable]:
        return [self._leaf(self.x)], self.grad_tokens, (lambda o: o)


def _amlp_op_side(mixer: nn.Module, inp: _Inputs, *, head_norm: bool = False) -> Side:
    qkv, grad, back = inp.heads("bthd")
    if head_norm:
        def forward():
            return mixer.head_output(mixer.mix_heads(qkv[0], qkv[1], qkv[2], None, None))
    else:
        def forward():
            return mixer.mix_heads(qkv[0], qkv[1], qkv[2], None, None)
    return Side(forward, qkv, _op_params(mixer), grad, back)


def _layer_side(module: nn.Module, inp: _Inputs) -> Side:
    xs, grad, back = inp.tokens()
    return Side(lambda: module(xs[0]), xs, _all_params(module), grad, back)


def _to(module: nn.Module, inp: _Inputs) -> nn.Module:
    return module.to(device=inp.device, dtype=inp.dtype).eval()


def _build_softmax(s: PeersSettings, inp: _Inputs, peer_module) -> Built:
    mixer = _to(build_mixer("softmax", dim=inp.E, heads=inp.H), inp)
    qkv, grad, back = inp.heads("bhtd")
    peer = Side(lambda: F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]), qkv, [], grad, back)
    return Built(_amlp_op_side(mixer, inp), peer,
                 "scale 1/sqrt(D), no mask, no dropout",
                 "same function (amlp's op calls scaled_dot_product_attention itself, so the ratio is the cost "
                 "of its wrapper: layout and checks)")


def _build_performer(s: PeersSettings, inp: _Inputs, peer_module) -> Built:
    mixer = _to(build_mixer("performer", dim=inp.E, heads=inp.H, approx_attn_dim=s.features, seed=s.seed), inp)
    fast = peer_module.FastAttention(dim_heads=inp.D, nb_features=s.features, causal=False)
    with torch.no_grad():
        fast.projection_matrix.copy_(mixer.features)  # the same random features on both sides
    fast = _to(fast, inp)
    qkv, grad, back = inp.heads("bhtd")
    peer = Side(lambda: fast(qkv[0], qkv[1], qkv[2]), qkv, [], grad, back)
    return Built(_amlp_op_side(mixer, inp), peer,
                 f"m = {s.features} positive orthogonal random features (amlp approx_attn_dim, peer nb_features; "
                 f"the peer's projection_matrix is set to amlp's features), FAVOR+ softmax kernel, non-causal",
                 "differ by the peer's eps = 1e-4 added to every feature (with eps = 0 the two agree to rounding); "
                 "stabilised key features are often far below 1e-4, so the difference need not be small")


def _build_local(s: PeersSettings, inp: _Inputs, peer_module) -> Built:
    half = s.wsize // 2
    if half < 1:
        raise PairSkipped(f"wsize {s.wsize} has no neighbours; the peer needs window_size = wsize // 2 >= 1")
    mixer = _to(build_mixer("local", dim=inp.E, heads=inp.H, wsize=s.wsize), inp)
    local = _to(peer_module.LocalAttention(window_size=half, causal=False, look_backward=1, look_forward=1,
                                           exact_windowsize=True, autopad=True), inp)
    qkv, grad, back = inp.heads("bhtd")
    # autopad pads keys with zeros that are not masked; an all-true mask keeps them out
    mask = torch.ones(inp.B, inp.T, dtype=torch.bool, device=inp.device) if inp.T % half else None
    peer = Side(lambda: local(qkv[0], qkv[1], qkv[2], mask=mask), qkv, [], grad, back)
    return Built(_amlp_op_side(mixer, inp), peer,
                 f"amlp wsize = {s.wsize}: keys with |i - j| <= {half}; peer window_size = {half}, look_backward = "
                 f"look_forward = 1, exact_windowsize = True (the same {2 * half + 1} keys), autopad = True with an "
                 f"all-true mask when T is not a multiple of {half}; scale 1/sqrt(D), no rotary embedding",
                 "same function")


def _copy_projections(mixer: nn.Module, q: nn.Linear | None, k: nn.Linear | None, v: nn.Linear | None,
                      out: nn.Linear) -> None:
    with torch.no_grad():
        for src, dst in ((mixer.q_proj, q), (mixer.k_proj, k), (mixer.v_proj, v), (mixer.out_proj, out)):
            if dst is None:
                continue
            dst.weight.copy_(src.weight)
            if dst.bias is not None and src.bias is not None:
                dst.bias.copy_(src.bias)


def _build_nystrom(s: PeersSettings, inp: _Inputs, peer_module) -> Built:
    mixer = _to(build_mixer("nystrom", dim=inp.E, heads=inp.H, landmarks=s.landmarks, pinv_iterations=6), inp)
    peer_mod = peer_module.NystromAttention(dim=inp.E, dim_head=inp.D, heads=inp.H, num_landmarks=s.landmarks,
                                            pinv_iterations=6, residual=False)
    with torch.no_grad():
        peer_mod.to_qkv.weight.copy_(torch.cat([mixer.q_proj.weight, mixer.k_proj.weight, mixer.v_proj.weight]))
    _copy_projections(mixer, None, None, None, peer_mod.to_out[0])
    peer_mod = _to(peer_mod, inp)
    return Built(_layer_side(mixer, inp), _layer_side(peer_mod, inp),
                 f"c = {s.landmarks} segment-mean landmarks, 6 pseudo-inverse iterations, no convolution skip (amlp "
                 f"conv_kernel = None, peer residual = False); weights copied (peer to_qkv = amlp q, k, v weights, "
                 f"to_out = out_proj; amlp's q, k, v biases are zero and the peer has none)",
                 "close, not equal: the peer starts the pseudo-inverse from norms over the whole batch (amlp: per "
                 "batch row and head) and pads T to a multiple of c at the front with unmasked zeros")


def _build_linformer(s: PeersSettings, inp: _Inputs, peer_module) -> Built:
    mixer = _to(build_mixer("linformer", dim=inp.E, heads=inp.H, proj_len=s.proj_len, max_length=inp.T), inp)
    peer_mod = peer_module.LinformerSelfAttention(dim=inp.E, seq_len=inp.T, k=s.proj_len, heads=inp.H)
    _copy_projections(mixer, peer_mod.to_q, peer_mod.to_k, peer_mod.to_v, peer_mod.to_out)
    with torch.no_grad():
        peer_mod.proj_k.copy_(mixer.e_proj.T)
        peer_mod.proj_v.copy_(mixer.f_proj.T)
    peer_mod = _to(peer_mod, inp)
    return Built(_layer_side(mixer, inp), _layer_side(peer_mod, inp),
                 f"k = {s.proj_len} projected positions, max length n = T, E and F shared by the heads, separate "
                 f"for keys and values (peer share_kv = False, one_kv_head = False); weights copied (projections, "
                 f"E, F)",
                 "same function")


def _released_side(module: nn.Module, inp: _Inputs) -> Side:
    qkv, grad, back = inp.heads("(bh)td")
    B = inp.B
    return Side(lambda: module._apply_attention(qkv[0], qkv[1], qkv[2], B)[0], qkv, _op_params(module), grad, back)


def _share_released(mixer: nn.Module, released: nn.Module, variant: str) -> str:
    """Copy amlp's parameters into the released module; returns "" or why it could not."""
    H = mixer.heads
    try:
        with torch.no_grad():
            if variant == "cov":
                released.q_landmarks.copy_(mixer.cq)
                released.k_landmarks.copy_(mixer.ck)
                for i, name in enumerate(("qq_temperature", "kk_temperature", "kv_temperature")):
                    getattr(released, name).copy_(mixer.temperature[:, i].reshape(H, 1, 1))
            else:
                released.q_approx.copy_(mixer.cq)
                released.k_approx.copy_(mixer.ck)
                released.approx_out_proj.weight.copy_(mixer.w.T)
                released.approx_out_proj.bias.copy_(mixer.w_bias)
            released.out_norm.weight.copy_(mixer.out_norm.weight)
            released.out_norm.bias.copy_(mixer.out_norm.bias)
    except (AttributeError, RuntimeError) as exc:
        return f"parameters not shared ({type(exc).__name__}: {exc}); outputs differ by construction"
    return ""


def _build_released(variant: str):
    def build(s: PeersSettings, inp: _Inputs, released_module) -> Built:
        name = "amlp-cov" if variant == "cov" else "amlp-pquery"
        mixer = _to(build_mixer(name, dim=inp.E, heads=inp.H, landmarks=s.landmarks, form="official"), inp)
        cls = released_module.AMLPCov if variant == "cov" else released_module.AMLPQuery
        released = cls(embed_dim=inp.E, num_heads=inp.H, ffn_dimension=s.landmarks)
        problem = _share_released(mixer, released, variant)
        released = _to(released, inp)
        return Built(_amlp_op_side(mixer, inp, head_norm=True), _released_side(released, inp),
                     f"c = {s.landmarks} (released ffn_dimension), sigma_1 softmax; amlp form = 'official'; released "
                     f"class defaults otherwise (add_norm off, no conv, "
                     f"{'no temperature switch' if variant == 'cov' else 'scale off (= 1), no EMA'}); landmarks, "
                     f"temperatures / W and the head LayerNorm copied from amlp",
                     problem or "should be the same function (form='official' is the project's reading of the "
                                "released code; max_abs_diff checks it)")
    return build


BUILDERS = {
    "softmax": _build_softmax,
    "performer": _build_performer,
    "local": _build_local,
    "nystrom": _build_nystrom,
    "linformer": _build_linformer,
    "amlp-cov-released": _build_released("cov"),
    "amlp-pquery-released": _build_released("pquery"),
}


# -- optional imports ------------------------------------------------------------------------------

def import_peer(module: str):
    """Import a peer package (``ImportError`` when it is not installed). Its import-time warnings
    (deprecated torch and distutils APIs) are silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(module)


def _version(package: str) -> str:
    if package == "torch":
        return torch.__version__
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - a missing version is not an error
        return "unknown"


# -- the released AMLP code ------------------------------------------------------------------------

def released_file(path: str) -> str:
    """The released ``amlp.py`` named by ``path`` (the file, or a checkout folder holding it); a
    clear ``ValueError`` when there is none."""
    hint = ("pass the path of amlp.py in a local checkout of Shark-NLP/AttentiveMLP (github.com/Shark-NLP/"
            "AttentiveMLP)")
    if not path:
        raise ValueError(f"--released-amlp is empty; {hint}")
    if os.path.isdir(path):
        candidate = os.path.join(path, "amlp.py")
        if not os.path.isfile(candidate):
            raise ValueError(f"--released-amlp {path!r} is a folder without amlp.py; {hint}")
        path = candidate
    if not os.path.exists(path):
        raise ValueError(f"--released-amlp {path!r} does not exist; {hint}")
    if not os.path.isfile(path) or not path.endswith(".py"):
        raise ValueError(f"--released-amlp {path!r} is not a Python file; {hint}")
    return os.path.realpath(path)


def _identity_decorator(obj=None, *args, **kwargs):
    return obj


def _quant_noise(module, p=0.0, block_size=8):
    return module


class _FairseqDropout(nn.Dropout):
    def __init__(self, p, module_name=None, **kwargs):
        super().__init__(p)


class _FairseqIncrementalState:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

    def get_incremental_state(self, incremental_state, key):
        return None if incremental_state is None else incremental_state.get(key)

    def set_incremental_state(self, incremental_state, key, value):
        if incremental_state is not None:
            incremental_state[key] = value
        return incremental_state


def _fairseq_softmax(x, dim, onnx_trace=False):
    return F.softmax(x.float(), dim=dim)


def _get_activation_fn(name):
    return {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "linear": (lambda x: x),
            "sigmoid": torch.sigmoid}[name]


#: the fairseq modules that are stubbed (any other ``fairseq.*`` import fails with its own name)
FAIRSEQ_STUB_MODULES = ("fairseq", "fairseq.incremental_decoding_utils", "fairseq.modules",
                        "fairseq.modules.quant_noise", "fairseq.modules.fairseq_dropout", "fairseq.utils")

#: what the fairseq stub provides (each stubbed module offers all of these)
FAIRSEQ_STUB = {
    "with_incremental_state": _identity_decorator,  # fairseq.incremental_decoding_utils: class decorator
    "FairseqIncrementalState": _FairseqIncrementalState,
    "quant_noise": _quant_noise,  # fairseq.modules.quant_noise: returns the module unchanged (no quantisation noise)
    "FairseqDropout": _FairseqDropout,  # fairseq.modules.fairseq_dropout: plain nn.Dropout
    "softmax": _fairseq_softmax,  # fairseq.utils.softmax: float32 softmax
    "get_activation_fn": _get_activation_fn,  # fairseq.utils.get_activation_fn
}


class _AbstractAttention(nn.Module):
    """Stand-in for the ``abstract_attention.AbstractAttention`` base class (CAB's
    efficient-attention package) that the released ``multihead_attention.py`` imports: an
    ``nn.Module`` that records ``causal``, ``cross`` and a name, as the base does; no method of it is
    reached by the non-incremental calls measured here."""

    def __init__(self, cross=False, causal=False, **kwargs):
        super().__init__()
        self.name = f"{self.__class__.__name__}.{id(self)}"
        self.causal = causal
        self.cross = cross


def _stub_module(name: str, attrs: dict, is_package: bool) -> types.ModuleType:
    module = types.ModuleType(name, f"amlp bench peers: stub of {name} (see amlp.bench.peers.load_released_amlp)")
    module.__dict__.update(attrs)
    if is_package:
        module.__path__ = []

    def __getattr__(attr):  # noqa: N807 - module-level __getattr__
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise AttributeError(f"{name}.{attr} is not provided by amlp's stub (it provides "
                             f"{', '.join(sorted(attrs)) or 'nothing'})")

    module.__getattr__ = __getattr__
    return module


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves stub modules for ``fairseq`` and the submodules in :data:`FAIRSEQ_STUB_MODULES` when
    fairseq is not installed, and for ``abstract_attention`` when the checkout lacks it."""

    def __init__(self, stub_fairseq: bool, stub_abstract: bool):
        self.stub_fairseq, self.stub_abstract = stub_fairseq, stub_abstract
        self.used: list[str] = []

    def _wanted(self, name: str) -> bool:
        if self.stub_fairseq and name in FAIRSEQ_STUB_MODULES:
            return True
        return self.stub_abstract and name == "abstract_attention"

    def find_spec(self, name, path=None, target=None):
        if not self._wanted(name):
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=name in FAIRSEQ_STUB_MODULES)

    def create_module(self, spec):
        self.used.append(spec.name)
        if spec.name == "abstract_attention":
            return _stub_module(spec.name, {"AbstractAttention": _AbstractAttention}, False)
        return _stub_module(spec.name, dict(FAIRSEQ_STUB), True)

    def exec_module(self, module):
        return None


#: how the released code is imported (written to the header of every run that measures it)
RELEASED_IMPORT_METHOD = (
    "amlp.py is loaded from its file with the checkout folder first on sys.path (for its sibling "
    "multihead_attention.py); while it imports, and only when they cannot be found: fairseq, "
    "fairseq.incremental_decoding_utils, fairseq.modules, fairseq.modules.quant_noise, "
    "fairseq.modules.fairseq_dropout and fairseq.utils are stubs providing with_incremental_state (identity "
    "decorator), "
    "FairseqIncrementalState (no-op state helpers), quant_noise (returns the module unchanged), FairseqDropout "
    "(nn.Dropout), utils.softmax (float32 softmax) and get_activation_fn; abstract_attention (CAB's base class, "
    "absent from the AttentiveMLP checkout) is a stub nn.Module base recording causal, cross and a name. The stubs "
    "and the checkout's modules are removed from sys.modules afterwards. einops must be installed (pip install "
    "einops, part of amlp[peers]).")

_RELEASED_CACHE: dict[str, tuple[types.ModuleType, list[str]]] = {}


def load_released_amlp(path: str) -> tuple[types.ModuleType, list[str]]:
    """Import the released ``amlp.py`` (see :data:`RELEASED_IMPORT_METHOD`); returns the module and
    the stubbed module names its import used. Raises ``ValueError`` with a one-line reason."""
    file = released_file(path)
    if file in _RELEASED_CACHE:
        return _RELEASED_CACHE[file]
    folder = os.path.dirname(file)
    stub_fairseq = importlib.util.find_spec("fairseq") is None
    stub_abstract = not os.path.isfile(os.path.join(folder, "abstract_attention.py"))
    finder = _StubFinder(stub_fairseq, stub_abstract)
    before = set(sys.modules)
    sys.path.insert(0, folder)
    sys.meta_path.insert(0, finder)
    try:
        spec = importlib.util.spec_from_file_location("amlp_released_amlp", file)
        module = importlib.util.module_from_spec(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure of foreign code is reported in one line
        stubbed = f" (stubbed: {', '.join(finder.used)})" if finder.used else ""
        raise ValueError(f"--released-amlp {file!r} could not be imported: {type(exc).__name__}: {exc}{stubbed}") \
            from exc
    finally:
        sys.meta_path.remove(finder)
        if folder in sys.path:
            sys.path.remove(folder)
        for name in set(sys.modules) - before:
            mod = sys.modules.get(name)
            origin = getattr(mod, "__file__", None) or ""
            if name in finder.used or (origin and os.path.realpath(origin).startswith(folder + os.sep)):
                del sys.modules[name]
    missing = [c for c in ("AMLPCov", "AMLPQuery") if not hasattr(module, c)]
    if missing:
        raise ValueError(f"--released-amlp {file!r} defines no {' or '.join(missing)}; is it the AttentiveMLP amlp.py?")
    _RELEASED_CACHE[file] = (module, list(finder.used))
    return _RELEASED_CACHE[file]


# -- measuring -------------------------------------------------------------------------------------


def _time_interleaved(fa, fb, min_run_time: float, rounds: int, threads: int) -> dict:
    """Alternate the two calls over ``rounds`` rounds (a then b, b then a, ...)."""
    per = min_run_time / rounds
    times: dict[str, list[float]] = {"a": [], "b": []}
    runs = {"a": 0, "b": 0}
    for r in range(rounds):
        for key in (("a", "b") if r % 2 == 0 else ("b", "a")):
            t = measure_time(fa if key == "a" else fb, min_run_time=per, threads=threads)
            times[key].append(t.median)
            runs[key] += t.runs
    ratios = [b / a for a, b in zip(times["a"], times["b"]) if a > 0]
    ta, tb = statistics.median(times["a"]), statistics.median(times["b"])
    return {"a": ta, "b": tb, "ratio": tb / ta if ta > 0 else None,
            "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
            "runs_a": runs["a"], "runs_b": runs["b"]}


def _peak_bytes(fn, device: torch.device) -> int | None:
    from .memory import timed_peak

    _, mib = timed_peak(fn, device)
    return None if mib is None else int(mib * 2**20)


def _peak_pair(fa, fb, device: torch.device) -> tuple[int | None, int | None]:
    """Peaks of both sides: on CUDA one call each; on the CPU in a forked child, alternating
    (a, b, b, a, ...: five rounds), the smallest per side."""
    if device.type == "cuda":
        return _peak_bytes(fa, device), _peak_bytes(fb, device)
    from .memory import forked_peak_bytes

    a, b = forked_peak_bytes([fa, fb], repeats=5)
    return a, b


def memory_method(device: torch.device, enabled: bool) -> str:
    if not enabled:
        return "not measured (--no-memory)"
    if device.type == "cuda":
        return ("amlp.bench.memory.timed_peak: one untimed call after the timing, torch.cuda.max_memory_allocated "
                "minus allocated before the call")
    from .memory import cpu_peak_supported

    if not cpu_peak_supported():
        return "not measured: this system has no /proc/self/clear_refs to read a CPU peak from"
    return ("amlp.bench.memory.forked_peak_bytes, after the timing of each mode, in a child forked from the "
            "benchmark with one torch thread: glibc's mmap threshold fixed at 64 KiB, heap trimmed, resident "
            "high-water mark reset, one call, VmHWM minus VmRSS before it; the smallest of five calls per side, the "
            "sides alternating (steady state: both sides have run before; amlp bench ops also reports a fresh "
            "process's first call)")


def _compare(a: torch.Tensor, b: torch.Tensor) -> tuple[str, float | None, str]:
    """(shape, max |a - b|, problem) of the two outputs in the common layout."""
    shape = "x".join(str(n) for n in a.shape)
    if tuple(a.shape) != tuple(b.shape):
        return shape, None, f"output shapes differ: amlp {tuple(a.shape)}, peer {tuple(b.shape)}"
    return shape, float((a.float() - b.float()).abs().max()), ""


def pair_outputs(name: str, settings: PeersSettings, length: int,
                 peer_module=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides' outputs of pair ``name`` at ``length``, in the common layout (for tests)."""
    device = resolve_device(settings.device)
    inp = _Inputs(settings, length, device, parse_dtype(settings.dtype))
    torch.manual_seed(settings.seed)
    if peer_module is None:
        peer_module = import_peer(SPECS[name].module)
    built = BUILDERS[name](settings, inp, peer_module)
    with torch.no_grad():
        return built.amlp.canonical(built.amlp.forward()), built.peer.canonical(built.peer.forward())


def _base_row(spec: PairSpec, settings: PeersSettings, device: torch.device, version: str) -> dict:
    return {"pair": spec.name, "level": spec.level, "amlp": f"amlp {spec.amlp_mixer}" + (
        " (form='official')" if spec.name in RELEASED_PAIRS else ""), "peer": spec.peer,
        "package": spec.package or ("released checkout" if spec.name in RELEASED_PAIRS else ""),
        "peer_version": version, "batch": settings.batch, "heads": settings.heads, "head_dim": settings.head_dim,
        "dtype": settings.dtype, "device": str(device)}


def run_peers(settings: PeersSettings, *, progress: Callable[[str], None] | None = None,
              total: Callable[[int], None] | None = None) -> PeersResult:
    """Measure every (pair, length) point; ``progress(description)`` is called after each step."""
    settings.validate()
    device = resolve_device(settings.device)
    dtype = parse_dtype(settings.dtype)
    threads = settings.threads or torch.get_num_threads()
    tick = progress or (lambda _desc: None)

    released, released_used = None, []
    if settings.released_amlp is not None and any(p in RELEASED_PAIRS for p in settings.pairs):
        released, released_used = load_released_amlp(settings.released_amlp)

    # which pairs can be measured
    available: dict[str, Any] = {}
    rows: list[dict] = []
    pair_info: dict[str, dict] = {}
    for name in settings.pairs:
        spec = SPECS[name]
        if name in RELEASED_PAIRS:
            if released is None:
                pair_info[name] = {"status": "not measured", "message": "not measured: pass --released-amlp PATH"}
                continue
            available[name] = (released, f"local checkout {released_file(settings.released_amlp)}")
            continue
        try:
            module = import_peer(spec.module)
        except ImportError:
            pair_info[name] = {"status": "not installed",
                               "message": f"not installed: pip install {spec.package} (or {PEERS_INSTALL})"}
            continue
        except Exception as exc:  # noqa: BLE001 - a broken peer is a row, not a crash
            pair_info[name] = {"status": "error", "message": f"importing {spec.module} failed: "
                                                             f"{type(exc).__name__}: {exc}"}
            continue
        available[name] = (module, _version(spec.package))

    steps = len(available) * len(settings.lengths) * (1 + len(MODES))
    if total is not None:
        total(steps)

    header = {**machine_header(device), "torch_threads": threads, "command": invocation("peers"),
              "settings": {**asdict(settings), "device": str(device)},
              "timing_method": (f"amlp.bench.timing.measure_time, {settings.rounds} alternating rounds per side and "
                                f"mode (amlp first in odd rounds, peer first in even ones), min_run_time / rounds "
                                f"each; time = median of the round medians; ratio = peer time / amlp time"),
              "memory_method": memory_method(device, settings.memory),
              "released_import": RELEASED_IMPORT_METHOD if released is not None else "not used",
              "released_stubs_used": released_used}

    with torch_threads(threads):
        for name in settings.pairs:
            spec = SPECS[name]
            if name not in available:
                info = pair_info[name]
                version = "" if info["status"] != "error" else "?"
                rows.append({**_base_row(spec, settings, device, version), "status": info["status"],
                             "message": info["message"]})
                continue
            module, version = available[name]
            for length in settings.lengths:
                row = {**_base_row(spec, settings, device, version), "length": length, "status": "ok", "message": ""}
                _measure_point(row, name, module, settings, length, device, dtype, threads, tick)
                rows.append(row)
    rows = [{col: row.get(col) for col in PEERS_COLUMNS} for row in rows]
    return PeersResult(header, rows)


def _measure_point(row, name, module, settings, length, device, dtype, threads, tick) -> None:
    try:
        inp = _Inputs(settings, length, device, dtype)
        torch.manual_seed(settings.seed)
        built = BUILDERS[name](settings, inp, module)
        row["hyper"], row["notes"] = built.hyper, built.notes
        with torch.no_grad():
            a = built.amlp.canonical(built.amlp.forward())
            b = built.peer.canonical(built.peer.forward())
        row["out_shape"], row["max_abs_diff"], problem = _compare(a, b)
        del a, b
        if problem:
            raise RuntimeError(problem)
    except PairSkipped as exc:
        row.update(status="skipped", message=str(exc))
        for _ in range(1 + len(MODES)):
            tick(f"{name} T={length}")
        return
    except Exception as exc:  # noqa: BLE001 - one bad point must not end the run
        row.update(status="error", message=f"{type(exc).__name__}: {exc}")
        for _ in range(1 + len(MODES)):
            tick(f"{name} T={length}")
        return
    tick(f"{name} T={length} check")
    messages = []
    for mode in MODES:
        try:
            fa, fb = built.amlp.call(mode), built.peer.call(mode)
            t = _time_interleaved(fa, fb, settings.min_run_time, settings.rounds, threads)
            row[f"amlp_{mode}_s"], row[f"peer_{mode}_s"] = t["a"], t["b"]
            row[f"{mode}_ratio"], row[f"{mode}_ratio_min"], row[f"{mode}_ratio_max"] = (
                t["ratio"], t["ratio_min"], t["ratio_max"])
            row[f"amlp_{mode}_runs"], row[f"peer_{mode}_runs"] = t["runs_a"], t["runs_b"]
            if settings.memory:
                row[f"amlp_{mode}_peak_bytes"], row[f"peer_{mode}_peak_bytes"] = _peak_pair(fa, fb, device)
        except Exception as exc:  # noqa: BLE001
            messages.append(f"{mode}: {type(exc).__name__}: {exc}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        tick(f"{name} T={length} {mode}")
    if messages:
        row.update(status="error", message="; ".join(messages))


# -- output ----------------------------------------------------------------------------------------

def save_peers(result: PeersResult, out_dir: str) -> list[str]:
    """Write ``peers.csv``, ``peers.json`` and ``peers.md``."""
    from .markdown import peers_markdown
    from .report import write_csv, write_json

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("peers.csv", "peers.json", "peers.md")]
    write_csv(paths[0], result.header, result.rows, PEERS_COLUMNS)
    payload = {"header": result.header, "rows": result.rows}
    write_json(paths[1], payload)
    with open(paths[2], "w") as fh:
        fh.write(peers_markdown(payload) + "\n")
    return paths
