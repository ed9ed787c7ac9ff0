"""Send fusion training to a GPU machine when one is there: the ``gpu`` work pool and the ``emm-fuse/gpu``
deployment (see ``prefect.yaml`` and the README's "Run it three ways").

Why a deployment instead of a remote call: a worker started with ``prefect worker start --pool gpu`` on a
GPU machine (same repository, same artifacts folder, e.g. a shared mount) picks the run up; emm selects
CUDA by itself (``device: auto``). With no such worker online the main flow simply fuses in-process.
"""

from __future__ import annotations

from emm.errors import EMMError

GPU_POOL = "gpu"
FUSE_DEPLOYMENT = "emm-fuse/gpu"


def gpu_pool_online(pool: str = GPU_POOL) -> bool:
    """Whether work pool ``pool`` exists and at least one of its workers is online (recent heartbeat)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            return False
        workers = client.read_workers_for_work_pool(pool)
    return any(str(getattr(w.status, "value", w.status)).upper() == "ONLINE" for w in workers)


def fuse_on_gpu_pool(dataset: str, params: str, deployment: str = FUSE_DEPLOYMENT) -> None:
    """Run the fuse flow through its deployment and wait; raise with the remote run's message if it fails.

    The remote run writes ``fused/`` into the shared artifacts folder, which the caller then reads.
    """
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters={"dataset": dataset, "params": params}, timeout=None)
    state = run.state
    if state is None or not state.is_completed():
        name = state.name if state else "without a state"
        raise EMMError(f"fusion training on deployment {deployment} (flow run {run.name}) ended {name}: "
                       f"{state.message if state else ''}; see that run's logs on the gpu worker")
