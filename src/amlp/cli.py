"""The ``amlp`` command: a thin shell over the library."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="amlp: attentive MLPs and the efficient attentions they are measured against.",
                  no_args_is_help=True, add_completion=False)
console = Console(width=None if sys.stdout.isatty() else 160)


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
        table.add_row(info.name, _flag(c.causal), _flag(c.noncausal), _flag(c.cross), _flag(c.padding),
                      _flag(c.recurrent), max_len, info.description)
    console.print(table)


@app.command("check")
def check_command(names: list[str] = typer.Argument(None, help="mixers to check (default: all)")) -> None:
    """Compare each mixer's fast path with its plain reference (float64, with padding)."""
    from .layers import list_mixers
    from .layers.check import check_mixer

    names = names or [info.name for info in list_mixers()]
    table = Table(title="fast path vs reference (float64)")
    for col in ("mixer", "result", "max abs error", "message"):
        table.add_column(col)
    failed = 0
    for name in names:
        res = check_mixer(name)
        failed += not res.passed
        table.add_row(name, "[green]pass[/]" if res.passed else "[red]FAIL[/]", f"{res.max_abs_error:.2e}", res.message)
    console.print(table)
    if failed:
        raise typer.Exit(1)


# -- training, evaluation, studies, data ------------------------------------------------------------------
train_app = typer.Typer(help="Train a task from a YAML config.", no_args_is_help=True)
study_app = typer.Typer(help="Run a grid of experiments and write its report.", no_args_is_help=True)
data_app = typer.Typer(help="Fetch data sets.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(study_app, name="study")
app.add_typer(data_app, name="data")


def _fail(message: str, code: int = 1):
    console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _train(task: str, config: str, overrides: list[str], run_dir: str | None, resume: bool,
           data_dir: str | None, seed: int | None) -> None:
    import json

    from .train import CheckpointError, load_config, run_experiment

    overrides = list(overrides or [])
    if data_dir:
        overrides.append(f"data.data_dir={data_dir}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    try:
        cfg = load_config(config, overrides)
        if cfg.task != task:
            _fail(f"{config} is a config for task {cfg.task!r}, not {task!r}")
        from pathlib import Path

        out = run_dir or str(Path("runs") / task / f"{Path(config).stem}-seed{cfg.seed}")
        result = run_experiment(cfg, out, resume=resume)
    except KeyboardInterrupt:
        console.print("interrupted; the last checkpoint is under the run directory (continue with --resume)")
        raise typer.Exit(130)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        _fail(str(err))
    console.print_json(json.dumps({"run_dir": str(result.run_dir), "step": result.step, "val": result.val_metrics,
                                   "test": result.test_metrics, "best": result.best}))


def _make_train_command(task: str):
    def command(
        config: str = typer.Option(..., "--config", "-c", help="YAML config file"),
        overrides: list[str] = typer.Option(None, "--set", help="override, key.sub=value (repeatable)"),
        run_dir: str = typer.Option(None, "--run-dir", help="output folder (default runs/<task>/<config>-seed<seed>)"),
        resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in the run folder"),
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


@app.command("eval")
def eval_command(
    checkpoint: str = typer.Option(..., "--checkpoint", help="checkpoint folder (runs/.../checkpoints/step-N or best)"),
    split: str = typer.Option("test", "--split", help="val or test"),
    overrides: list[str] = typer.Option(None, "--set", help="override of the stored config, key.sub=value"),
    data_dir: str = typer.Option(None, "--data-dir", help="folder holding the data"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
) -> None:
    """Evaluate a checkpoint on a split and print its metrics as JSON."""
    import json

    from .train import CheckpointError, evaluate_checkpoint

    overrides = list(overrides or [])
    if data_dir:
        overrides.append(f"data.data_dir={data_dir}")
    try:
        metrics = evaluate_checkpoint(checkpoint, split, overrides, device)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        _fail(str(err))
    console.print_json(json.dumps({"checkpoint": checkpoint, "split": split, **metrics}))


@study_app.command("forecasting")
def study_forecasting_command(
    config: str = typer.Option("configs/forecasting/study/cpu.yaml", "--config", "-c", help="study file"),
    mechanisms: str = typer.Option(None, "--mechanisms", help="comma-separated mixer names (default: the study's)"),
    datasets: str = typer.Option(None, "--datasets", help="comma-separated, e.g. ETTh1,ETTm1"),
    settings: str = typer.Option(None, "--settings", help="comma-separated, e.g. M,S"),
    seeds: str = typer.Option(None, "--seeds", help="comma-separated seeds"),
    overrides: list[str] = typer.Option(None, "--set", help="override applied to every run, key.sub=value"),
    data_dir: str = typer.Option(None, "--data-dir", help="folder holding the data"),
    doc_only: bool = typer.Option(False, "--report-only", help="only rewrite the report from recorded results"),
) -> None:
    """Run the cross-attention study (mechanisms x datasets x settings x seeds), resuming where it
    stopped, and write docs/results/forecasting.md."""
    import shlex

    from .train import CheckpointError
    from .train.study_forecasting import load_study, run_study

    def split(text):
        return [t.strip() for t in text.split(",") if t.strip()] if text else None

    extra = list(overrides or [])
    if data_dir:
        extra.append(f"data.data_dir={data_dir}")
    command = "amlp " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["study"] else \
        f"amlp study forecasting --config {config}"
    try:
        run_study(load_study(config), command=command, mechanisms=split(mechanisms), datasets=split(datasets),
                  settings=split(settings), seeds=[int(s) for s in split(seeds)] if seeds else None,
                  extra_overrides=extra, log=console.print, doc_only=doc_only)
    except KeyboardInterrupt:
        console.print("interrupted; run the same command again to continue")
        raise typer.Exit(130)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        _fail(str(err))


@study_app.command("recall")
def study_recall_command(
    config: str = typer.Option("configs/recall/study/cpu.yaml", "--config", "-c", help="study file"),
    mechanisms: str = typer.Option(None, "--mechanisms", help="comma-separated mixer names (default: the study's)"),
    tasks: str = typer.Option(None, "--tasks", help="comma-separated: copying,mqar (default: both)"),
    string_lens: str = typer.Option(None, "--string-lens", help="comma-separated S for copying"),
    pairs: str = typer.Option(None, "--pairs", help="comma-separated key-value pair counts for MQAR"),
    dims: str = typer.Option(None, "--dims", help="comma-separated model widths"),
    seeds: str = typer.Option(None, "--seeds", help="comma-separated seeds"),
    overrides: list[str] = typer.Option(None, "--set", help="override applied to every run, key.sub=value"),
    doc_only: bool = typer.Option(False, "--report-only", help="only rewrite the report from recorded results"),
) -> None:
    """Run the recall study (mixers x S or pairs x dims x seeds), resuming where it stopped, and write
    docs/results/recall.md with its plots."""
    import shlex

    from .train import CheckpointError
    from .train.study_recall import load_recall_study, run_recall_study

    def split(text):
        return [t.strip() for t in text.split(",") if t.strip()] if text else None

    def ints(text):
        return [int(t) for t in split(text)] if text else None

    command = "amlp " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["study"] else \
        f"amlp study recall --config {config}"
    values = {k: v for k, v in (("copying", ints(string_lens)), ("mqar", ints(pairs))) if v}
    try:
        run_recall_study(load_recall_study(config), command=command, mechanisms=split(mechanisms), tasks=split(tasks),
                         values=values, dims=ints(dims), seeds=ints(seeds), extra_overrides=list(overrides or []),
                         log=console.print, doc_only=doc_only)
    except KeyboardInterrupt:
        console.print("interrupted; run the same command again to continue")
        raise typer.Exit(130)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        _fail(str(err))


@data_app.command("download")
def data_download_command(
    name: str = typer.Argument(..., help="data set: ett"),
    data_dir: str = typer.Option(None, "--data-dir", help="destination folder (default $AMLP_DATA_DIR or ./data)"),
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
    for p in paths:
        console.print(str(p))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
