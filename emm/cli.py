"""``emm``: one command per pipeline stage. Each command is a thin call into the library. Commands from
outside the library (the paper harness's ``benchmark`` and ``relatedness``) join through the ``emm.commands``
entry point (``_mount_commands``), so emm never imports them.

User errors (``EMMError``) print their message and exit 2, without a traceback; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Annotated, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from emm.errors import EMMError
from emm.runtime import set_quiet_env, setup_logging

app = typer.Typer(
    help="EMM: fuse trained single-task models into one multi-task model.\n\n"
    "Stages: fetch-data -> ingest -> pretrain -> decompose -> fuse -> evaluate -> promote; compress (@fast).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)  # messages name paths: never hard-wrap them (no terminal in CI, pipes)
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable)

ParamsOpt = Annotated[Optional[Path], typer.Option("--params", help="params.yaml to read (default: ./params.yaml)")]


def user_errors(fn: F) -> F:
    """Turn EMMError into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        set_quiet_env()
        setup_logging()
        try:
            return fn(*args, **kwargs)
        except EMMError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False, markup=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


@app.command("fetch-data")
@user_errors
def fetch_data_cmd(
    dataset: Annotated[str, typer.Argument(help="census-income, aliexpress, ali-ccp, or a declared dataset")],
    mirror: Annotated[Optional[Path], typer.Option(help="local folder holding <dataset>/ raw files (no network)")] = None,
    dest: Annotated[Optional[Path], typer.Option(help="default: <paths.raw_root>/<dataset>")] = None,
    params: ParamsOpt = None,
) -> None:
    """Fill data/<dataset>/ with the raw files, from a local mirror or the official source; verify checksums."""
    from emm.pipeline.ingest import fetch_stage

    for line in fetch_stage(dataset, params, mirror=mirror, dest=dest):
        console.print(f"  {line}")
    console.print(f"raw files of {dataset} are ready")


@app.command("ingest")
@user_errors
def ingest_cmd(
    dataset: Annotated[str, typer.Argument(help="census-income, aliexpress, ali-ccp, or a declared dataset")],
    raw_dir: Annotated[Optional[Path], typer.Option(help="folder with the raw files (default data/<dataset>)")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(help="default artifacts/<dataset>/data")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="comma-separated task names (default from params.yaml)")] = None,
    params: ParamsOpt = None,
) -> None:
    """Raw files -> train/val/test.parquet, schema.json and vocabulary.parquet (bounded memory, atomic)."""
    from emm.pipeline.ingest import ingest_stage

    started = time.perf_counter()
    schema = ingest_stage(dataset, params, raw_dir=raw_dir, out_dir=out_dir,
                          tasks=tasks.split(",") if tasks else None)
    table = Table(title=f"{dataset}  ({time.perf_counter() - started:.1f}s)")
    table.add_column("split")
    table.add_column("rows", justify="right")
    for t in schema.task_names:
        table.add_column(f"{t} rate", justify="right")
    for split, n in schema.rows.items():
        table.add_row(split, f"{n:,}", *[f"{t.positive_rate[split]:.4f}" for t in schema.tasks])
    console.print(table)
    console.print(f"{schema.n_sparse} sparse features (vocabulary {schema.total_vocab:,}), "
                  f"{schema.n_dense} dense, tasks {schema.task_names}")


@app.command("pretrain")
@user_errors
def pretrain_cmd(
    dataset: Annotated[str, typer.Argument(help="an ingested dataset")],
    resume: Annotated[bool, typer.Option("--resume", help="skip finished models, continue an interrupted one")] = False,
    only: Annotated[Optional[str], typer.Option(help="comma-separated pool model names to train")] = None,
    no_track: Annotated[bool, typer.Option("--no-track", help="do not log to MLflow")] = False,
    params: ParamsOpt = None,
) -> None:
    """Train the single-task model pool (params.yaml pretrain.pool), log to MLflow, write pool/."""
    from emm.pipeline.pretrain import pretrain_stage

    entries = pretrain_stage(dataset, params, resume=resume, only=only.split(",") if only else None,
                             track=not no_track, progress=sys.stderr.isatty() and _is_main_rank())
    if not _is_main_rank():  # under torchrun: rank 0 reports
        return
    console.print(pool_table(f"{dataset}: single-task pool", entries))


