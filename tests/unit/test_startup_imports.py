"""``emm predict`` imports only what scoring needs: a short run is mostly start-up, and scikit-learn, SciPy, MLflow
and the other heavy packages below each take longer to import than scoring a few rows.

In a fresh interpreter: everything ``emm predict`` imports before it reads a row (the CLI, the stage, the model
lookup, the scorer), the modules of every builder a bundle may name, and a built periodic numeric embedding (the
Census models' dense features), then none of the heavy packages may be loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("sklearn", "scipy", "mlflow", "sqlalchemy", "alembic", "lightgbm", "xgboost", "onnx", "onnxruntime",
         "prefect", "matplotlib")

PREDICT_IMPORTS = """
import json, sys
import emm.cli
import emm.pipeline.predict, emm.tracking.loading, emm.tracking.scorer
from emm.tracking.scorer import BUILDERS, resolve_builder
for name in BUILDERS:
    resolve_builder(name, "test")
from emm.models.embedding import NumericOptions, PeriodicNumeric
PeriodicNumeric(3, NumericOptions(mode="periodic"))
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_emm_predict_loads_no_heavy_package():
    out = subprocess.run([sys.executable, "-c", PREDICT_IMPORTS], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "torch" in loaded and "emm" in loaded  # the check saw the real imports
    assert not loaded & set(HEAVY), f"emm predict imports {sorted(loaded & set(HEAVY))}"
