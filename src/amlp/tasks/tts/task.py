"""The text-to-speech task of the training loop: FastSpeech 2 (NAR) or Transformer-TTS (AR).

Features. The models work on log-mel spectrograms (:mod:`amlp.tasks.tts.audio`) normalised per band
with the training split's mean and standard deviation; phone-level pitch (Hz, unvoiced frames
interpolated) and energy are z-scored with the training split's statistics. The phone inventory and
these statistics are fixed by the training split and travel with every checkpoint
(``tts_vocab.json``), so a checkpoint folder is all ``amlp eval`` and ``amlp synthesize`` need.

Training loss:

* FastSpeech 2: L1 of the mel before and after the PostNet over real frames, plus the mean squared
  error of the log-duration (``log(d + 1)``), pitch and energy predictions over real phones (the
  variance adaptor sees the true durations, pitch and energy).
* Transformer-TTS: L1 of the mel before and after the PostNet (teacher forcing) plus the binary
  cross-entropy of the stop token (positive frames weighted by ``model.stop_weight``).

Evaluation reports ``loss`` (the training loss without dropout), ``mel_l1`` (L1 of the PostNet output
in normalised units, teacher-forced), ``params``, and on synthesised speech ``mcd`` and ``msd``
(:mod:`amlp.tasks.tts.metrics`): each utterance is synthesised from its phones alone (predicted
durations for FastSpeech 2, frame by frame until the stop token for Transformer-TTS), turned into audio
by Griffin-Lim, and compared with the reference mel turned into audio by the same Griffin-Lim, as
fairseq's evaluation of generated speech does. FastSpeech 2 also reports ``baseline_mcd`` /
``baseline_msd``: the training split's average mel frame repeated for the model's predicted number of
frames (a model that learned nothing but the durations).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .config import TTSDataConfig, TTSModelConfig

VOCAB_FILE = "tts_vocab.json"
PAD = 0


def _unwrap(model):
    return getattr(model, "module", model)


@dataclass
class TTSVocab:
    """Phone inventory (ids 1..len) and feature statistics of a training split."""

    phones: list[str]
    mel_mean: list[float]
    mel_std: list[float]
    pitch_mean: float
    pitch_std: float
    energy_mean: float
    energy_std: float
    #: ranges of the z-scored pitch and energy over the training phones (the embedding buckets)
    pitch_range: tuple[float, float]
    energy_range: tuple[float, float]

    @classmethod
    def from_utterances(cls, utterances, extra_phones=()) -> "TTSVocab":
        """Statistics of the training ``utterances``; the inventory also takes the phone symbols of
        ``extra_phones`` (the other splits: a closed phone set, so that a rare phone missing from the
        training split gets an embedding instead of making its utterance unreadable)."""
        if not utterances:
            raise ValueError("the training split has no utterances")
        phones = sorted({p for u in utterances for p in u.phones} | {p for seq in extra_phones for p in seq})
        mels = np.concatenate([u.mel for u in utterances], axis=0).astype(np.float64)
        pitch = np.concatenate([u.pitch for u in utterances]).astype(np.float64)
        energy = np.concatenate([u.energy for u in utterances]).astype(np.float64)
        pm, ps = float(pitch.mean()), float(pitch.std() or 1.0)
        em, es = float(energy.mean()), float(energy.std() or 1.0)
        zp, ze = (pitch - pm) / ps, (energy - em) / es
        return cls(phones=phones, mel_mean=mels.mean(0).tolist(), mel_std=np.maximum(mels.std(0), 1e-3).tolist(),
                   pitch_mean=pm, pitch_std=ps, energy_mean=em, energy_std=es,
                   pitch_range=(float(zp.min()), float(zp.max())), energy_range=(float(ze.min()), float(ze.max())))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TTSVocab":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data.vocab: no phone inventory at {str(path)!r}")
        record = json.loads(path.read_text())
        record["pitch_range"] = tuple(record["pitch_range"])
        record["energy_range"] = tuple(record["energy_range"])
        return cls(**record)

    @property
    def num_phones(self) -> int:
        """Embedding rows: the phones plus padding (id 0)."""
        return len(self.phones) + 1

    def encode(self, phones: list[str], *, where: str = "") -> list[int]:
        ids = {p: i + 1 for i, p in enumerate(self.phones)}
        unknown = sorted({p for p in phones if p not in ids})
        if unknown:
            raise ValueError(f"{where}phones {', '.join(map(repr, unknown))} are not in the model's inventory "
                             f"of {len(self.phones)} phones (the training corpus had none)")
        return [ids[p] for p in phones]

    def normalise_mel(self, mel: np.ndarray) -> np.ndarray:
        return ((mel - np.asarray(self.mel_mean)) / np.asarray(self.mel_std)).astype(np.float32)

    def denormalise_mel(self, mel: np.ndarray) -> np.ndarray:
        return (mel * np.asarray(self.mel_std) + np.asarray(self.mel_mean)).astype(np.float32)


class TTSDataset(torch.utils.data.Dataset):
    """Utterances as tensors: phone ids, durations (frames), z-scored pitch and energy, normalised mel."""

    def __init__(self, utterances, vocab: TTSVocab, split: str):
        self.utterances = utterances
        self.vocab = vocab
        self.items = []
        for u in utterances:
            self.items.append({
                "phones": torch.tensor(vocab.encode(list(u.phones), where=f"{split} utterance {u.id}: "),
                                       dtype=torch.long),
                "durations": torch.as_tensor(np.asarray(u.durations), dtype=torch.long),
                "pitch": torch.as_tensor((np.asarray(u.pitch) - vocab.pitch_mean) / vocab.pitch_std, dtype=torch.float32),
                "energy": torch.as_tensor((np.asarray(u.energy) - vocab.energy_mean) / vocab.energy_std,
                                          dtype=torch.float32),
                "mel": torch.as_tensor(vocab.normalise_mel(np.asarray(u.mel))),
            })

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {**self.items[i], "index": i}

    def frames(self, i: int) -> int:
        return int(self.items[i]["mel"].shape[0])


def collate_utterances(items: list[dict]) -> dict[str, torch.Tensor]:
    """Pad a list of utterances: ``phones`` ``[B, N]`` (0 = pad), ``phone_mask``, ``durations``, ``pitch``,
    ``energy`` ``[B, N]``, ``mel`` ``[B, T, 80]``, ``frame_mask`` ``[B, T]``, ``index`` ``[B]``."""
    B = len(items)
    N = max(int(it["phones"].shape[0]) for it in items)
    T = max(int(it["mel"].shape[0]) for it in items)
    n_mels = int(items[0]["mel"].shape[1])
    out = {"phones": torch.zeros(B, N, dtype=torch.long), "durations": torch.zeros(B, N, dtype=torch.long),
           "pitch": torch.zeros(B, N), "energy": torch.zeros(B, N), "mel": torch.zeros(B, T, n_mels),
           "phone_mask": torch.zeros(B, N, dtype=torch.bool), "frame_mask": torch.zeros(B, T, dtype=torch.bool),
           "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.long)}
    for b, it in enumerate(items):
        n, t = int(it["phones"].shape[0]), int(it["mel"].shape[0])
        for key in ("phones", "durations", "pitch", "energy"):
            out[key][b, :n] = it[key]
        out["mel"][b, :t] = it["mel"]
        out["phone_mask"][b, :n] = True
        out["frame_mask"][b, :t] = True
    return out


class TTSTask:
    data_config = TTSDataConfig
    model_config = TTSModelConfig

    def __init__(self, config):
        self.config = config
        d: TTSDataConfig = config.data
        self._corpus = None
        if d.vocab is not None:
            self.vocab = TTSVocab.load(d.vocab)
        else:
            self.vocab = TTSVocab.from_utterances(self.corpus["train"],
                                                  extra_phones=[u.phones for s in ("val", "test")
                                                                for u in self.corpus.get(s, [])])
        self._splits: dict[str, TTSDataset] = {}
        self._reference_audio: dict[tuple[str, int], np.ndarray] = {}

    @property
    def corpus(self) -> dict:
        if self._corpus is None:
            from .corpus import load_corpus

            self._corpus = load_corpus(self.config.data.corpus)
        return self._corpus

    # -- data -----------------------------------------------------------------------------------------
    def dataset(self, split: str) -> TTSDataset | None:
        if split not in ("train", "val", "test"):
            return None
        if split not in self._splits:
            d, m = self.config.data, self.config.model
            utterances = list(self.corpus[split])
            if split == "train":
                limit_t, limit_n = min(d.max_train_frames, m.max_frames), min(d.max_train_phones, m.max_phones)
                utterances = [u for u in utterances if u.mel.shape[0] <= limit_t and len(u.phones) <= limit_n]
                if not utterances:
                    raise ValueError(f"no training utterance fits data.max_train_frames={limit_t} and "
                                     f"data.max_train_phones={limit_n}")
            self._splits[split] = TTSDataset(utterances, self.vocab, split)
        return self._splits[split]

    collate = staticmethod(collate_utterances)

    def batches(self, split: str) -> list[list[int]]:
        """Index batches of ``split`` by mel frames (the training loop shuffles their order every epoch)."""
        from ..translation.data import token_batches

        data = self.dataset(split)
        return token_batches([data.frames(i) for i in range(len(data))], self.config.data.max_frames_per_batch)

    def checkpoint_files(self) -> dict[str, bytes]:
        return {VOCAB_FILE: self.vocab.to_json().encode()}

    @staticmethod
    def checkpoint_overrides(path: str | os.PathLike) -> list[str]:
        own = Path(path) / VOCAB_FILE
        return [f"data.vocab={own}"] if own.is_file() else []

    # -- model ----------------------------------------------------------------------------------------
    def build_model(self):
        from ...models.tts import FastSpeech2, TransformerTTS

        m: TTSModelConfig = self.config.model
        n_mels = len(self.vocab.mel_mean)
        common = dict(dim=m.dim, heads=m.heads, ffn_dim=m.ffn_dim, encoder_layers=m.encoder_layers,
                      decoder_layers=m.decoder_layers, encoder_mixer=m.encoder_mixer,
                      encoder_options=dict(m.encoder_options), dropout=m.dropout, postnet_layers=m.postnet_layers,
                      postnet_dim=m.postnet_dim, max_phones=m.max_phones, max_frames=m.max_frames)
        if m.arch == "fastspeech2":
            model = FastSpeech2(self.vocab.num_phones, n_mels, decoder_mixer=m.decoder_mixer,
                                decoder_options=dict(m.decoder_options), variance_dim=m.variance_dim, bins=m.bins,
                                pitch_range=self.vocab.pitch_range, energy_range=self.vocab.energy_range, **common)
        else:
            model = TransformerTTS(self.vocab.num_phones, n_mels, self_mixer=m.decoder_mixer,
                                   self_options=dict(m.decoder_options), cross_mixer=m.cross_mixer,
                                   cross_options=dict(m.cross_options), prenet_dim=m.prenet_dim,
                                   encoder_prenet_layers=m.encoder_prenet_layers, **common)
        mixers = (m.encoder_mixer, m.decoder_mixer) + ((m.cross_mixer,) if m.arch != "fastspeech2" else ())
        print(f"tts: {m.arch} ({' / '.join(mixers)}), {model.num_parameters():,} parameters",
              file=sys.stderr, flush=True)
        return model

    # -- losses ---------------------------------------------------------------------------------------
    def loss(self, model, batch) -> torch.Tensor:
        return self._losses(model, batch)["loss"]

    def _losses(self, model, batch) -> dict[str, torch.Tensor]:
        from ...models.tts import FastSpeech2

        net = _unwrap(model)
        phones, phone_mask, frame_mask, mel = batch["phones"], batch["phone_mask"], batch["frame_mask"], batch["mel"]
        if isinstance(net, FastSpeech2):
            out = model(phones, phone_mask, durations=batch["durations"], pitch=batch["pitch"],
                        energy=batch["energy"])
            T = min(out["mel"].shape[1], mel.shape[1])
            real = frame_mask[:, :T] & out["frame_mask"][:, :T]
            mel_l1 = F.l1_loss(out["mel"][:, :T][real], mel[:, :T][real])
            post_l1 = F.l1_loss(out["mel_post"][:, :T][real], mel[:, :T][real])
            log_d = torch.log(batch["durations"].float() + 1.0)
            duration = F.mse_loss(out["log_duration"][phone_mask], log_d[phone_mask])
            pitch = F.mse_loss(out["pitch"][phone_mask], batch["pitch"][phone_mask])
            energy = F.mse_loss(out["energy"][phone_mask], batch["energy"][phone_mask])
            return {"loss": mel_l1 + post_l1 + duration + pitch + energy, "mel_l1": post_l1.detach()}
        out = model(phones, phone_mask, mel, frame_mask)
        mel_l1 = F.l1_loss(out["mel"][frame_mask], mel[frame_mask])
        post_l1 = F.l1_loss(out["mel_post"][frame_mask], mel[frame_mask])
        lengths = frame_mask.sum(1)
        stop_target = (torch.arange(mel.shape[1], device=mel.device)[None, :] == (lengths - 1)[:, None]).float()
        weight = torch.tensor(self.config.model.stop_weight, device=mel.device)
        stop = F.binary_cross_entropy_with_logits(out["stop_logits"][frame_mask].float(), stop_target[frame_mask],
                                                  pos_weight=weight)
        return {"loss": mel_l1 + post_l1 + stop, "mel_l1": post_l1.detach()}

    # -- synthesis ------------------------------------------------------------------------------------
    @torch.no_grad()
    def synthesize_mels(self, model, phones: torch.Tensor, phone_mask: torch.Tensor) -> list[np.ndarray]:
        """Log-mel spectrograms ``[frames, 80]`` (denormalised) of each row, from the phones alone
        (Transformer-TTS: its pre-net dropout draws from seed 0, whatever the global generator holds)."""
        from ...models.tts import FastSpeech2

        net = _unwrap(model)
        if isinstance(net, FastSpeech2):
            mel, mask = net.infer(phones, phone_mask)
        else:
            # Transformer-TTS keeps its pre-net dropout at inference (as the paper): the draws come from
            # a fixed seed, so that an evaluation gives the same numbers every time
            devices = [phones.device] if phones.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(0)
                mel, mask = net.infer(phones, phone_mask, max_frames=net.max_frames,
                                      stop_threshold=self.config.model.stop_threshold)
        out = []
        for b in range(mel.shape[0]):
            out.append(self.vocab.denormalise_mel(mel[b][mask[b]].float().cpu().numpy()))
        return out

    def vocode(self, log_mel: np.ndarray) -> np.ndarray:
        from .vocoder import griffin_lim

        return griffin_lim(log_mel, n_iter=self.config.data.griffin_lim_iters)

    def reference_audio(self, split: str, index: int) -> np.ndarray:
        """The reference mel of an utterance through the same Griffin-Lim as the synthesised speech."""
        key = (split, index)
        if key not in self._reference_audio:
            self._reference_audio[key] = self.vocode(np.asarray(self.dataset(split).utterances[index].mel))
        return self._reference_audio[key]

    def evaluate(self, model, batches: Iterable[dict], split: str = "val") -> dict[str, float]:
        from ...models.tts import FastSpeech2
        from .metrics import mel_cepstral_distortion, mel_spectral_distortion

        net = _unwrap(model)
        limit = self.config.data.val_synth_examples if split == "val" else None
        sums = {"loss": 0.0, "mel_l1": 0.0}
        rows = 0
        dist = {"mcd": [], "msd": [], "baseline_mcd": [], "baseline_msd": []}
        synth_seconds = 0.0
        mean_frame = np.asarray(self.vocab.mel_mean, dtype=np.float32)
        from tqdm.auto import tqdm

        for batch in tqdm(batches, desc=f"synthesising {split}", unit="batch", leave=False, file=sys.stderr,
                          disable=not sys.stderr.isatty()):
            B = batch["phones"].shape[0]
            losses = self._losses(model, batch)
            for k in sums:
                sums[k] += float(losses[k]) * B
            rows += B
            pick = torch.ones(B, dtype=torch.bool) if limit is None else batch["index"].cpu() < limit
            if not bool(pick.any()):
                continue
            keep = pick.nonzero().flatten().to(batch["phones"].device)
            phones, phone_mask = batch["phones"][keep], batch["phone_mask"][keep]
            width = int(phone_mask.sum(1).max())
            start = time.perf_counter()
            mels = self.synthesize_mels(net, phones[:, :width], phone_mask[:, :width])
            synth_seconds += time.perf_counter() - start
            for i, mel in zip(batch["index"][keep].tolist(), mels):
                reference = self.reference_audio(split, i)
                audio = self.vocode(mel) if mel.shape[0] > 1 else np.zeros(256, dtype=np.float32)
                dist["mcd"].append(mel_cepstral_distortion(reference, audio))
                dist["msd"].append(mel_spectral_distortion(reference, audio))
                if isinstance(net, FastSpeech2):
                    trivial = self.vocode(np.repeat(mean_frame[None, :], max(mel.shape[0], 2), axis=0))
                    dist["baseline_mcd"].append(mel_cepstral_distortion(reference, trivial))
                    dist["baseline_msd"].append(mel_spectral_distortion(reference, trivial))
        metrics = {k: v / max(rows, 1) for k, v in sums.items()}
        metrics.update({k: float(np.mean(v)) for k, v in dist.items() if v})
        metrics["synth_utterances"] = float(len(dist["mcd"]))
        metrics["synth_seconds"] = synth_seconds
        metrics["params"] = float(net.num_parameters())
        return metrics


# -- synthesis of user text -------------------------------------------------------------------------------
def synthesize_text(task: TTSTask, model, text: str) -> tuple[np.ndarray, list[str]]:
    """(audio at 22,050 Hz, phones) for ``text``: phones from Festival's front end, mel from the model,
    audio by Griffin-Lim. Text Festival cannot say raises ``ValueError``."""
    from .festival import check_text, text_to_phones

    check_text(text)
    phones = text_to_phones(text)
    net = _unwrap(model)
    ids = task.vocab.encode(phones)
    if len(ids) > net.max_phones:
        raise ValueError(f"the text has {len(ids)} phones, more than the model's maximum of {net.max_phones} "
                         "(model.max_phones); split it into shorter sentences")
    device = next(net.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    mel = task.synthesize_mels(net, x, torch.ones_like(x, dtype=torch.bool))[0]
    return task.vocode(mel), phones
