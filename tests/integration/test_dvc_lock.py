"""``dvc.lock`` on main must describe the code and params on main.

Why: a stale lock makes a user's first ``dvc repro`` after the main command rerun every stage (the code deps
it records differ from the checkout's), which on Census is the whole pipeline again. CI runs on a clean clone,
where the data and the stage outputs are absent (DVC reports those as deleted or not in cache: expected);
what must not differ is a code dep (``emm/...``) or a params section. When this fails after a change to
``emm/`` or ``params.yaml``, refresh the lock from a real run: the main command, then ``dvc commit -f``
(or ``dvc repro``), and commit ``dvc.lock``.
"""

from __future__ import annotations

import json

from tests.conftest import REPO
from tests.integration.repo_copy import dvc

OUTSIDE_THE_CODE = ("data/", "artifacts/")  # raw data and stage outputs: absent on a clean clone


def dvc_status() -> dict:
    out = dvc(["status", "--json"], REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout or "{}")


def stale_inputs(status: dict) -> dict[str, list[str]]:
    """Per stage, the code deps and params sections whose recorded hashes differ from the checkout's."""
    stale: dict[str, list[str]] = {}
    for stage, changes in status.items():
        for change in changes:
            if not isinstance(change, dict):  # e.g. "always changed", "changed command"
                stale.setdefault(stage, []).append(str(change))
                continue
            for path, what in (change.get("changed deps") or {}).items():
                if isinstance(what, dict):  # params.yaml: {section: modified|new|deleted}
                    stale.setdefault(stage, []).extend(f"{path}:{section} {how}" for section, how in what.items())
                elif not path.startswith(OUTSIDE_THE_CODE):
                    stale.setdefault(stage, []).append(f"{path} {what}")
            if change.get("changed command"):
                stale.setdefault(stage, []).append("command changed")
    return stale


def test_every_stage_in_dvc_yaml_is_in_the_lock():
    import yaml

    stages = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    locked = set(yaml.safe_load((REPO / "dvc.lock").read_text())["stages"])
    assert stages == locked, f"dvc.lock lacks {sorted(stages - locked)} / has extra {sorted(locked - stages)}"


def test_the_lock_matches_the_code_and_params():
    stale = stale_inputs(dvc_status())
    assert not stale, ("dvc.lock is stale against this checkout (the first `dvc repro` would rerun these stages): "
                       f"{stale}. Refresh it from a real run (the main command, then `dvc commit -f`) and commit it")
