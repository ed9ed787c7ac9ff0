"""Bad outside pool members, one test each: each stops `emm pretrain` with an EMMError that names the
entry and the fix, before pool/ is written (an outside member listed first is imported before anything
is trained); a pool that leaves a task without a model, or a member no alignment can cut, is stopped by
`emm decompose` before components/ is written."""

from __future__ import annotations

import importlib
import itertools
import json
import logging

import mlflow
import mlflow.pytorch
import pytest
import torch
from safetensors.torch import save_file

from emm.data.batches import encoding_path, encoding_record, save_encoding
from emm.errors import EMMError
from emm.pipeline.decompose import decompose_stage
from emm.pipeline.params import load_params
from emm.pipeline.pool_specs import pool_specs
from emm.pipeline.pretrain import pretrain_stage
from emm.tracking.store import configure
from tests.integration.test_byom_support import USER_MODULE, project, set_align, trained_rechub, user_code  # noqa: F401

MARITAL = {"name": "marital-mlp", "task": "marital", "arch": "mlp", "hidden": [16]}
INCOME = {"name": "income-mlp", "task": "income", "arch": "mlp", "hidden": [16]}


def user():
    return importlib.import_module(USER_MODULE)


def factory_entry(weights, fn="tabular", **kw) -> dict:
    return {"name": "mine", "task": "income", "factory": f"{USER_MODULE}:{fn}", "weights": str(weights), **kw}


def refused(tmp_path, data_dir, first: dict, store, match: str, pool: list[dict] | None = None) -> EMMError:
    """Pretrain a pool whose first entry is ``first``; the error must match and pool/ must not exist."""
    params = project(tmp_path, data_dir, pool or [first, MARITAL], store=store)
    with pytest.raises(EMMError, match=match) as info:
        pretrain_stage("census-income", params, track=False, progress=False)
    assert not (tmp_path / "artifacts" / "census-income" / "pool").exists()
    return info.value


@pytest.fixture
def tabular_weights(user_code, census_small_data, tmp_path):
    """State dicts of the user's Tabular model in several shapes (training does not matter for the checks)."""
    made = itertools.count()

    def make(**kw):
        model = user().tabular(str(census_small_data), **kw)
        path = tmp_path / f"tabular-{next(made)}.safetensors"
        save_file(model.state_dict(), str(path))
        return path
    return make


def test_unknown_uri_and_unknown_alias(trained_rechub, tmp_path):
    t = trained_rechub
    entry = {"name": "theirs", "task": "income", "uri": "models:/no-such-model@prod", "trust_pickle": True}
    refused(tmp_path / "a", t.data_dir, entry, t.store, r"pool model 'theirs'.*no registered model 'no-such-model'.*"
            r"registered: \[.*'rechub-income'")
    entry["uri"] = "models:/rechub-income@champion"
    refused(tmp_path / "b", t.data_dir, entry, t.store,
            r"'rechub-income' has no alias 'champion' \(aliases: \['prod'\]\)")


def test_factory_not_importable(census_small_data, tmp_path, tabular_weights):
    entry = factory_entry(tabular_weights()) | {"factory": "nobody.has_this:build"}
    refused(tmp_path, census_small_data, entry, tmp_path / "mlruns",
            r"pool model 'mine': factory 'nobody.has_this:build' is not importable.*PYTHONPATH")


def test_weights_that_do_not_fit_the_factory_model(census_small_data, tmp_path, tabular_weights):
    wrong = tabular_weights(width=2)  # an output layer of two units, the factory builds one
    refused(tmp_path, census_small_data, factory_entry(wrong, kwargs={"data_dir": str(census_small_data)}),
            tmp_path / "mlruns", r"weights in .*tabular-0.safetensors do not fit the model the factory built \(other "
            r"shapes out.weight: file \[2, \d+\] vs model \[1, \d+\]")


