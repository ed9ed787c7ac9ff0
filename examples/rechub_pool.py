"""Worked example: torch-rechub models trained outside EMM, fused with EMM's own pool on Census-Income.

    source scripts/env.sh
    python examples/rechub_pool.py --mirror ../shared/data            # the full data (~30 min on 2 cores)
    python examples/rechub_pool.py --raw-dir SLICE --epochs 2         # a quick run on a raw slice

What it does, in ``--workdir`` (default ``artifacts/rechub-example``), with its own params.yaml and MLflow store:
1. fetch and ingest Census-Income (income, marital);
2. train two torch-rechub models with torch-rechub's own ``CTRTrainer`` on EMM's batches
   (``emm.data.batches.UserBatches``, dict convention): a DCN for marital, saved as factory + safetensors with
   its encoding sidecar; a DCNv2 (stacked) for income, logged with ``mlflow.pytorch.log_model`` with its
   encoding, registered as ``rechub-income`` and aliased ``prod``;
3. write a pool of params.yaml's four built-in models plus those two (``factory: rechub_models:build`` and
   ``uri: models:/rechub-income@prod``), and run pretrain (built-ins trained, rechub models imported),
   decompose (identical alignment first: the DCN shares no layer, so the error names ``align: project``,
   which is then used), fuse and evaluate (registered as ``emm-census-income``);
4. print every member's test AUC and the fused model's, and write them to ``results.json``.

The same pool runs from the CLI once this folder is importable:
``PYTHONPATH=examples emm pretrain census-income --params <workdir>/params.yaml`` (and decompose, fuse, evaluate).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # rechub_models: the module the factory entry names
sys.path.insert(0, str(HERE.parent))  # emm itself, from a checkout

import mlflow  # noqa: E402
import mlflow.pytorch  # noqa: E402
import rechub_models  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from rich.console import Console  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch_rechub.trainers import CTRTrainer  # noqa: E402

from emm.cli import pool_table  # noqa: E402
from emm.data.batches import UserBatches, save_encoding  # noqa: E402
from emm.errors import EMMError  # noqa: E402
from emm.pipeline.decompose import decompose_stage  # noqa: E402
from emm.pipeline.evaluate import evaluate_stage  # noqa: E402
from emm.pipeline.fuse import fuse_stage  # noqa: E402
from emm.pipeline.ingest import fetch_stage, ingest_stage  # noqa: E402
from emm.pipeline.pretrain import pretrain_stage  # noqa: E402
from emm.runtime import set_quiet_env, setup_logging  # noqa: E402
from emm.tracking.external import log_encoding  # noqa: E402
from emm.tracking.store import configure  # noqa: E402

DATASET = "census-income"
console = Console()


def write_params(work: Path, pool: list[dict], align: str = "identical") -> Path:
    """The repository's params.yaml with this example's folders, pool and alignment."""
    params = yaml.safe_load((HERE.parent / "params.yaml").read_text())
    params["paths"] = {"raw_root": str(work / "data"), "artifacts": str(work / "artifacts")}
    params["tracking"] = {"store": str(work / "mlruns"), "log_models": True}
    params["pretrain"]["pool"] = {DATASET: pool}
    params["decompose"]["align"] = align
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def train_rechub(model: torch.nn.Module, data_dir: Path, task: str, out: Path, epochs: int) -> float:
    """torch-rechub's own trainer on EMM's batches; returns the best validation AUC it saw."""
    train = UserBatches(data_dir, "train", tasks=task, inputs="dict", batch_size=1024, shuffle=True, seed=2026)
    val = UserBatches(data_dir, "val", tasks=task, inputs="dict", batch_size=8192)
    out.mkdir(parents=True, exist_ok=True)
    trainer = CTRTrainer(model, optimizer_params={"lr": 1e-3, "weight_decay": 1e-6}, n_epoch=epochs,
                         earlystop_patience=2, model_path=str(out))
    trainer.fit(train, val)
    return float(trainer.early_stopper.best_auc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="artifacts/rechub-example")
    parser.add_argument("--mirror", default=None, help="local folder with census-income/ raw files")
    parser.add_argument("--raw-dir", default=None, help="use these raw files instead of fetching")
    parser.add_argument("--epochs", type=int, default=10, help="at most this many epochs per torch-rechub model")
    args = parser.parse_args()
    set_quiet_env()
    setup_logging()
    torch.manual_seed(2026)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    builtin = yaml.safe_load((HERE.parent / "params.yaml").read_text())["pretrain"]["pool"][DATASET]

    params = write_params(work, builtin)
    if args.raw_dir is None:
        fetch_stage(DATASET, params, mirror=Path(args.mirror) if args.mirror else None)
    ingest_stage(DATASET, params, raw_dir=Path(args.raw_dir) if args.raw_dir else None)
    data_dir = work / "artifacts" / DATASET / "data"

    # 2. two torch-rechub models, trained outside EMM
    dcn_kwargs = {"kind": "dcn", "data_dir": str(data_dir)}
    dcn = rechub_models.build(**dcn_kwargs)
    own = {"marital-rechub-dcn": train_rechub(dcn, data_dir, "marital", work / "models" / "dcn", args.epochs)}
    weights = work / "models" / "marital-dcn.safetensors"
    save_file(dcn.state_dict(), str(weights))
    save_encoding(weights, data_dir)
    dcnv2 = rechub_models.build("dcnv2", str(data_dir))
    own["income-rechub-dcnv2"] = train_rechub(dcnv2, data_dir, "income", work / "models" / "dcnv2", args.epochs)
    configure(work / "mlruns")
    mlflow.set_experiment("rechub-models")
    with mlflow.start_run(run_name="income-dcnv2"):
        info = mlflow.pytorch.log_model(dcnv2, name="model", serialization_format="pickle",
                                        pip_requirements=["torch==2.13.0", "torch-rechub==0.9.0"],
                                        registered_model_name="rechub-income")
        log_encoding(data_dir)
    mlflow.MlflowClient().set_registered_model_alias("rechub-income", "prod", str(info.registered_model_version))

    # 3. one pool: the built-in models and the two outside ones
    pool = builtin + [
        {"name": "income-rechub-dcnv2", "task": "income", "uri": "models:/rechub-income@prod", "trust_pickle": True,
         "inputs": "dict", "output": "probability"},
        {"name": "marital-rechub-dcn", "task": "marital", "factory": "rechub_models:build", "kwargs": dcn_kwargs,
         "weights": str(weights), "inputs": "dict", "output": "probability"},
    ]
    params = write_params(work, pool)
    entries = pretrain_stage(DATASET, params, progress=False)
    console.print(pool_table(f"{DATASET}: pool", entries))
    try:
        decompose_stage(DATASET, params)
        align = "identical"
    except EMMError as exc:
        console.print(f"[yellow]identical alignment refused:[/] {str(exc).splitlines()[-1]}", highlight=False)
        params, align = write_params(work, pool, align="project"), "project"
        plan, _ = decompose_stage(DATASET, params)
        console.print(plan.report(), highlight=False)
    fuse_stage(DATASET, params, progress=False)
    summary = evaluate_stage(DATASET, params)

    # 4. the numbers
    results = {"align": align, "minutes": round((time.perf_counter() - started) / 60, 1),
               "rechub_own_best_val_auc": own,
               "members": [{"name": e.name, "source": e.source, "task": e.task, "val_auc": e.val_auc,
                            "test_auc": e.test_auc} for e in entries],
               "fused": {t: {"test_auc": r["auc"], "pool_mean": r["pool_mean_auc"], "pool_best": r["pool_best_auc"]}
                         for t, r in summary["tasks"].items()},
               "registered_version": summary.get("registered_version")}
    (work / "results.json").write_text(json.dumps(results, indent=2))
    for m in results["members"]:
        console.print(f"  {m['name']:<22} {m['source']:<8} {m['task']:<8} test AUC {m['test_auc']:.5f}")
    for task, r in results["fused"].items():
        console.print(f"  EMM fused ({align}) {task:<8} test AUC {r['test_auc']:.5f}  (pool mean {r['pool_mean']:.5f}, "
                      f"best {r['pool_best']:.5f})")
    console.print(f"wrote {work / 'results.json'} in {results['minutes']} min")


if __name__ == "__main__":
    main()
