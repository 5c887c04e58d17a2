"""The ``amlp`` command: a thin shell over the library."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="amlp: attentive MLPs and the efficient attentions they are measured against.",
                  no_args_is_help=True, add_completion=False)
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _flag(value: bool) -> str:
    return "yes" if value else "-"


@app.command("list")
def list_command() -> None:
    """Print every registered mixer and its capabilities."""
    from .layers import list_mixers

    table = Table(title="registered mixers")
    for col in ("name", "causal", "non-causal", "cross", "padding", "step", "max length", "description"):
        table.add_column(col)
    for info in list_mixers():
        c = info.capabilities
        max_len = str(c.max_length) if c.max_length else "-"
        if c.max_length_option:
            max_len = f"{max_len if c.max_length else 'set'} by option {c.max_length_option}"
        table.add_row(escape(info.name), _flag(c.causal), _flag(c.noncausal), _flag(c.cross), _flag(c.padding),
                      _flag(c.recurrent), escape(max_len), escape(info.description))
    console.print(table)


@app.command("check")
def check_command(
    names: list[str] = typer.Argument(None, help="mixers to check (default: all)"),
    dtype: str = typer.Option("float64", help="float64: fast path vs the plain reference; bfloat16 or float16: "
                                              "the mixer in that dtype vs itself in float32"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ... (the low-precision check)"),
) -> None:
    """Compare each mixer's fast path with its plain reference (float64, with padding), or a
    low-precision run with the float32 one (``--dtype bfloat16 --device cuda``)."""
    import torch

    from .layers import list_mixers, mixer_names
    from .layers.check import check_mixer, check_mixer_precision

    names = names or [info.name for info in list_mixers()]
    unknown = [n for n in names if n not in mixer_names()]
    if unknown:
        _fail(f"unknown mixer(s) {', '.join(map(repr, unknown))}; registered mixers: {', '.join(mixer_names())}", 2)
    low = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype != "float64" and dtype not in low:
        _fail(f"--dtype must be float64, bfloat16 or float16, got {dtype!r}", 2)
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        _fail(f"--device {device!r} is not available here: {exc}", 2)
    if dtype == "float64":
        title, header = "fast path vs reference (float64)", "max abs error"
    else:
        title, header = f"{dtype} vs float32 on {device}", "largest relative error"
    table = Table(title=title)
    for col in ("mixer", "result", header, "message"):
        table.add_column(col)
    failed = 0
    for name in names:
        res = check_mixer(name) if dtype == "float64" else check_mixer_precision(name, dtype=low[dtype], device=device)
        failed += not res.passed
        table.add_row(escape(name), "[green]pass[/]" if res.passed else "[red]FAIL[/]", f"{res.max_abs_error:.2e}",
                      escape(res.message))
    console.print(table)
    if failed:
        raise typer.Exit(1)


# -- training, evaluation, studies, data ------------------------------------------------------------------
# options every `amlp study` command shares
_SEEDS = typer.Option(None, "--seeds", help="comma-separated seeds")
_STUDY_SET = typer.Option(None, "--set", help="override applied to every run, key.sub=value")
_REPORT_ONLY = typer.Option(False, "--report-only", help="only rewrite the report from recorded results")
_WRITE_DOC = typer.Option(False, "--write-doc", help="write the study's tracked document and its figures (only "
                                                     "from a complete grid)")

train_app = typer.Typer(help="Train a task from a YAML config.", no_args_is_help=True)
study_app = typer.Typer(help="Run a grid of experiments and write its report.", no_args_is_help=True)
data_app = typer.Typer(help="Fetch or build data sets.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(study_app, name="study")
app.add_typer(data_app, name="data")


@train_app.callback()
@study_app.callback()
def _before_training() -> None:
    # training processes keep freed memory for reuse (amlp.train.allocator; AMLP_RETAIN_FREED_MEMORY=0: off)
    from .train.allocator import retain_freed_memory

    retain_freed_memory()


def _error(message: str) -> None:
    """Print an error to stderr (a redirected or piped output never holds it); the message is printed
    literally (paths, keys and values may hold brackets)."""
    err_console.print("[red]error:[/] ", end="", highlight=False)
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 1):
    _error(message)
    raise typer.Exit(code)


def _describe(err: BaseException) -> str:
    """A one-line message for an error: OS errors as 'what: path', others as their text."""
    if isinstance(err, OSError) and err.strerror:
        where = f": {err.filename!r}" if err.filename else ""
        return f"{err.strerror}{where}"
    return str(err)


def _check_output_file(path: str, option: str) -> None:
    """Before any work: ``path`` ('-' is stdout) must name a file that can be written, in a folder that
    exists or can be made; else a one-line message (exit 2), so that no work is lost at the end."""
    import os

    if path == "-":
        return
    target = Path(path)
    if target.is_dir():
        _fail(f"{option} {path!r} is a folder; give a file name", 2)
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        _fail(f"cannot write {option} {path!r}: {str(folder)!r} is not a writable folder", 2)


def _saved_results_problem(exc: BaseException) -> str:
    """What is wrong with a saved results file, in words."""
    import json

    if isinstance(exc, json.JSONDecodeError):
        return f"a file is not valid JSON ({exc})"
    if isinstance(exc, KeyError):
        return f"a file lacks the key {exc}; is it a file that `amlp bench` wrote?"
    return _describe(exc)


def _make_out_dir(out: str, option: str = "--out") -> None:
    """Create an output folder before any long work, or fail with a one-line message (exit 2)."""
    import os

    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        _fail(f"{option} {out!r} cannot be created ({_describe(err)})", 2)


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        _fail(f"--threads must be >= 1, got {threads}", 2)
    import torch

    torch.set_num_threads(threads)


def _literal(message: str) -> None:
    """Print text the program did not write itself (names, paths, values) without markup."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def split_mechanisms(text: str | None) -> list[str] | None:
    """``"softmax,amlp-cov:form=official,landmarks=8"``: a new mechanism starts at each name that is
    not a ``key=value`` option; ';' always separates."""
    if not text:
        return None
    out: list[str] = []
    for group in text.split(";"):
        for part in (p.strip() for p in group.split(",")):
            if not part:
                continue
            if "=" in part and ":" not in part and out and ":" in out[-1]:
                out[-1] += "," + part
            else:
                out.append(part)
    return out or None


def _resume_free_keys() -> frozenset[str]:
    """Config keys a resumed run may change: where and how visibly it runs, and how long (to continue
    training further); every other key is the recorded run's."""
    from .train.loop import NON_PROTOCOL_KEYS

    return NON_PROTOCOL_KEYS | {"train.max_steps", "train.epochs"}


