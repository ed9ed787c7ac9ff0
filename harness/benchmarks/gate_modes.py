"""Fusion-gate ablation on the real pool: the paper's hard argmax vs the gradient-carrying modes.

Same pool, same components, same seed and trainer; only ``fuse.fusion_gate`` changes. Needs the
pipeline's artifacts (ingest, pretrain, decompose). Writes nothing outside a temporary folder.
    python -m harness.benchmarks.gate_modes [--dataset census-income] [--modes hard,scaled,ste]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from emm.pipeline.params import load_params
from emm.pipeline.fuse import fuse
from emm.pipeline.layout import stage_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="census-income")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--modes", default="hard,scaled,ste")
    args = parser.parse_args()
    cfg = load_params(args.params)
    d = args.dataset
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            fcfg = cfg.fuse.model_copy(update={"fusion_gate": mode})
            r = fuse(d, stage_dir(cfg, d, "data"), stage_dir(cfg, d, "pool"), stage_dir(cfg, d, "components"),
                     Path(tmp) / mode, Path(tmp) / f"{mode}-work", fcfg, cfg.decompose, progress=False)
            rows.append((mode, r.test, r.fit.epochs_run, r.fit.seconds))
            print(f"{mode:7s} " + "  ".join(f"{t} {m['auc']:.5f}" for t, m in r.test.items())
                  + f"  ({r.fit.epochs_run} epochs, {r.fit.seconds:.0f}s)", flush=True)
    print("\n| fusion_gate | " + " | ".join(f"{t} test AUC" for t in rows[0][1]) + " | epochs |")
    print("|---|" + "---|" * (len(rows[0][1]) + 1))
    for mode, test, epochs, _ in rows:
        print(f"| {mode} | " + " | ".join(f"{m['auc']:.5f}" for m in test.values()) + f" | {epochs} |")


if __name__ == "__main__":
    main()