def test_forward_that_raises_names_the_call(trained_rechub, tmp_path):
    t = trained_rechub  # a torch-rechub model takes a dict; declared `inputs: tensors` it is called wrongly
    entry = {"name": "dcn", "task": "marital", "factory": f"{USER_MODULE}:build", "kwargs": t.dcn_kwargs,
             "weights": str(t.dcn_weights), "inputs": "tensors", "output": "probability"}
    refused(tmp_path, t.data_dir, entry, t.store, r"pool model 'dcn': its forward raised TypeError: .*positional "
            r"argument.*EMM called model\(sparse, dense\) with sparse a LongTensor \[B, 39\].*`inputs: tensors`",
            pool=[entry, INCOME])


def test_wrong_output_shape(census_small_data, tmp_path, tabular_weights):
    entry = factory_entry(tabular_weights(width=2), kwargs={"data_dir": str(census_small_data), "width": 2})
    refused(tmp_path, census_small_data, entry, tmp_path / "mlruns",
            r"pool model 'mine' returned shape \[257, 2\] for B=257 rows; EMM expects \[B\] or \[B, 1\]")


def test_index_out_of_range_names_the_feature_and_both_sizes(trained_rechub, tmp_path, census_small_data,
                                                              tabular_weights):
    from torch_rechub.basic.features import SparseFeature  # noqa: F401  (the user's factory builds with it)

    kwargs = {**trained_rechub.dcn_kwargs, "shrink": "education"}  # education's table: 10 rows, the data has 18
    model = user().build(**kwargs)
    weights = tmp_path / "small.safetensors"
    save_file(model.state_dict(), str(weights))
    entry = {"name": "dcn", "task": "marital", "factory": f"{USER_MODULE}:build", "kwargs": kwargs,
             "weights": str(weights), "inputs": "dict", "output": "probability"}
    refused(tmp_path, census_small_data, entry, tmp_path / "mlruns",
            r"feature 'education' has 18 values \(local indices 0..17, 0 = unseen\) in the data, but the model's "
            r"embedding 'embedding.embed_dict.education' has only 10 rows", pool=[entry, INCOME])
    # EMM's own convention: one table, global indices; the last feature no longer fits
    entry = factory_entry(tabular_weights(rows_less=3), kwargs={"data_dir": str(census_small_data), "rows_less": 3})
    refused(tmp_path / "t", census_small_data, entry, tmp_path / "mlruns",
            r"feature 'weeks_worked_bucket' has global indices up to \d+ .*but the model's embedding 'emb' has only")


def test_encoding_mismatch_says_what_differs(census_small_data, tmp_path, tabular_weights):
    weights = tabular_weights()
    record = encoding_record(census_small_data)  # as recorded on an ingest whose vocabularies were other
    record["fingerprint"] = "0" * 16
    record["sparse"][3]["vocab_size"] -= 1
    record["dense"][0]["max"] = 99.0
    encoding_path(weights).write_text(json.dumps(record))
    refused(tmp_path, census_small_data, factory_entry(weights, kwargs={"data_dir": str(census_small_data)}),
            tmp_path / "mlruns", r"pool model 'mine' was trained on another data encoding .*feature 'education': "
            r"vocabulary 17 -> 18 values; dense 'age': range \[0.0, 99.0\] -> \[0.0, 90.0\]")


def test_no_recorded_encoding_is_checked_by_shape_with_a_warning(census_small_data, tmp_path, tabular_weights,
                                                                 caplog):
    weights = tabular_weights()
    params = project(tmp_path, census_small_data, [factory_entry(weights, kwargs={"data_dir": str(census_small_data)}),
                                                   MARITAL], store=tmp_path / "mlruns")
    with caplog.at_level(logging.WARNING, logger="emm"):
        entries = pretrain_stage("census-income", params, track=False, progress=False)
    assert entries[0].origin.encoding == "unrecorded" and entries[0].val_auc > 0
    assert "pool model 'mine': no recorded data encoding" in caplog.text
    save_encoding(weights, census_small_data)  # recorded now: the same import passes silently
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="emm"):
        again = pretrain_stage("census-income", params, track=False, progress=False)
    assert again[0].origin.encoding == "recorded" and "no recorded data encoding" not in caplog.text


