"""Hugging Face ``transformers`` integration of the decoder-only language model (``pip install "amlp[hf]"``).

    import amlp.hf                                   # registers the classes with the Auto factories
    from transformers import AutoModelForCausalLM

    model = amlp.hf.AmlpForCausalLM.from_checkpoint("runs/lm/softmax-seed0/checkpoints/best")
    ids = torch.tensor([model.encode("ROMEO:")])
    out = model.generate(ids, max_new_tokens=100, do_sample=True, top_k=20)
    print(model.decode(out[0]))
    model.save_pretrained("amlp-shakespeare")        # config.json + model.safetensors
    again = AutoModelForCausalLM.from_pretrained("amlp-shakespeare")

* :class:`AmlpLMConfig` (``model_type = "amlp-lm"``) holds the arguments of
  :class:`amlp.models.decoder.DecoderLM` (``n_positions`` is its ``max_length``) and, for character
  models, the vocabulary (``vocab_chars``).
* :class:`AmlpForCausalLM` wraps a ``DecoderLM`` (as ``.lm``, so the weights keep their names
  under ``lm.``). Without a cache, ``forward`` is the parallel forward (with ``labels``, the loss is
  the mean next-token cross-entropy, labels shifted inside, ``-100`` ignored). With ``use_cache``,
  the tokens go through ``DecoderLM.step`` and the recurrent state of every mixer comes back as the
  output's ``state``: ``generate()`` carries it from one call to the next (as for RWKV and Mamba),
  so each new token costs one step, whatever the mixer. Greedy search and sampling (with the usual
  logits processors) work; beam search reorders the state's rows through ``_reorder_cache``, which
  transformers 5 calls for a cache named ``state`` (older versions reorder only
  ``past_key_values``: use greedy search or sampling there). Every id is a token (a character
  model has no padding id): pass ``attention_mask=torch.ones_like(ids)``, and give prompts of one
  length, since step decoding takes no padding.

The weights are not re-initialised by ``transformers``: a wrapper built from a config is initialised
as ``DecoderLM`` is, and ``from_pretrained`` loads every tensor from the safetensors file.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

try:
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import ModelOutput
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError('amlp.hf needs the transformers package: pip install "amlp[hf]"') from err
try:
    from transformers import GenerationMixin
except ImportError:  # pragma: no cover - transformers < 4.45: PreTrainedModel has generate() itself
    GenerationMixin = object

from .models.decoder import DecoderLM

MODEL_TYPE = "amlp-lm"


class AmlpLMConfig(PretrainedConfig):
    """The arguments of :class:`amlp.models.decoder.DecoderLM`, plus ``vocab_chars`` (the characters of
    a character-level model, id ``i`` = ``vocab_chars[i]``; None for other vocabularies)."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 65, n_positions: int = 256, dim: int = 64, heads: int = 1,
                 n_layers: int = 2, mixer: str = "softmax", block: str = "auto", mlp_ratio: float = 4.0,
                 dropout: float = 0.0, mixer_options: dict[str, Any] | None = None, embed_init_std: float = 0.02,
                 vocab_chars: str | None = None, **kwargs):
        self.vocab_size, self.n_positions, self.dim, self.heads = vocab_size, n_positions, dim, heads
        self.n_layers, self.mixer, self.block, self.mlp_ratio = n_layers, mixer, block, mlp_ratio
        self.dropout, self.mixer_options, self.embed_init_std = dropout, dict(mixer_options or {}), embed_init_std
        self.vocab_chars = vocab_chars
        if vocab_chars is not None and len(vocab_chars) != vocab_size:
            raise ValueError(f"vocab_chars has {len(vocab_chars)} characters but vocab_size is {vocab_size}")
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def decoder_kwargs(self) -> dict[str, Any]:
        return dict(dim=self.dim, heads=self.heads, n_layers=self.n_layers, mixer=self.mixer, block=self.block,
                    mlp_ratio=self.mlp_ratio, dropout=self.dropout, mixer_options=self.mixer_options,
                    embed_init_std=self.embed_init_std)