def pool_table(title: str, entries: list, labelled: dict[str, dict[str, int]] | None = None,
               costs: dict | None = None) -> Table:
    """Every pool member: where it came from, its task, size, epochs (0/0 = imported) and AUCs; with
    ``labelled`` (pool.json's ``labelled_rows``), the train/val rows labelled for its task, which it trained,
    early-stopped and was scored on (a scarce task's members saw only those); with ``costs``
    (``emm.pipeline.costs.pool_costs``), its FLOPs per row."""
    table = Table(title=title)
    columns = ["model", "source", "task", "params", *(["FLOPs/row"] if costs is not None else []), "epochs",
               *(["labelled train/val"] if labelled else []), "val AUC", "test AUC", "encoding"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "source", "task", "encoding") else "right",
                         overflow="fold")
    for e in entries:
        rows = (labelled or {}).get(e.name)
        counts = [f"{rows['train']:,}/{rows['val']:,}" if rows else "?"] if labelled else []
        flops = [f"{costs[e.name].flops_per_row:,}" if e.name in costs else "?"] if costs is not None else []
        table.add_row(e.name, member_source(e), e.task, f"{e.params:,}", *flops, f"{e.best_epoch}/{e.epochs_run}",
                      *counts, f"{e.val_auc:.5f}", f"{e.test_auc:.5f}",
                      e.origin.encoding if e.origin else "trained here")
    return table


def member_source(entry) -> str:  # noqa: ANN001 - a PoolEntry (imported lazily with the stage)
    """``builtin mlp``, ``factory pkg.mod:build``, ``mlflow models:/NAME/3``, ``file models/income.txt``."""
    if entry.origin is None:
        return f"builtin {entry.spec.arch}"
    origin = entry.origin
    return f"{entry.source} {origin.factory or origin.resolved_uri or origin.uri or origin.weights_file}"


pool_app = typer.Typer(help="The model pool: what can be fused.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")


@pool_app.command("list")
@user_errors
def pool_list_cmd(
    dataset: Annotated[str, typer.Argument(help="a dataset with a pool (emm pretrain)")],
    params: ParamsOpt = None,
) -> None:
    """Every member of pool/: source (built-in, factory, MLflow), task, params, FLOPs per row, val/test AUC; and
    what the fused model costs to score, as trained and as saved (pruned)."""
    from emm.pipeline.costs import pool_costs, saved_fused_cost
    from emm.pipeline.pretrain import pool_entries, pool_labelled_rows

    folder, entries = pool_entries(dataset, params)
    console.print(pool_table(f"{dataset}: pool ({folder})", entries, pool_labelled_rows(folder),
                             pool_costs(dataset, params)))
    fused = saved_fused_cost(dataset, params)
    if fused is not None:
        saved, trained = fused["saved"], fused["unpruned"]
        console.print(f"fused model: {saved['flops_per_row']:,} FLOPs per row, {saved['parameters']:,} parameters "
                      f"(as trained: {trained['flops_per_row']:,} FLOPs per row, {trained['parameters']:,} "
                      f"parameters; pruned: {', '.join((fused['pruned'] or {}).get('why', {})) or 'nothing'})",
                      highlight=False)


@app.command("decompose")
@user_errors
def decompose_cmd(
    dataset: Annotated[str, typer.Argument(help="a dataset with a trained pool")],
    params: ParamsOpt = None,
) -> None:
    """Cut every pool model at the layers they all share (Algorithm 1); write and print the plan."""
    from emm.pipeline.decompose import decompose_stage

    plan, _ = decompose_stage(dataset, params)
    console.print(plan.report(), highlight=False, soft_wrap=True)