class Trap(torch.nn.Module):
    """Unpickling this writes a file: the proof that a refused model was never unpickled."""

    marker = None

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def __setstate__(self, state):
        super().__setstate__(state)
        open(Trap.marker, "w").write("unpickled")


def test_pickled_mlflow_model_needs_trust_pickle(census_small_data, tmp_path):
    store = tmp_path / "mlruns"
    Trap.marker = str(tmp_path / "ran.txt")
    configure(store)
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(Trap(), name="model", serialization_format="pickle", pip_requirements=["torch"])
    (tmp_path / "ran.txt").unlink(missing_ok=True)  # logging itself may round-trip the object
    entry = {"name": "theirs", "task": "income", "uri": f"runs:/{info.run_id}/model"}
    refused(tmp_path / "p", census_small_data, entry, store,
            r"pool model 'theirs': runs:/.*/model is a pickled PyTorch model.*runs any code the file names.*"
            r"`trust_pickle: true`.*factory \+ safetensors")
    assert not (tmp_path / "ran.txt").exists()


def test_two_entries_with_the_same_name(census_small_data, tmp_path, tabular_weights):
    weights = tabular_weights()
    params = project(tmp_path, census_small_data, [INCOME, MARITAL, factory_entry(weights) | {"name": "income-mlp"}],
                     store=tmp_path / "mlruns")
    cfg = load_params(params)
    from emm.data.schema import Schema

    with pytest.raises(EMMError, match=r"\['income-mlp'\] name more than one entry \(\[0\] 'income-mlp' \(builtin\), "
                                       r"\[2\] 'income-mlp' \(factory\)\)"):
        pool_specs("census-income", cfg.pretrain, Schema.load(census_small_data))


def test_a_task_with_no_model(census_small_data, tmp_path, caplog):
    """Pretraining part of a pool is allowed (warned about); decomposing it is refused, nothing written."""
    second = {"name": "income-mlp-2", "task": "income", "arch": "mlp", "hidden": [8]}
    params = project(tmp_path, census_small_data, [INCOME, second], store=tmp_path / "mlruns")
    with caplog.at_level(logging.WARNING, logger="emm"):
        pretrain_stage("census-income", params, track=False, progress=False)
    assert "has no model for task(s) ['marital']" in caplog.text
    with pytest.raises(EMMError, match=r"task\(s\) \['marital'\] have no model in .*pool.*nothing was written.*"
                                       r"Add an entry for each to pretrain.pool.census-income"):
        decompose_stage("census-income", params)
    assert not (tmp_path / "artifacts" / "census-income" / "components").exists()


def test_value_branch_cannot_be_made_portable(census_small_data, tmp_path, tabular_weights):
    entry = factory_entry(tabular_weights(), kwargs={"data_dir": str(census_small_data), "branch": True})
    refused(tmp_path, census_small_data, entry, tmp_path / "mlruns",
            r"pool model 'mine' \(Tabular\) cannot be traced into a portable graph.*branches on tensor values")


def test_widedeep_has_no_cut_point_and_is_named(trained_rechub, tmp_path):
    """Imported fine, but a wide branch beside the deep tower leaves no single-tensor cut: named at decompose."""
    t = trained_rechub
    kwargs = {**t.dcn_kwargs, "kind": "widedeep"}
    weights = tmp_path / "wd.safetensors"
    save_file(user().build(**kwargs).state_dict(), str(weights))
    save_encoding(weights, t.data_dir)
    entry = {"name": "marital-wd", "task": "marital", "factory": f"{USER_MODULE}:build", "kwargs": kwargs,
             "weights": str(weights), "inputs": "dict", "output": "probability"}
    params = project(tmp_path, t.data_dir, [INCOME, MARITAL, entry], store=t.store)
    pretrain_stage("census-income", params, track=False, progress=False)
    for align in ("identical", "project"):
        set_align(params, align)
        with pytest.raises(EMMError, match=r"pool model\(s\) 'marital-wd' \(WideDeep, factory\) have no point where a "
                                           r"single tensor carries everything downstream.*either decompose.align"):
            decompose_stage("census-income", params)