@dataclass
class AmlpCausalLMOutput(ModelOutput):
    """``logits`` ``[B, T, V]``; ``loss`` with labels; ``state``: the decoding state after the
    tokens (with ``use_cache``), to pass back as ``state=`` with the next tokens."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: dict[str, Any] | None = None


def _map_state(state: Any, fn) -> Any:
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: _map_state(v, fn) for k, v in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # a NamedTuple
        return type(state)(*(_map_state(v, fn) for v in state))
    if isinstance(state, (list, tuple)):
        return type(state)(_map_state(v, fn) for v in state)
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return dataclasses.replace(state, **{f.name: _map_state(getattr(state, f.name), fn)
                                             for f in dataclasses.fields(state) if f.init})
    return state


class AmlpForCausalLM(PreTrainedModel, GenerationMixin):
    """A :class:`~amlp.models.decoder.DecoderLM` as a ``transformers`` causal language model."""

    config_class = AmlpLMConfig
    base_model_prefix = "lm"
    main_input_name = "input_ids"
    _is_stateful = True
    _supports_cache_class = False

    def __init__(self, config: AmlpLMConfig):
        super().__init__(config)
        self.lm = DecoderLM(config.vocab_size, config.n_positions, **config.decoder_kwargs())
        self.post_init()

    # DecoderLM initialises itself; nothing is overwritten here
    def _init_weights(self, module):
        pass

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state travels as `state`, not in a key/value cache

    def get_input_embeddings(self):
        return self.lm.token_embedding

    def get_output_embeddings(self):
        return self.lm.head

    # -- building ---------------------------------------------------------------------------------------
    @classmethod
    def from_decoder(cls, lm: DecoderLM, mixer_options: dict[str, Any] | None = None, vocab_chars: str | None = None,
                     **config_kwargs) -> "AmlpForCausalLM":
        """Wrap a built ``DecoderLM``, its weights copied. ``mixer_options`` must be the options it was
        built with (a model cannot tell all of them, e.g. a window size has no weights); the wrapper's
        output is compared with the model's on a random input, and a difference is an error."""
        first = lm.blocks[0]
        heads = getattr(getattr(first, "mixer", None), "heads", 1)
        mlp = getattr(first, "mlp", None)
        mlp_ratio = mlp[0].out_features / lm.dim if mlp is not None else 4.0
        config = AmlpLMConfig(vocab_size=lm.vocab_size, n_positions=lm.max_length, dim=lm.dim, heads=heads,
                              n_layers=len(lm.blocks), mixer=lm.mixer_name, block=lm.block_type, mlp_ratio=mlp_ratio,
                              dropout=float(lm.embed_dropout.p), mixer_options=mixer_options, vocab_chars=vocab_chars,
                              embed_init_std=0.02, **config_kwargs)
        param = next(lm.parameters())
        with torch.random.fork_rng(devices=[]):
            model = cls(config)
        try:
            model.lm.load_state_dict(lm.state_dict())
        except RuntimeError as err:
            raise ValueError(f"the weights do not fit a {lm.mixer_name!r} model built with mixer_options="
                             f"{mixer_options!r}; give the options it was built with ({err})") from None
        model = model.to(param.device, param.dtype)
        probe = torch.randint(0, lm.vocab_size, (2, min(lm.max_length, 16)), device=param.device,
                              generator=torch.Generator().manual_seed(0)) if param.device.type == "cpu" else \
            torch.randint(0, lm.vocab_size, (2, min(lm.max_length, 16)), device=param.device)
        was = lm.training, model.training
        lm.eval(), model.eval()
        with torch.no_grad():
            same = torch.allclose(model.lm(probe), lm(probe), rtol=1e-4, atol=1e-5)
        lm.train(was[0]), model.train(was[1])
        if not same:
            raise ValueError(f"the wrapped model computes something else than the given one: give the mixer_options "
                             f"the {lm.mixer_name!r} model was built with")
        return model

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, device: str = "auto") -> "AmlpForCausalLM":
        """The model of a checkpoint folder of an ``amlp train lm`` run, with its vocabulary."""
        from .train.loop import load_trained_model

        config, task, lm = load_trained_model(checkpoint, [], device)
        if config.task != "lm":
            raise ValueError(f"{str(checkpoint)!r} is a checkpoint of task {config.task!r}, not lm")
        _, options, _ = task.model_sizes()
        return cls.from_decoder(lm, mixer_options=options, vocab_chars=task.vocab.chars)

    # -- text (character models) ------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        from .tasks.lm.data import CharVocab

        if self.config.vocab_chars is None:
            raise ValueError("this model carries no character vocabulary (config.vocab_chars)")
        return CharVocab(self.config.vocab_chars).encode(text, "the text")

    def decode(self, ids) -> str:
        from .tasks.lm.data import CharVocab

        if self.config.vocab_chars is None:
            raise ValueError("this model carries no character vocabulary (config.vocab_chars)")
        return CharVocab(self.config.vocab_chars).decode(ids)

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                state: dict[str, Any] | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None, **kwargs) -> AmlpCausalLMOutput:
        if input_ids is None:
            raise ValueError("input_ids are required (this model takes no inputs_embeds)")
        if state is None and not use_cache:
            mask = attention_mask.bool() if attention_mask is not None else None
            if mask is not None and bool(mask.all()):
                mask = None
            logits = self.lm(input_ids, x_mask=mask)
        else:
            if attention_mask is not None and not bool(attention_mask.bool().all()):
                raise ValueError("step decoding takes no padding: give prompts of one length (attention_mask all 1)")
            if state is None:
                state = self.lm.init_state(input_ids.shape[0], device=input_ids.device)
            steps = []
            for t in range(input_ids.shape[1]):
                out, state = self.lm.step(input_ids[:, t], state)
                steps.append(out)
            logits = torch.stack(steps, dim=1)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return AmlpCausalLMOutput(loss=loss, logits=logits, state=state if (use_cache or state is not None) else None)

    # -- generate() plumbing ------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, state=None, attention_mask=None, use_cache=None, **kwargs):
        if state is not None:
            input_ids = input_ids[:, -1:]  # everything before is in the state
        return {"input_ids": input_ids, "state": state, "use_cache": True if use_cache is None else use_cache,
                "attention_mask": attention_mask if state is None else None}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["state"] = getattr(outputs, "state", None)
        return model_kwargs

    def _reorder_cache(self, state, beam_idx):
        return _map_state(state, lambda t: t.index_select(0, beam_idx.to(t.device)) if t.dim() else t)


AutoConfig.register(MODEL_TYPE, AmlpLMConfig)
AutoModelForCausalLM.register(AmlpLMConfig, AmlpForCausalLM)

__all__ = ["AmlpCausalLMOutput", "AmlpForCausalLM", "AmlpLMConfig"]