@app.command("fuse")
@user_errors
def fuse_cmd(
    dataset: Annotated[str, typer.Argument(help="a dataset with a decomposed pool")],
    resume: Annotated[bool, typer.Option("--resume", help="continue from the last epoch checkpoint")] = False,
    no_track: Annotated[bool, typer.Option("--no-track", help="do not log to MLflow")] = False,
    params: ParamsOpt = None,
) -> None:
    """Build the AKF model on the frozen components and train it; write fused/."""
    from emm.pipeline.fuse import fuse_stage

    result = fuse_stage(dataset, params, resume=resume, track=not no_track,
                        progress=sys.stderr.isatty() and _is_main_rank())
    if not _is_main_rank():  # under torchrun: rank 0 reports
        return
    for task, m in result.test.items():
        console.print(f"  {task}: test AUC {m['auc']:.5f}  logloss {m['logloss']:.5f}")
    console.print(f"  {result.fit.epochs_run} epochs (best {result.fit.best_epoch}), {result.fit.seconds:.0f}s")


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    dataset: Annotated[str, typer.Argument(help="a dataset with a fused model")],
    no_register: Annotated[bool, typer.Option("--no-register", help="do not register in MLflow")] = False,
    params: ParamsOpt = None,
) -> None:
    """Per task: EMM − donor stack (paired 95% CI) first, then test AUC and Gain vs the pool; metrics.json, plot;
    register as emm-<dataset> @challenger."""
    from emm.pipeline.evaluate import cost_line, evaluate_stage, summary_lines, summary_table
    from emm.tracking.store import registered_name

    summary = evaluate_stage(dataset, params, register=not no_register)
    console.print(f"{dataset}: what fusion added over the donor stack (logistic regression on the pool's logits):")
    for line in summary_lines(summary):
        console.print(f"  {line}", markup=False, highlight=False)
    columns, rows = summary_table(summary)
    table = Table(title=f"{dataset}: fused model vs its pool (test, {summary['rows_test']:,} rows)")
    for col in columns:
        table.add_column(col, justify="left" if col in ("task", "verdict") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(cost_line(summary), markup=False, highlight=False)
    console.print("CIs: paired bootstrap over each task's labelled test rows (metrics.json `ci` also has EMM − "
                  "ensemble)")
    if summary.get("registered_version"):
        how = "reused (same fused weights)" if summary.get("registered_reused") else "registered"
        console.print(f"{how} {registered_name(dataset)} version {summary['registered_version']} (alias challenger)")


EXIT_NOT_PROMOTED = 3  # promote ran fine and decided no: neither a crash (1) nor a user error (2)


@app.command("promote")
@user_errors
def promote_cmd(
    dataset: Annotated[str, typer.Argument(help="dataset whose registered model to promote")],
    version: Annotated[Optional[str], typer.Option(help="version to promote (default: the challenger)")] = None,
    params: ParamsOpt = None,
) -> None:
    """Move alias champion to the challenger only if its mean test AUC beats the champion's.

    Exit codes: 0 promoted; 3 not promoted (the candidate does not beat the champion, or already is it);
    2 a user error (no such model or version, a version that is not a number); 1 a crash.
    """
    from emm.pipeline.register import promote_stage

    promoted, reason = promote_stage(dataset, params, version=version)
    console.print(reason)
    if not promoted:
        raise typer.Exit(code=EXIT_NOT_PROMOTED)


@app.command("predict")
@user_errors
def predict_cmd(
    model_uri: Annotated[str, typer.Option("--model-uri", help="models:/emm-<dataset>@champion (or @challenger, "
                                           "/<version>), runs:/<run id>/model, or a model folder")],
    input: Annotated[Path, typer.Option("--input", help="CSV or Parquet of raw feature rows")],
    output: Annotated[Path, typer.Option("--output", help="CSV or Parquet of score_<task> columns")],
    params: ParamsOpt = None,
) -> None:
    """Batch-score raw rows; unscorable rows go to <output>.rejected.csv with the reason.

    The input names the model's raw feature columns in a header row (the ingested names; other columns,
    such as labels, are ignored), with values as text, integers or floats. A CSV without a header row
    that has all the columns of the dataset's declaration (a raw UCI Census file, gzipped or not) is read
    in the declaration's column order. The input is never written: an --output that is the input, or whose
    rejects file is (score fixed rejects into a new name), is refused. No code from the model folder is
    run: EMM rebuilds the model from its bundle. Exit codes: 0 scored (rejects, if any, are reported); 2 a
    user error; 1 a crash.
    """
    import atexit
    import gc

    from emm.pipeline.predict import predict_stage

    # The process ends after this command: frozen at exit, the objects still alive (torch's and pandas' modules
    # above all) are not walked again by the interpreter's last collections, which is most of a short run's exit.
    atexit.register(gc.freeze)
    report = predict_stage(model_uri, input, output, params)
    if report.headerless:
        console.print(f"{input} has no header row: read in the column order of the dataset's declaration")
    console.print(f"scored {report.scored:,} rows -> {report.output}")
    if report.rejected:
        console.print(f"[yellow]rejected {report.rejected:,} rows[/] -> {report.rejects}")


@app.command("export")
@user_errors
def export_cmd(
    dataset: Annotated[str, typer.Argument(help="a dataset with a fused model")],
    fmt: Annotated[str, typer.Option("--format", help="export format (onnx)")] = "onnx",
    model_uri: Annotated[Optional[str], typer.Option(
        "--model-uri", help="registered version to log the export to, e.g. models:/emm-census-income/3 "
        "(default: the challenger, if it was registered from this fused/)")] = None,
    no_log: Annotated[bool, typer.Option("--no-log", help="only write the file; log nothing to MLflow")] = False,
    params: ParamsOpt = None,
) -> None:
    """Export the fused model for fast scoring: artifacts/<dataset>/export/fused.onnx ((sparse, dense) -> logits,
    dynamic batch), checked against torch with onnxruntime, and logged to the registered version's run."""
    from emm.pipeline.export import export_stage

    report = export_stage(dataset, params, fmt=fmt, model_uri=model_uri, log_model=not no_log)
    console.print(f"exported {report.path}: max |onnxruntime - torch| {report.max_abs_diff:.2e} on logits, "
                  f"{report.max_abs_diff_probability:.2e} on probabilities, {report.rows_checked:,} validation rows "
                  f"({report.seconds:.0f}s)")
    if report.version:
        console.print(f"logged to version {report.version} (run {report.run_id}) under export/")
    elif report.note:
        console.print(f"[yellow]{report.note}[/]", highlight=False)


@app.command("compress")
@user_errors
def compress_cmd(
    dataset: Annotated[str, typer.Argument(help="a dataset with a fused model (emm fuse; emm evaluate registers it)")],
    no_register: Annotated[bool, typer.Option("--no-register", help="do not register in MLflow")] = False,
    params: ParamsOpt = None,
) -> None:
    """Distil the fused model into one small multi-task network (params.yaml compress: a FLOPs budget); compare
    it with the fused model on the test rows (paired 95% CIs); write compact/ (weights, ONNX, compact.json);
    register it as emm-<dataset> @fast only when within compress.max_auc_loss of the fused model on every task.

    Exit code 0 also when it is not within the bound (it is then not registered, and says why)."""
    from emm.pipeline.compress import compress_stage, summary_lines

    record = compress_stage(dataset, params, register=not no_register, progress=sys.stderr.isatty())
    for line in summary_lines(record):
        console.print(f"  {line}", markup=False, highlight=False)


def _is_main_rank() -> bool:
    """False in torchrun's ranks other than 0 (pretrain/fuse run DDP there; rank 0 alone reports)."""
    import os

    return os.environ.get("RANK", "0") == "0"


@app.command("synth")
@user_errors
def synth_cmd(
    rows: Annotated[Optional[int], typer.Option(help="total rows over train/val/test (default synth.rows)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="output folder (default artifacts/<synth.dataset>/data)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="default synth.seed")] = None,
    params: ParamsOpt = None,
) -> None:
    """A synthetic AliExpress-layout dataset with planted task relations, ready to train on (bounded memory)."""
    from emm.pipeline.ingest import synth_stage

    started = time.perf_counter()
    schema = synth_stage(params, rows=rows, out_dir=out, seed=seed)
    console.print(f"{schema.dataset}: {sum(schema.rows.values()):,} rows {dict(schema.rows)} in "
                  f"{time.perf_counter() - started:.1f}s; rates "
                  + ", ".join(f"{t.name} {t.positive_rate['train']:.4f}" for t in schema.tasks))


def _mount_commands() -> None:
    """Commands other installed packages add to ``emm``: each entry point of the group ``emm.commands`` names a
    function that takes this app. Why: the paper harness (harness/, outside the library) adds ``emm benchmark``
    and ``emm relatedness`` this way, so emm never imports it, and an install without it has no such commands.
    A package whose commands fail to load is named on stderr; the stages still run."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="emm.commands"):
        try:
            ep.load()(app)
        except Exception as exc:  # noqa: BLE001 - a broken add-on must not take the stages down with it
            err_console.print(f"[yellow]warning:[/] the `emm` commands of {ep.value} were not added: {exc}",
                              highlight=False, soft_wrap=True)


_mount_commands()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