# ---- what a factory entry may name: never the standard library's process/file functions -----------------------
def _marker_kwargs(marker, victim) -> dict[str, dict]:
    """For each refused factory, kwargs that would leave a trace (a new file, a deleted folder) if it ran."""
    return {"subprocess:run": {"args": ["touch", str(marker)]},
            "os:system": {"command": f"touch {marker}"},
            "shutil:rmtree": {"path": str(victim)},
            "builtins:eval": {"source": f"open({str(marker)!r}, 'w')"},
            "operator:call": {"obj": "ignored"},
            "importlib:import_module": {"name": "this"}}


@pytest.mark.parametrize("factory", ["subprocess:run", "os:system", "shutil:rmtree", "builtins:eval",
                                     "operator:call", "importlib:import_module"])
def test_standard_library_factories_are_refused_before_they_run(factory, tmp_path, caplog):
    from emm.models.external import FactoryMember, build_factory_model

    marker, victim = tmp_path / "ran", tmp_path / "keep-me"
    victim.mkdir()
    member = FactoryMember(name="evil", task="income", factory=factory, kwargs=_marker_kwargs(marker, victim)[factory],
                           weights=tmp_path / "w.safetensors")
    with caplog.at_level(logging.INFO, logger="emm"), pytest.raises(EMMError) as info:
        build_factory_model(member)
    message = str(info.value)
    assert f"pool model 'evil': factory {factory!r}" in message and "standard library" in message, message
    assert not marker.exists() and victim.is_dir()  # nothing ran
    assert "calling factory" not in caplog.text


def test_a_factory_that_re_exports_a_standard_library_function_is_refused(tmp_path, monkeypatch):
    """Named through a user module (``from subprocess import run as build``): refused by what the object is."""
    from emm.models.external import FactoryMember, build_factory_model

    (tmp_path / "sneaky_factory.py").write_text("from subprocess import run as build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "ran"
    member = FactoryMember(name="sneaky", task="income", factory="sneaky_factory:build",
                           kwargs={"args": ["touch", str(marker)]}, weights=tmp_path / "w.safetensors")
    with pytest.raises(EMMError, match=r"pool model 'sneaky': factory 'sneaky_factory:build' is subprocess\.run.*"
                                       r"standard library"):
        build_factory_model(member)
    assert not marker.exists()


def test_a_factory_entry_naming_subprocess_stops_pretrain(census_small_data, tmp_path, tabular_weights):
    marker = tmp_path / "ran"
    entry = factory_entry(tabular_weights()) | {"factory": "subprocess:run", "kwargs": {"args": ["touch", str(marker)]}}
    refused(tmp_path / "p", census_small_data, entry, tmp_path / "mlruns",
            r"pool model 'mine': factory 'subprocess:run' is in Python's standard library")
    assert not marker.exists()


def test_a_user_factory_is_called_and_said(census_small_data, tabular_weights, caplog):
    from emm.models.external import FactoryMember, build_factory_model

    kwargs = {"data_dir": str(census_small_data)}
    member = FactoryMember(name="mine", task="income", factory=f"{USER_MODULE}:tabular", kwargs=kwargs,
                           weights=tabular_weights())
    with caplog.at_level(logging.INFO, logger="emm"):
        model = build_factory_model(member)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert f"pool model 'mine': calling factory {USER_MODULE}:tabular(**{kwargs})" in caplog.text
