"""Festival (the Edinburgh speech synthesis system) with the CMU ARCTIC "slt" HTS voice: the teacher of the
synthetic TTS corpus and the text front end (text -> phones) of the TTS models.

Festival runs as a batch process, ``festival -b script.scm``, on a Scheme script written here; one process
synthesises many sentences (loading the voice takes about a third of a second, a sentence about a
tenth). Its waves are 16-bit at the voice's rate (32 kHz for slt HTS); its segment files
(``utt.save.segs``) give each phone's end time in seconds. On Debian/Ubuntu:
``apt-get install festival festvox-us-slt-hts``.

Phones are Festival's (a radio-style ARPAbet without stress: ``pau`` is silence, ``ax``, ``ih``, ...).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

#: the voice's Scheme command and its folder name under Festival's voices directory
VOICE = "cmu_us_slt_arctic_hts"
VOICE_COMMAND = f"(voice_{VOICE})"
#: Debian/Ubuntu packages that provide Festival and the voice
PACKAGES = ("festival", "festvox-us-slt-hts")
#: the silence phone of Festival
SILENCE = "pau"

_INSTALL_HINT = "install the Debian/Ubuntu packages " + " and ".join(PACKAGES) + \
    f" (apt-get install {' '.join(PACKAGES)})"
#: characters besides letters and digits that text may contain (printable ASCII)
_ALLOWED = set(" !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_WHITESPACE = re.compile(r"\s+")
#: the front-end modules of Festival's text synthesis, everything before the waveform (HTS) stage
_FRONT_END = ("Initialize", "Text", "Token_POS", "Token", "POS", "Phrasify", "Word", "Pauses", "Intonation",
              "PostLex")

__all__ = ["VOICE", "PACKAGES", "SILENCE", "check_festival", "festival_version", "check_text", "synthesize",
           "text_to_phones", "parse_segs", "read_segs"]


# -- availability ------------------------------------------------------------------------------------------
def _festival_binary() -> str:
    path = shutil.which("festival")
    if path is None:
        raise RuntimeError(f"Festival is not installed (no 'festival' program on PATH): {_INSTALL_HINT}")
    return path


def _run(script: str, cwd: str | os.PathLike, timeout: float) -> subprocess.CompletedProcess:
    """Run ``festival -b`` on the Scheme ``script`` (written to a file in ``cwd``)."""
    binary = _festival_binary()
    path = Path(cwd) / "script.scm"
    path.write_text(script, encoding="utf-8")
    try:
        return subprocess.run([binary, "-b", str(path)], cwd=str(cwd), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"festival did not finish within {timeout:.0f} s") from exc


@functools.lru_cache(maxsize=1)
def _checked() -> str:
    binary = _festival_binary()
    with tempfile.TemporaryDirectory(prefix="amlp-festival-") as tmp:
        result = _run(f'{VOICE_COMMAND}\n(format t "voice-ok\\n")\n', tmp, timeout=120)
    if result.returncode != 0 or "voice-ok" not in result.stdout:
        detail = (result.stderr or result.stdout).strip().splitlines()
        reason = detail[-1] if detail else "no output"
        raise RuntimeError(f"Festival ({binary}) cannot load the voice {VOICE} ({reason}): {_INSTALL_HINT}")
    return binary


def check_festival() -> None:
    """Raise ``RuntimeError`` naming the Debian packages (``festival``, ``festvox-us-slt-hts``) when the
    ``festival`` program or the slt HTS voice is missing. The voice is checked by loading it in a tiny
    script (about half a second, once per process)."""
    _checked()


def festival_version() -> str:
    """Festival's version line (``festival --version``)."""
    binary = _festival_binary()
    result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    line = (result.stdout or result.stderr).strip()
    return line[len(binary) + 2:] if line.startswith(binary + ": ") else line  # without the program's path


# -- text --------------------------------------------------------------------------------------------------
def check_text(text: str) -> str:
    """The text with its whitespace collapsed to single spaces, if Festival can say it; else ``ValueError``.

    Allowed: printable ASCII (letters, digits, whitespace and the punctuation ``!"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~``);
    the text must contain at least one letter. The error names every offending character."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    normal = _WHITESPACE.sub(" ", text).strip()
    if not normal:
        raise ValueError("empty text: there is nothing to say")
    bad = sorted({c for c in normal if not (("a" <= c <= "z") or ("A" <= c <= "Z") or ("0" <= c <= "9")
                                            or c in _ALLOWED)})
    if bad:
        names = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in bad)
        raise ValueError(f"text contains characters Festival cannot say: {names}; use printable ASCII "
                         "(letters, digits, spaces and common punctuation)")
    if not any(c.isalpha() for c in normal):
        raise ValueError(f"text has no letters, so there are no words to say: {normal!r}")
    return normal


def _scheme_string(text: str) -> str:
    """A Scheme string literal of ``text`` (backslashes and double quotes escaped)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- segments ----------------------------------------------------------------------------------------------