def _resumed_config(run_dir: str, config: str | None, overrides: list[str]):
    """The config of the run being resumed: the one recorded in its folder, with only the keys of
    :func:`_resume_free_keys` changed; any other difference from ``--config`` / ``--set`` is an error
    naming the key."""
    import json
    from pathlib import Path

    from .train import load_config
    from .train.config import parse_override

    recorded_path = Path(run_dir) / "config.json"
    if not recorded_path.is_file():
        if config is None:
            raise ValueError(f"{run_dir!r} holds no recorded config (config.json) to resume from; give --config")
        return load_config(config, overrides)
    try:
        recorded = json.loads(recorded_path.read_text())
    except (json.JSONDecodeError, OSError) as err:
        raise ValueError(f"{str(recorded_path)!r} cannot be read ({err})") from None
    from .train.loop import config_differences

    free_keys = _resume_free_keys()
    free = [o for o in overrides if ".".join(parse_override(o)[0]) in free_keys]
    base = load_config(raw=recorded, overrides=free)
    wanted = load_config(config, overrides) if config else load_config(raw=recorded, overrides=overrides)
    changed = config_differences(base.to_dict(), wanted.to_dict(), ignore=free_keys)
    if changed:
        shown = "; ".join(f"{k}: recorded {a!r}, given {b!r}" for k, a, b in changed[:5])
        more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
        raise ValueError(f"the run in {run_dir!r} was made with another config: {shown}{more}. --resume needs only "
                         f"--run-dir (the folder records its config); drop the contradicting --config/--set, or "
                         f"choose another --run-dir")
    return base


def _data_key(task: str | None) -> str:
    """The config key that ``--data-dir`` sets: the corpus folder for speech, the data folder elsewhere."""
    return "data.corpus" if task == "tts" else "data.data_dir"


def _train(task: str, config: str | None, overrides: list[str], run_dir: str | None, resume: bool,
           data_dir: str | None, seed: int | None) -> None:
    import json

    from .train import CheckpointError, load_config, run_experiment

    overrides = list(overrides or [])
    if data_dir:
        overrides.append(f"{_data_key(task)}={data_dir}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    if config is None and not (resume and run_dir):
        _fail("give --config (or --resume with --run-dir, to continue a run from the config it recorded)", 2)
    try:
        from pathlib import Path

        if resume and run_dir:
            cfg = _resumed_config(run_dir, config, overrides)
        else:
            cfg = load_config(config, overrides)
        if cfg.task != task:
            _fail(f"{config or run_dir} is a config for task {cfg.task!r}, not {task!r}")
        out = run_dir or str(Path("runs") / task / f"{Path(config).stem}-seed{cfg.seed}")
        result = run_experiment(cfg, out, resume=resume)
    except KeyboardInterrupt:
        console.print("interrupted; the last checkpoint is under the run directory (continue with --resume)")
        raise typer.Exit(130)
    except (ValueError, OSError, CheckpointError, FloatingPointError) as err:
        _fail(_describe(err))
    console.print_json(json.dumps({"run_dir": str(result.run_dir), "step": result.step, "val": result.val_metrics,
                                   "test": result.test_metrics, "best": result.best}))


def _make_train_command(task: str):
    def command(
        config: str = typer.Option(None, "--config", "-c",
                                   help="YAML config file (not needed with --resume --run-dir)"),
        overrides: list[str] = typer.Option(None, "--set", help="override, key.sub=value (repeatable)"),
        run_dir: str = typer.Option(None, "--run-dir", help="output folder (default runs/<task>/<config>-seed<seed>)"),
        resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in the run folder, "
                                                           "with the config the folder records"),
        data_dir: str = typer.Option(None, "--data-dir", help="folder holding the data (default $AMLP_DATA_DIR)"),
        seed: int = typer.Option(None, "--seed", help="override the config's seed"),
    ) -> None:
        _train(task, config, overrides, run_dir, resume, data_dir, seed)

    command.__doc__ = f"Train the {task} task (works under torchrun for data parallelism)."
    return command


def _register_train_commands() -> None:
    from .train.tasks import TASKS

    for task in TASKS:
        train_app.command(task)(_make_train_command(task))


_register_train_commands()


#: tasks whose data has no test split: ``amlp eval`` evaluates them on ``val`` by default
TASKS_WITHOUT_TEST = {"lm"}


def _checkpoint_task(checkpoint: str) -> str | None:
    """The task a checkpoint folder was trained on (None when it cannot be told)."""
    import json
    from pathlib import Path

    try:
        record = json.loads((Path(checkpoint) / "state.json").read_text())
        return record["config"].get("task")
    except (OSError, ValueError, AttributeError):
        return None


