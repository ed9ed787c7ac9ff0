"""``emm.pipeline.export.onnx_session`` must not change how the rest of the process computes.

onnxruntime's ``session.set_denormal_as_zero`` switches the calling thread to flush denormal floats for the rest
of the process: after such a session, torch stores 1e-40 as 0. A stage that exports and then trains (the flow
runs every stage in one process) would then train differently. Checked in a fresh interpreter, so that no other
test's session (the speed benchmark's tuned ones do set it) decides the outcome."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from tests.conftest import REPO

CHECK = """
import sys, torch
from emm.pipeline.export import onnx_session
before = torch.tensor([1e-40]).item()
onnx_session(sys.argv[1], threads=1)
after = torch.tensor([1e-40]).item()
print(before, after)
sys.exit(0 if before != 0 and after == before else 1)
"""


def test_a_session_leaves_denormal_numbers_alone_in_the_process(tmp_path: Path) -> None:
    graph = helper.make_graph([helper.make_node("Mul", ["dense", "two"], ["logits"])], "g",
                              [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["batch", 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
                              initializer=[helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    path = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    out = subprocess.run([sys.executable, "-c", CHECK, str(path)], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, f"denormals before and after the session: {out.stdout} {out.stderr[-2000:]}"
