"""The ``emm-fuse`` flow: only the fusion-training stage, so it can be deployed on the ``gpu`` work pool
(deployment ``emm-fuse/gpu`` in prefect.yaml) and called by the main ``emm`` flow through
``run_deployment``. It holds no logic: one call into ``emm.pipeline.fuse.fuse_stage``.
"""

from __future__ import annotations

import logging
import os

from emm.runtime import set_quiet_env

set_quiet_env()
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "emm")

from prefect import flow, get_run_logger  # noqa: E402

from emm.pipeline.fuse import fuse_stage  # noqa: E402

logging.getLogger("emm").setLevel(logging.INFO)  # Prefect attaches its handlers to "emm" but leaves the level


@flow(name="emm-fuse", log_prints=True)
def fuse_flow(dataset: str = "census-income", params: str = "params.yaml") -> dict:
    """Train the fused (AKF) model on the saved pool and components; CUDA is picked when present."""
    result = fuse_stage(dataset, params, progress=False)
    aucs = {t: m["auc"] for t, m in result.test.items()}
    get_run_logger().info("fused test AUC: %s", aucs)
    return aucs


if __name__ == "__main__":
    fuse_flow()