@app.command("eval")
def eval_command(
    checkpoint: str = typer.Option(..., "--checkpoint", help="checkpoint folder (runs/.../checkpoints/step-N or best)"),
    split: str = typer.Option(None, "--split", help="val or test (translation also: test2016, test2017, "
                                                   "mscoco2017; default: test, or val for language modelling, "
                                                   "which has no test split); speech reports MCD and MSD"),
    overrides: list[str] = typer.Option(None, "--set", help="override of the stored config, key.sub=value"),
    data_dir: str = typer.Option(None, "--data-dir", help="folder holding the data"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's)"),
) -> None:
    """Evaluate a checkpoint on a split and print its metrics as JSON."""
    import json

    from .train import CheckpointError, evaluate_checkpoint

    _set_threads(threads)
    overrides = list(overrides or [])
    if data_dir:
        overrides.append(f"{_data_key(_checkpoint_task(checkpoint))}={data_dir}")
    if split is None:
        split = "val" if _checkpoint_task(checkpoint) in TASKS_WITHOUT_TEST else "test"
    try:
        metrics = evaluate_checkpoint(checkpoint, split, overrides, device)
    except (ValueError, OSError, CheckpointError, FloatingPointError) as err:
        _fail(_describe(err))
    record = {"checkpoint": checkpoint, "split": split, **metrics}
    if "bleu" in metrics:
        from .tasks.translation.task import bleu_signature, chrf_signature

        record.update(bleu_signature=bleu_signature(), chrf_signature=chrf_signature())
    console.print_json(json.dumps(record))


@app.command("translate")
def translate_command(
    checkpoint: str = typer.Option(..., "--checkpoint", help="checkpoint folder of a translation run "
                                                            "(runs/.../checkpoints/best, averaged or step-N)"),
    input_path: str = typer.Option("-", "--input", "-i", help="file with one sentence per line ('-': stdin)"),
    output_path: str = typer.Option("-", "--output", "-o", help="where the translations go, one per line "
                                                                "('-': stdout)"),
    batch_size: int = typer.Option(64, "--batch-size", help="sentences decoded together"),
    beam: int = typer.Option(None, "--beam", help="beam size of an AR model (1: greedy; default: the config's)"),
    collapse_repeats: bool = typer.Option(None, "--collapse-repeats/--keep-repeats",
                                          help="NAR (GLAT) model: reduce runs of one repeated subword to one "
                                               "(default: the config's model.collapse_repeats)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar on stderr"),
) -> None:
    """Translate sentences with a trained model: one line in, one line out, in the same order."""
    import sys

    _set_threads(threads)
    from .tasks.translation.task import translate_lines
    from .train import CheckpointError
    from .train.loop import load_trained_model

    if batch_size < 1:
        _fail(f"--batch-size must be >= 1, got {batch_size}", 2)
    if beam is not None and beam < 1:
        _fail(f"--beam must be >= 1, got {beam}", 2)
    _check_output_file(output_path, "--output")
    try:
        if input_path == "-":
            text = sys.stdin.read()
        else:
            with open(input_path, encoding="utf-8") as fh:
                text = fh.read()
    except (OSError, UnicodeDecodeError) as err:
        _fail(f"cannot read --input {input_path!r}: {_describe(err)}", 2)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        _fail("no input: give one sentence per line on stdin or with --input", 2)
    try:
        overrides = [f"model.beam={beam}"] if beam else []
        if collapse_repeats is not None:
            overrides.append(f"model.collapse_repeats={str(collapse_repeats).lower()}")
        config, task, model = load_trained_model(checkpoint, overrides, device)
        if config.task != "translation":
            _fail(f"{checkpoint!r} is a checkpoint of task {config.task!r}, not translation")
        outputs = translate_lines(task, model, [line.rstrip("\r") for line in lines], batch_size=batch_size,
                                  progress=progress and sys.stderr.isatty())
    except (ValueError, OSError, CheckpointError) as err:
        _fail(_describe(err))
    result = "".join(line + "\n" for line in outputs)
    if output_path == "-":
        sys.stdout.write(result)
        sys.stdout.flush()
    else:
        try:
            Path(output_path).parent.mkdir(parents=True, exist_ok=True)
            with open(output_path, "w", encoding="utf-8") as fh:
                fh.write(result)
        except OSError as err:
            _fail(f"cannot write --output {output_path!r}: {_describe(err)}")


@app.command("synthesize")
def synthesize_command(
    text: str = typer.Argument(..., help="English text to say (ASCII letters, digits and punctuation)"),
    checkpoint: str = typer.Option(..., "--checkpoint", help="checkpoint folder of a tts run "
                                                            "(runs/.../checkpoints/best, averaged or step-N)"),
    output_path: str = typer.Option("speech.wav", "--output", "-o", help="wav file to write (22,050 Hz)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's)"),
) -> None:
    """Say a sentence with a trained speech model: phones from Festival's front end, mel spectrogram from
    the model, audio by Griffin-Lim, written as a wav file."""
    import time

    _set_threads(threads)
    from .tasks.tts.audio import SAMPLE_RATE, save_wav
    from .tasks.tts.festival import check_text
    from .tasks.tts.task import synthesize_text
    from .train import CheckpointError
    from .train.loop import load_trained_model

    try:
        check_text(text)
    except ValueError as err:
        _fail(str(err), 2)
    _check_output_file(output_path, "--output")
    try:
        start = time.perf_counter()
        config, task, model = load_trained_model(checkpoint, [], device)
    except (ValueError, OSError, RuntimeError, CheckpointError) as err:
        _fail(_describe(err))
    if config.task != "tts":
        _fail(f"{checkpoint!r} is a checkpoint of task {config.task!r}, not tts")
    try:
        audio, phones = synthesize_text(task, model, text)
        save_wav(output_path, audio)
    except (ValueError, OSError, RuntimeError, CheckpointError) as err:
        _fail(_describe(err))
    _literal(f"{output_path}: {len(audio) / SAMPLE_RATE:.2f} s of audio, {len(phones)} phones "
             f"({time.perf_counter() - start:.1f} s)")


@app.command("upscale")
def upscale_command(
    input_path: str = typer.Argument(..., help="a 16x16 grey face image (PNG, PGM, ...)"),
    output_path: str = typer.Argument(..., help="where the 64x64 result goes (PNG)"),
    checkpoint: str = typer.Option(..., "--checkpoint", help="checkpoint folder of an sr run "
                                                            "(runs/.../checkpoints/averaged, best or step-N)"),
    resize: bool = typer.Option(False, "--resize", help="accept an image of another size or in colour: turn it "
                                                        "into 16x16 grey first (bicubic), saying so"),
    seed: int = typer.Option(0, "--seed", help="seed of the sampler's noise"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's)"),
) -> None:
    """Super-resolve a 16x16 grey face to 64x64 with a trained SR3 model (4x)."""
    import time

    _set_threads(threads)
    from .tasks.super_resolution.task import upscale_file
    from .train import CheckpointError
    from .train.loop import load_trained_model

    _check_output_file(output_path, "the output")
    try:
        start = time.perf_counter()
        config, task, model = load_trained_model(checkpoint, [], device)
        if config.task != "sr":
            _fail(f"{checkpoint!r} is a checkpoint of task {config.task!r}, not sr")
        note = upscale_file(task, model, input_path, output_path, resize=resize, seed=seed)
    except (ValueError, OSError, CheckpointError) as err:
        _fail(_describe(err))
    if note:
        _literal(note)
    _literal(f"{output_path}: 64x64 ({time.perf_counter() - start:.1f} s)")


@app.command("generate")
def generate_command(
    checkpoint: str = typer.Option(..., "--checkpoint", help="checkpoint folder of an lm run "
                                                            "(runs/.../checkpoints/best or step-N)"),
    prompt: str = typer.Option("\n", "--prompt", "-p", show_default=False,
                               help="text to continue; every character must be in the model's vocabulary "
                                    "(default: a newline)"),
    max_new_tokens: int = typer.Option(500, "--max-new-tokens", "-n", help="characters to generate"),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="softmax temperature; 0 = greedy "
                                                                       "(deterministic)"),
    top_k: int = typer.Option(None, "--top-k", help="sample among the k most likely characters only"),
    top_p: float = typer.Option(None, "--top-p", help="nucleus sampling: among the most likely characters whose "
                                                      "probability reaches p (0 < p <= 1)"),
    seed: int = typer.Option(0, "--seed", help="seed of the sampling"),
    echo: bool = typer.Option(True, "--echo/--no-echo", help="print the prompt before its continuation"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's)"),
) -> None:
    """Continue a prompt with a trained character model, printing each character as it comes (stdout)
    and the speed at the end (stderr)."""
    import sys

    _set_threads(threads)
    from .tasks.lm.data import UnknownCharactersError
    from .tasks.lm.text import generate_text
    from .train import CheckpointError

    if max_new_tokens < 0:
        _fail(f"--max-new-tokens must be >= 0, got {max_new_tokens}", 2)
    if not temperature >= 0 or temperature == float("inf"):  # NaN fails ">= 0" too
        _fail(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}", 2)
    if top_k is not None and top_k < 1:
        _fail(f"--top-k must be >= 1, got {top_k}", 2)
    if top_p is not None and not 0 < top_p <= 1:
        _fail(f"--top-p must be in (0, 1], got {top_p}", 2)
    if not prompt:
        _fail("--prompt is empty; give at least one character", 2)

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    state = {"started": False, "last": prompt[-1]}

    def stream(ch: str) -> None:
        if echo and not state["started"]:
            show(prompt)
        state["started"], state["last"] = True, ch
        show(ch)

    try:
        result = generate_text(checkpoint, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed, stream=stream, device=device)
    except UnknownCharactersError as err:
        _fail(str(err), 2)
    except (ValueError, OSError, CheckpointError) as err:
        _fail(_describe(err))
    if echo and not state["started"]:
        show(prompt)
    if (state["started"] or echo) and state["last"] != "\n":
        show("\n")
    print(f"{max_new_tokens} characters in {result.seconds:.2f} s: {result.tokens_per_second:.1f} tokens/s "
          f"(prompt of {len(prompt)} characters: {result.prompt_seconds:.2f} s)", file=sys.stderr, flush=True)


def _split_list(text: str | None, sep: str = ",") -> list[str] | None:
    return [t.strip() for t in text.split(sep) if t.strip()] if text else None


def _int_list(text: str | None, option: str) -> list[int] | None:
    try:
        return [int(t) for t in _split_list(text)] if text else None
    except ValueError:
        _fail(f"{option} must be comma-separated integers, got {text!r}", 2)


def _study_command(name: str, config: str) -> str:
    """The command line a study's report names: the one typed, or its plain form from Python."""
    import shlex

    if sys.argv[1:2] == ["study"]:
        return "amlp " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return f"amlp study {name} --config {config}"


def _run_study(run) -> None:
    """Run a study, turning an interrupt and the errors users hit into one-line messages."""
    from .train import CheckpointError

    try:
        run()
    except KeyboardInterrupt:
        console.print("interrupted; run the same command again to continue")
        raise typer.Exit(130)
    except (ValueError, OSError, CheckpointError, FloatingPointError) as err:
        _fail(_describe(err))


_MECHANISMS_HELP = ("mechanisms separated by ';' or ',' (name or name:key=value,...; a key=value after ',' goes on "
                    "with the options of the name before; default: the study's)")


@study_app.command("forecasting")
def study_forecasting_command(
    config: str = typer.Option("configs/forecasting/study/cpu.yaml", "--config", "-c", help="study file"),
    mechanisms: str = typer.Option(None, "--mechanisms", help=_MECHANISMS_HELP),
    datasets: str = typer.Option(None, "--datasets", help="comma-separated, e.g. ETTh1,ETTm1"),
    settings: str = typer.Option(None, "--settings", help="comma-separated, e.g. M,S"),
    seeds: str = _SEEDS,
    overrides: list[str] = _STUDY_SET,
    data_dir: str = typer.Option(None, "--data-dir", help="folder holding the data"),
    doc_only: bool = _REPORT_ONLY,
    write_doc: bool = _WRITE_DOC,
) -> None:
    """Run the cross-attention study (mechanisms x datasets x settings x seeds), resuming where it
    stopped, and write its report next to the results (<run_root>/report.md), or with --write-doc
    the study's document (docs/results/...), which needs every cell of the grid."""
    from .train.study_forecasting import load_study, run_study

    extra = list(overrides or [])
    if data_dir:
        extra.append(f"data.data_dir={data_dir}")
    command = _study_command("forecasting", config)
    seed_list = _int_list(seeds, "--seeds")
    _run_study(lambda: run_study(load_study(config), command=command, mechanisms=split_mechanisms(mechanisms),
                                 datasets=_split_list(datasets), settings=_split_list(settings), seeds=seed_list,
                                 extra_overrides=extra, log=_literal, doc_only=doc_only, write_doc=write_doc))


@study_app.command("recall")
def study_recall_command(
    config: str = typer.Option("configs/recall/study/cpu.yaml", "--config", "-c", help="study file"),
    mechanisms: str = typer.Option(None, "--mechanisms", help=_MECHANISMS_HELP),
    tasks: str = typer.Option(None, "--tasks", help="comma-separated: copying,mqar (default: both)"),
    string_lens: str = typer.Option(None, "--string-lens", help="comma-separated S for copying"),
    pairs: str = typer.Option(None, "--pairs", help="comma-separated key-value pair counts for MQAR"),
    dims: str = typer.Option(None, "--dims", help="comma-separated model widths"),
    seeds: str = _SEEDS,
    overrides: list[str] = _STUDY_SET,
    doc_only: bool = _REPORT_ONLY,
    write_doc: bool = _WRITE_DOC,
) -> None:
    """Run the recall study (mixers x S or pairs x dims x seeds), resuming where it stopped, and write
    its report and plots next to the results, or with --write-doc docs/results/recall.md (complete
    grid only)."""
    from .train.study_recall import load_recall_study, run_recall_study

    command = _study_command("recall", config)
    values = {k: v for k, v in (("copying", _int_list(string_lens, "--string-lens")),
                                ("mqar", _int_list(pairs, "--pairs"))) if v}
    dim_list, seed_list = _int_list(dims, "--dims"), _int_list(seeds, "--seeds")
    _run_study(lambda: run_recall_study(
        load_recall_study(config), command=command, mechanisms=split_mechanisms(mechanisms), tasks=_split_list(tasks),
        values=values, dims=dim_list, seeds=seed_list, extra_overrides=list(overrides or []), log=_literal,
        doc_only=doc_only, write_doc=write_doc))


@study_app.command("translation")
def study_translation_command(
    config: str = typer.Option("configs/translation/study/cpu.yaml", "--config", "-c", help="study file"),
    rows: str = typer.Option(None, "--rows", help="semicolon-separated rows, e.g. 'transformer/softmax;glat/abc:landmarks=16' "
                                                  "(default: the study's)"),
    directions: str = typer.Option(None, "--directions", help="comma-separated: en-de,de-en (default: the study's)"),
    seeds: str = _SEEDS,
    overrides: list[str] = _STUDY_SET,
    doc_only: bool = _REPORT_ONLY,
    write_doc: bool = _WRITE_DOC,
    rescore: bool = typer.Option(False, "--rescore", help="score the finished cells again from their checkpoints "
                                                          "with the current code, instead of training"),
    retime: bool = typer.Option(False, "--retime", help="time the finished cells' decoding again, one after "
                                                        "another in one pass (on a quiet machine), instead of "
                                                        "training"),
) -> None:
    """Run the translation study (AR and GLAT rows x directions x seeds; the NAR rows distil from the AR
    softmax teacher, trained first), resuming where it stopped, and write its report next to the
    results, or with --write-doc docs/results/translation.md (complete grid only)."""
    from .tasks.translation.study import load_translation_study, run_translation_study

    seed_list = _int_list(seeds, "--seeds")
    command = _study_command("translation", config)
    _run_study(lambda: run_translation_study(
        load_translation_study(config), command=command, rows=_split_list(rows, ";"),
        directions=_split_list(directions), seeds=seed_list, extra_overrides=list(overrides or []), log=_literal,
        doc_only=doc_only, write_doc=write_doc, rescore=rescore, retime=retime))


@study_app.command("tts")
def study_tts_command(
    config: str = typer.Option("configs/tts/study/cpu.yaml", "--config", "-c", help="study file"),
    rows: str = typer.Option(None, "--rows", help="semicolon-separated rows, e.g. 'fastspeech2/softmax;"
                                                  "transformer-tts/abc' (default: the study's)"),
    seeds: str = _SEEDS,
    overrides: list[str] = _STUDY_SET,
    doc_only: bool = _REPORT_ONLY,
    write_doc: bool = _WRITE_DOC,
) -> None:
    """Run the speech study (FastSpeech 2 and Transformer-TTS rows x seeds, and the rank ablation),
    resuming where it stopped, and write its report next to the results, or with --write-doc
    docs/results/tts.md and its figures (complete grid only)."""
    from .tasks.tts.study import load_tts_study, run_tts_study

    seed_list = _int_list(seeds, "--seeds")
    command = _study_command("tts", config)
    _run_study(lambda: run_tts_study(
        load_tts_study(config), command=command, rows=_split_list(rows, ";"), seeds=seed_list,
        extra_overrides=list(overrides or []), log=_literal, doc_only=doc_only, write_doc=write_doc))


@study_app.command("sr")
def study_sr_command(
    config: str = typer.Option("configs/sr/study/cpu.yaml", "--config", "-c", help="study file"),
    mechanisms: str = typer.Option(None, "--mechanisms", help=_MECHANISMS_HELP),
    seeds: str = _SEEDS,
    overrides: list[str] = _STUDY_SET,
    doc_only: bool = _REPORT_ONLY,
    write_doc: bool = _WRITE_DOC,
) -> None:
    """Run the super-resolution study (SR3 with each attention mechanism x seeds on ORL faces), resuming
    where it stopped, and write its report next to the results, or with --write-doc
    docs/results/super_resolution.md and its figure (complete grid only)."""
    from .tasks.super_resolution.study import load_sr_study, run_sr_study

    seed_list = _int_list(seeds, "--seeds")
    command = _study_command("sr", config)
    _run_study(lambda: run_sr_study(
        load_sr_study(config), command=command, mechanisms=split_mechanisms(mechanisms), seeds=seed_list,
        extra_overrides=list(overrides or []), log=_literal, doc_only=doc_only, write_doc=write_doc))


@study_app.command("lm")
def study_lm_command(
    config: str = typer.Option("configs/lm/study/cpu.yaml", "--config", "-c", help="study file"),
    mechanisms: str = typer.Option(None, "--mechanisms", help=_MECHANISMS_HELP),
    sizes: str = typer.Option(None, "--sizes", help="comma-separated parameter budgets (default: the study's)"),
    seeds: str = _SEEDS,
    overrides: list[str] = _STUDY_SET,
    doc_only: bool = _REPORT_ONLY,
    write_doc: bool = _WRITE_DOC,
    retime: bool = typer.Option(False, "--retime", help="time the finished cells' training steps and generation "
                                                        "again, one after another in one pass (on a quiet "
                                                        "machine), instead of training"),
) -> None:
    """Run the language-modelling study (causal mixers x matched sizes x seeds on tiny Shakespeare),
    resuming where it stopped, and write its report next to the results, or with --write-doc
    docs/results/lm.md and its learning-curve figure (complete grid only)."""
    from .tasks.lm.study import load_lm_study, run_lm_study

    seed_list, size_list = _int_list(seeds, "--seeds"), _int_list(sizes, "--sizes")
    command = _study_command("lm", config)
    _run_study(lambda: run_lm_study(
        load_lm_study(config), command=command, mechanisms=split_mechanisms(mechanisms), sizes=size_list,
        seeds=seed_list, extra_overrides=list(overrides or []), log=_literal, doc_only=doc_only, write_doc=write_doc,
        retime=retime))


@study_app.command("mad")
def study_mad_command(
    config: str = typer.Option("configs/mad/study/cpu.yaml", "--config", "-c", help="study file"),
    mechanisms: str = typer.Option(None, "--mechanisms", help=_MECHANISMS_HELP[:-1] + "; ablation rows included)"),
    tasks: str = typer.Option(None, "--tasks", help="comma-separated MAD tasks (default: the study's)"),
    seeds: str = _SEEDS,
    overrides: list[str] = _STUDY_SET,
    doc_only: bool = _REPORT_ONLY,
    write_doc: bool = _WRITE_DOC,
) -> None:
    """Run the MAD study (causal mixers and HyperMLP ablations x the six MAD tasks x seeds), resuming
    where it stopped, and write its report next to the results, or with --write-doc
    docs/results/mad.md (complete grid only)."""
    from .tasks.mad.study import load_mad_study, run_mad_study

    seed_list = _int_list(seeds, "--seeds")
    command = _study_command("mad", config)
    _run_study(lambda: run_mad_study(
        load_mad_study(config), command=command, mechanisms=split_mechanisms(mechanisms), tasks=_split_list(tasks),
        seeds=seed_list, extra_overrides=list(overrides or []), log=_literal, doc_only=doc_only, write_doc=write_doc))


@data_app.command("synth-tts")
def data_synth_tts_command(
    out: str = typer.Option("data/tts-slt", "--out", help="corpus folder (resumable: run again to continue)"),
    data_dir: str = typer.Option(None, "--data-dir", help="folder holding multi30k/ (default $AMLP_DATA_DIR, "
                                                         "else ../shared/data beside the repository)"),
    train: int = typer.Option(6000, "--train", help="training sentences"),
    val: int = typer.Option(250, "--val", help="validation sentences"),
    test: int = typer.Option(250, "--test", help="test sentences"),
    seed: int = typer.Option(0, "--seed", help="seed of the sentence selection"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar on stderr"),
) -> None:
    """Build a single-speaker English speech corpus with Festival (CMU ARCTIC slt voice) from Multi30k
    captions: 22,050 Hz audio, 80-band log-mel, phones with exact durations, pitch and energy."""
    from .tasks.tts.corpus import build_synth_corpus
    from .tasks.tts.festival import check_festival

    for name, value in (("--train", train), ("--val", val), ("--test", test)):
        if value < 1:
            _fail(f"{name} must be >= 1, got {value}", 2)
    try:
        check_festival()
    except RuntimeError as err:
        _fail(str(err))
    _make_out_dir(out)
    try:
        summary = build_synth_corpus(out, data_dir=data_dir, train=train, val=val, test=test, seed=seed,
                                     progress=progress)
    except KeyboardInterrupt:
        console.print("interrupted; run the same command again to continue")
        raise typer.Exit(130)
    except (ValueError, OSError, RuntimeError) as err:
        _fail(_describe(err))
    _literal(f"{summary['root']}: {summary['utterances']} utterances ({summary['synthesised']} synthesised now, "
             f"{summary['seconds']:.0f} s)")


@data_app.command("download")
def data_download_command(
    name: str = typer.Argument(..., help="data set: ett"),
    data_dir: str = typer.Option(None, "--data-dir", help="destination folder (default: $AMLP_DATA_DIR, else "
                                                          "../shared/data beside the checkout when it exists, "
                                                          "else ./data)"),
    base_url: str = typer.Option(None, "--base-url", help="where to fetch from (default: the upstream repository)"),
) -> None:
    """Download a data set from its upstream source (the only command that uses the network)."""
    if name.lower() != "ett":
        _fail(f"unknown data set {name!r}; available: ett")
    from .tasks.forecasting.data import ETT_BASE_URL, download_ett

    try:
        paths = download_ett(data_dir, base_url=base_url or ETT_BASE_URL)
    except ConnectionError as err:
        _fail(str(err))
    except OSError as err:  # the destination is a file, or not writable
        _fail(f"cannot write into --data-dir: {_describe(err)}", 2)
    for p in paths:
        _literal(str(p))
# -- amlp bench ------------------------------------------------------------------------------------
bench_app = typer.Typer(help="Measure mixers: time, peak memory, crossover lengths, generation study.",
                        no_args_is_help=True, add_completion=False)
app.add_typer(bench_app, name="bench")


def _pick(value, quick: bool, quick_value, full_value):
    """An option left unset takes the --quick default or the full default."""
    if value is not None:
        return value
    return quick_value if quick else full_value


def _run_with_progress(run, settings, description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(description, total=None)
        return run(settings, total=lambda n: progress.update(task, total=n),
                   progress=lambda desc: progress.update(task, advance=1, description=f"{description}: {desc}"))


def _save(save, result, out: str, plots: bool) -> list[str]:
    from .bench import plots_available

    if plots and not plots_available():
        console.print("[yellow]plots skipped:[/] they need matplotlib: pip install matplotlib (or pass --no-plots)")
        plots = False
    return save(result, out, plots=plots)


@bench_app.command("ops")
def bench_ops_command(
    mixers: str = typer.Option("softmax,amlp-cov,amlp-pquery", help="registered mixers, comma-separated"),
    lengths: str = typer.Option(None, help="lengths: '256,512' or '256:8192' (doubling) (default 256:8192; "
                                           "with --quick 256,512,1024)"),
    batch: int = typer.Option(1, help="batch size B"),
    heads: int = typer.Option(None, help="heads H (default 8; with --quick 4)"),
    head_dim: int = typer.Option(None, help="head dim D (default 64; with --quick 32)"),
    landmarks: int = typer.Option(16, help="c, passed as 'landmarks' to mixers that take it"),
    form: str = typer.Option("stable", help="AMLP's form (it has no default; timing differs little between forms)"),
    dtype: str = typer.Option("float32", help="float32, float64, bfloat16, float16"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    level: str = typer.Option("op", help="op: mixer.mix_heads on [B,T,H,D]; layer: the whole module on [B,T,E]"),
    causal: bool = typer.Option(False, help="measure causal forms (mixers without one are skipped)"),
    padding: float = typer.Option(0.0, help="fraction of each row's positions that are padding (its last ones), "
                                            "masked out through the mixer's masks (0: no masks)"),
    baseline: str = typer.Option("softmax", help="mixer the others are compared with (added when not in --mixers; 'none': no comparison)"),
    min_run_time: float = typer.Option(None, help="seconds of timing per point (default 1; with --quick 0.05)"),
    memory: bool = typer.Option(True, help="measure peak memory"),
    threads: int = typer.Option(None, help="torch threads, 0 for torch's default (default 0; with --quick 1)"),
    bandwidth_mb: int = typer.Option(None, help="buffer size of the bandwidth copy (default 256; with --quick 64)"),
    counts: bool = typer.Option(True, help="count ATen operator calls and matmul FLOPs of each point (untimed "
                                           "calls of their own) and its fraction of the measured matmul rate"),
    matmul_size: int = typer.Option(2048, help="side of the square torch.mm that measures the matmul rate"),
    out: str = typer.Option("bench-results", help="output folder"),
    plots: bool = typer.Option(True, help="write PNG plots"),
    quick: bool = typer.Option(False, help="a short run: fewer lengths, smaller sizes, shorter timing, one thread"),
) -> None:
    """Time and peak memory of mixers over a length sweep, crossover lengths, distance to the
    memory-bandwidth floor, ATen operator calls and fraction of the machine's matmul rate."""
    from .bench import OpsSettings, parse_lengths, parse_names, run_ops, save_ops
    from .bench.report import crossover_table, ops_table

    try:
        settings = OpsSettings(
            mixers=parse_names(mixers), lengths=parse_lengths(_pick(lengths, quick, "256,512,1024", "256:8192")),
            batch=batch, heads=_pick(heads, quick, 4, 8), head_dim=_pick(head_dim, quick, 32, 64),
            landmarks=landmarks, form=form, dtype=dtype, device=device, level=level, causal=causal, padding=padding,
            baseline=baseline, min_run_time=_pick(min_run_time, quick, 0.05, 1.0), memory=memory,
            threads=_pick(threads, quick, 1, 0),
            bandwidth_mb=_pick(bandwidth_mb, quick, 64, 256), counts=counts, matmul_size=matmul_size)
        settings.validate()
    except ValueError as exc:
        _error(str(exc))
        raise typer.Exit(2)
    _make_out_dir(out)
    result = _run_with_progress(run_ops, settings, "bench ops")
    console.print(ops_table(result.rows, settings.baseline))
    console.print(crossover_table(result.crossovers))
    bw = result.header["bandwidth_bytes_per_s"]
    console.print(f"memory bandwidth (copy): {bw / 1e9:.1f} GB/s; 'fwd x floor' = forward time / time to read the "
                  f"inputs and write the output once at that bandwidth")
    mm = result.header["matmul_flops_per_s"]
    if mm:
        console.print(f"matmul rate ({matmul_size}x{matmul_size} {dtype} torch.mm): {mm / 1e9:.1f} GFLOP/s; "
                      f"'% of peak' = matrix-product FLOPs of the call / its time / that rate (elementwise work "
                      f"is not counted)")
    paths = _save(save_ops, result, out, plots)
    _literal("wrote " + ", ".join(paths))
    if any(r["status"] in ("failed", "error") for r in result.rows):
        raise typer.Exit(1)


@bench_app.command("peers")
def bench_peers_command(
    pairs: str = typer.Option(None, help="pairs, comma-separated (default: all): softmax, performer, local, nystrom, "
                                         "linformer, amlp-cov-released, amlp-pquery-released"),
    lengths: str = typer.Option(None, help="lengths: '256,512' or '256:4096' (doubling) (default 256:4096; "
                                           "with --quick 256,512)"),
    batch: int = typer.Option(1, help="batch size B"),
    heads: int = typer.Option(None, help="heads H (default 8; with --quick 4)"),
    head_dim: int = typer.Option(None, help="head dim D (default 64; with --quick 32)"),
    landmarks: int = typer.Option(16, help="c: Nystromformer landmarks and the AMLP hidden width"),
    wsize: int = typer.Option(15, help="local attention window (keys with |i - j| <= wsize // 2)"),
    features: int = typer.Option(64, help="m, the Performer's random features"),
    proj_len: int = typer.Option(64, help="k, Linformer's projected length"),
    dtype: str = typer.Option("float32", help="float32, float64, bfloat16, float16"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    min_run_time: float = typer.Option(None, help="seconds of timing per side, point and mode (default 1; with "
                                                  "--quick 0.05)"),
    rounds: int = typer.Option(None, help="alternating rounds (amlp, peer / peer, amlp) the timing is split into "
                                          "(default 3; with --quick 2)"),
    memory: bool = typer.Option(True, help="measure peak memory (CUDA; on a Linux CPU through a forked child process)"),
    threads: int = typer.Option(None, help="torch threads, 0 for torch's default (default 1)"),
    released_amlp: str = typer.Option(None, "--released-amlp",
                                      help="path of amlp.py in a local checkout of Shark-NLP/AttentiveMLP: compare its "
                                           "AMLPCov / AMLPQuery with amlp's form='official'"),
    out: str = typer.Option("bench-results", help="output folder"),
    quick: bool = typer.Option(False, help="a short run: two lengths, smaller sizes, shorter timing, one thread"),
) -> None:
    """amlp's mixers side by side with other implementations (performer-pytorch, local-attention,
    nystrom-attention, linformer, PyTorch's SDPA, the authors' released AMLP): time of each, ratio."""
    from .bench.peers import PAIRS, PeersSettings, run_peers, save_peers
    from .bench.report import peers_setup_table, peers_table
    from .bench.sweep import parse_lengths, parse_names

    try:
        settings = PeersSettings(
            pairs=parse_names(pairs) if pairs else list(PAIRS),
            lengths=parse_lengths(_pick(lengths, quick, "256,512", "256:4096")),
            batch=batch, heads=_pick(heads, quick, 4, 8), head_dim=_pick(head_dim, quick, 32, 64),
            landmarks=landmarks, wsize=wsize, features=features, proj_len=proj_len, dtype=dtype, device=device,
            min_run_time=_pick(min_run_time, quick, 0.05, 1.0), rounds=_pick(rounds, quick, 2, 3), memory=memory,
            threads=1 if threads is None else threads, released_amlp=released_amlp)
        settings.validate()
    except ValueError as exc:
        _error(str(exc))
        raise typer.Exit(2)
    _make_out_dir(out)
    try:
        result = _run_with_progress(run_peers, settings, "bench peers")
    except ValueError as exc:  # the released code failed to import
        _error(str(exc))
        raise typer.Exit(2)
    console.print(peers_table(result.rows))
    for r in result.rows:
        if r["status"] in ("not installed", "not measured"):
            _literal(f"{r['pair']}: {r['message']}")
    console.print(peers_setup_table(result.rows))
    _literal(f"peak memory: {result.header['memory_method']}")
    paths = save_peers(result, out)
    _literal("wrote " + ", ".join(paths))
    if any(r["status"] == "error" for r in result.rows):
        raise typer.Exit(1)


@bench_app.command("generation")
def bench_generation_command(
    lengths: str = typer.Option(None, help="tokens to produce (default 256:8192; with --quick 64,128,256)"),
    batch: int = typer.Option(None, help="batch size (default 12 on GPU, 2 on CPU; with --quick 1)"),
    dim: int = typer.Option(None, help="model width E (default 512; with --quick 64)"),
    heads: int = typer.Option(None, help="heads (default 8; with --quick 2)"),
    layers: int = typer.Option(None, help="decoder layers, mixer + MLP each (default 2; with --quick 1)"),
    ar_mixer: str = typer.Option("softmax", help="causal mixer with a recurrent step for AR decoding"),
    nar_mixers: str = typer.Option("softmax,amlp-cov,amlp-pquery", help="mixers of the NAR passes"),
    landmarks: int = typer.Option(64, help="c of the mixers that take 'landmarks' (paper: 64)"),
    form: str = typer.Option("stable", help="AMLP's form (it has no default; timing differs little between forms)"),
    activation: str = typer.Option("relu", help="sigma_1 of the mixers that take 'activation' (paper: relu)"),
    dtype: str = typer.Option("float32", help="float32, float64, bfloat16, float16"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, ..."),
    min_run_time: float = typer.Option(None, help="seconds of timing per point (default 1; with --quick 0.05)"),
    memory: bool = typer.Option(True, help="measure peak memory"),
    threads: int = typer.Option(None, help="torch threads, 0 for torch's default (default 0; with --quick 1)"),
    out: str = typer.Option("bench-results", help="output folder"),
    plots: bool = typer.Option(True, help="write PNG plots"),
    quick: bool = typer.Option(False, help="a short run: fewer lengths, smaller sizes, shorter timing, one thread"),
) -> None:
    """The AMLP paper's efficiency study (Appendix G): AR with a KV cache vs one NAR pass with
    softmax attention vs one NAR pass with AMLP."""
    from .bench import GenerationSettings, parse_lengths, parse_names, run_generation, save_generation
    from .bench.report import generation_table, headline_table

    try:
        settings = GenerationSettings(
            lengths=parse_lengths(_pick(lengths, quick, "64,128,256", "256:8192")),
            batch=_pick(batch, quick, 1, 0), dim=_pick(dim, quick, 64, 512), heads=_pick(heads, quick, 2, 8),
            layers=_pick(layers, quick, 1, 2), ar_mixer=ar_mixer, nar_mixers=parse_names(nar_mixers),
            landmarks=landmarks, form=form, activation=activation, dtype=dtype, device=device,
            min_run_time=_pick(min_run_time, quick, 0.05, 1.0), memory=memory, threads=_pick(threads, quick, 1, 0))
        settings.validate()
    except ValueError as exc:
        _error(str(exc))
        raise typer.Exit(2)
    _make_out_dir(out)
    result = _run_with_progress(run_generation, settings, "bench generation")
    console.print(generation_table(result.rows))
    console.print(headline_table(result.headline))
    paths = _save(save_generation, result, out, plots)
    _literal("wrote " + ", ".join(paths))
    if any(r["status"] in ("failed", "error") for r in result.rows):
        raise typer.Exit(1)


@bench_app.command("plot")
def bench_plot_command(out: str = typer.Argument("bench-results", help="folder holding ops.json / generation.json")) -> None:
    """Draw the PNG plots again from saved results."""
    from .bench import plots_available, replot

    if not plots_available():
        _error("plots need matplotlib: pip install matplotlib")
        raise typer.Exit(2)
    try:
        paths = replot(out)
    except FileNotFoundError as exc:
        _error(str(exc))
        raise typer.Exit(2)
    except (ValueError, KeyError, TypeError, OSError) as exc:  # a results file that is not one
        _fail(f"cannot read the saved results in {out!r}: {_saved_results_problem(exc)}", 2)
    _literal("wrote " + ", ".join(paths))


@bench_app.command("step")
def bench_step_command(
    mixers: str = typer.Option("softmax,causal-rn,amlp-cov", help="causal mixers with a recurrent step"),
    positions: str = typer.Option("100,10000", help="positions t at which a step is timed"),
    steps: int = typer.Option(50, help="steps timed at each position"),
    dim: int = typer.Option(256, help="model width E"),
    heads: int = typer.Option(4, help="heads"),
    batch: int = typer.Option(1, help="batch size"),
    dtype: str = typer.Option("float32", help="float32, float64, bfloat16, float16"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, ..."),
    threads: int = typer.Option(0, help="torch threads, 0 for torch's default"),
    out: str = typer.Option("bench-results", help="output folder"),
    form: str = typer.Option("stable", help="AMLP's form: paper or stable (it has no default, and no official "
                                             "causal form)"),
) -> None:
    """Cost of one recurrent step at different positions (constant for a fixed-size state)."""
    from .bench.report import fmt_ratio, fmt_time, write_csv, write_json
    from .bench.step import STEP_COLUMNS, StepSettings, run_step
    from .bench.sweep import parse_names

    try:
        try:
            position_list = [int(p) for p in positions.split(",")]
        except ValueError:
            raise ValueError(f"--positions must be comma-separated integers, got {positions!r}") from None
        settings = StepSettings(mixers=parse_names(mixers), positions=position_list,
                                steps=steps, batch=batch, dim=dim, heads=heads, dtype=dtype, device=device,
                                threads=threads, form=form)
        settings.validate()
    except ValueError as exc:
        _error(str(exc))
        raise typer.Exit(2)
    _make_out_dir(out)
    header, rows = run_step(settings, progress=lambda text: _literal(f"  measured {text}"))
    table = Table(title="one recurrent step at position t")
    for col in ("mixer", "t", "time per step", "vs first t", "state floats", "status"):
        table.add_column(col)
    for r in rows:
        table.add_row(escape(r["mixer"]), str(r["position"]), fmt_time(r.get("seconds_per_step")),
                      fmt_ratio(r.get("ratio_to_first_position"), 2), str(r.get("state_floats", "-")),
                      escape(r["status"] if r["status"] == "ok" else f"{r['status']}: {r['message']}"))
    console.print(table)
    import os

    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "step.csv"), header, rows, STEP_COLUMNS)
    write_json(os.path.join(out, "step.json"), {"header": header, "rows": rows})
    _literal(f"wrote {out}/step.csv, {out}/step.json")
    if any(r["status"] != "ok" for r in rows):
        raise typer.Exit(1)


@bench_app.command("report")
def bench_report_command(
    out: str = typer.Argument("bench-results", help="folder holding ops.json / generation.json"),
    doc: str = typer.Option(None, "--doc", help="write into this Markdown file (replacing its generated block)"),
    section: str = typer.Option("results", "--section", help="name of the generated block in --doc"),
) -> None:
    """Print saved results as Markdown tables, or write them into a document."""
    from .bench.markdown import report_markdown, update_document

    if not section.strip():
        _fail("--section must name the generated block", 2)
    try:
        body = report_markdown(out)
    except FileNotFoundError as exc:
        _error(str(exc))
        raise typer.Exit(2)
    except (ValueError, KeyError, TypeError, OSError) as exc:  # a results file that is not one
        _fail(f"cannot read the saved results in {out!r}: {_saved_results_problem(exc)}", 2)
    if doc:
        try:
            update_document(doc, section, body)
        except OSError as exc:
            _fail(f"cannot write --doc {doc!r}: {_describe(exc)}")
        _literal(f"wrote the {section!r} block of {doc}")
    else:
        print(body)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
