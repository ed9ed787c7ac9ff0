# Sourced by the scripts: the project's venv first on PATH, telemetry off, Prefect state inside the project.
export PATH="$PWD/.venv/bin:$PATH"
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