def parse_segs(content: str) -> list[tuple[str, float]]:
    """``[(phone, end_time_s)]`` of the text of an ``utt.save.segs`` file: a header that ends with a line
    ``#``, then one line ``end_time 100 phone`` per segment."""
    lines = content.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "#") + 1
    except StopIteration:
        raise ValueError("not a Festival segment file: no header line '#'") from None
    segments = []
    for line in lines[start:]:
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3:
            raise ValueError(f"bad segment line {line!r}: expected 'end_time 100 phone'")
        segments.append((fields[2], float(fields[0])))
    return segments


def read_segs(path: str | os.PathLike) -> list[tuple[str, float]]:
    """:func:`parse_segs` of a file."""
    return parse_segs(Path(path).read_text(encoding="utf-8", errors="replace"))


# -- synthesis ---------------------------------------------------------------------------------------------
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def synthesize(sentences: list[str], out_dir: str | os.PathLike, names: list[str],
               *, timeout_per_sentence: float = 30.0) -> list[tuple[Path, list[tuple[str, float]]]]:
    """Synthesise ``sentences`` with the slt HTS voice in one Festival process.

    Writes ``out_dir/<name>.wav`` (Festival's rate, 32 kHz 16-bit) and ``out_dir/<name>.segs`` per sentence
    and returns, in order, ``(wav path, [(phone, end_time_s)])``. ``names`` are file stems (letters,
    digits, ``_ . -``), one per sentence, distinct. Every sentence must pass :func:`check_text`
    (``ValueError`` otherwise, before Festival runs); a Festival failure raises ``RuntimeError`` with its
    message."""
    sentences, names = list(sentences), list(names)
    if len(sentences) != len(names):
        raise ValueError(f"{len(sentences)} sentences but {len(names)} names")
    if len(set(names)) != len(names):
        raise ValueError("names must be distinct")
    for name in names:
        if not isinstance(name, str) or not _SAFE_NAME.match(name):
            raise ValueError(f"bad file name {name!r}: use letters, digits, '_', '.', '-'")
    texts = []
    for i, sentence in enumerate(sentences):
        try:
            texts.append(check_text(sentence))
        except ValueError as exc:
            raise ValueError(f"sentence {i} ({names[i]!r}): {exc}") from None
    if not texts:
        return []
    check_festival()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    script = [VOICE_COMMAND]
    for text, name in zip(texts, names):
        wav, segs = out_dir / f"{name}.wav", out_dir / f"{name}.segs"
        script.append(f"(set! utt1 (Utterance Text {_scheme_string(text)}))\n(utt.synth utt1)\n"
                      f"(utt.save.wave utt1 {_scheme_string(str(wav))} 'riff)\n"
                      f"(utt.save.segs utt1 {_scheme_string(str(segs))})")
    with tempfile.TemporaryDirectory(prefix="amlp-festival-") as tmp:
        result = _run("\n".join(script) + "\n", tmp, timeout=60 + timeout_per_sentence * len(texts))
    if result.returncode != 0:
        detail = "\n".join((result.stderr + result.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"festival failed (exit status {result.returncode}) synthesising {len(texts)} "
                           f"sentences into {str(out_dir)!r}: {detail}")
    out = []
    for text, name in zip(texts, names):
        wav, segs = out_dir / f"{name}.wav", out_dir / f"{name}.segs"
        if not wav.is_file() or not segs.is_file():
            raise RuntimeError(f"festival wrote no wave or segments for {name!r} ({text!r})")
        segments = read_segs(segs)
        if not segments:
            raise RuntimeError(f"festival gave no phones for {name!r} ({text!r})")
        out.append((wav, segments))
    return out


def texts_to_phones(texts: list[str]) -> list[list[str]]:
    """:func:`text_to_phones` of many texts in one Festival process."""
    texts = [check_text(t) for t in texts]
    if not texts:
        return []
    check_festival()
    script = [VOICE_COMMAND]
    for i, text in enumerate(texts):
        modules = "".join(f"({m} utt1)" for m in _FRONT_END)
        script.append(f"(set! utt1 (Utterance Text {_scheme_string(text)}))\n{modules}\n"
                      f'(format t "@phones {i}:")'
                      "(mapcar (lambda (s) (format t \" %s\" (item.name s))) (utt.relation.items utt1 'Segment))"
                      '(format t "\\n")')
    with tempfile.TemporaryDirectory(prefix="amlp-festival-") as tmp:
        result = _run("\n".join(script) + "\n", tmp, timeout=60 + 5 * len(texts))
    if result.returncode != 0:
        detail = "\n".join((result.stderr + result.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"festival failed (exit status {result.returncode}) on the front end: {detail}")
    phones: dict[int, list[str]] = {}
    for line in result.stdout.splitlines():
        if line.startswith("@phones "):
            index, _, rest = line[len("@phones "):].partition(":")
            phones[int(index)] = rest.split()
    missing = [i for i in range(len(texts)) if i not in phones]
    if missing:
        raise RuntimeError(f"festival printed no phones for {texts[missing[0]]!r}")
    return [phones[i] for i in range(len(texts))]


def text_to_phones(text: str) -> list[str]:
    """The phones Festival's front end gives ``text`` with the slt voice (the same as the phones of its
    synthesis, silences ``pau`` included, without synthesising the wave). ``ValueError`` for text
    :func:`check_text` rejects, ``RuntimeError`` when Festival or the voice is missing."""
    return texts_to_phones([text])[0]
