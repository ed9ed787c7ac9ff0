"""A pool member's name becomes a folder (pool-work/<name>), a file (pool/<name>.safetensors) and an MLflow
run name, so a name that is not a plain file name is refused when params.yaml is parsed, for every kind of
entry, and two names that one case-insensitive filesystem would store as one file are refused too."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from emm.errors import EMMError
from emm.models.external import FactoryMember, UriMember, parse_member
from emm.models.single_task import ModelSpec
from emm.pipeline.params import PretrainConfig
from emm.pipeline.pool_specs import pool_specs

BAD_NAMES = ["", "/abs/path", "../x", "a/b", "./m", "m" * 300, "módel", ".hidden", "-m", "a..b", "a b", "a\\b"]
GOOD_NAMES = ["m", "income-mlp", "M2", "dcn_v2.1", "x" * 64]
WHERE = "pretrain.pool.census-income[3]"


def entry(kind: str, name: str) -> dict:
    base = {"name": name, "task": "income"}
    if kind == "builtin":
        return base | {"arch": "mlp", "hidden": [4]}
    if kind == "factory":
        return base | {"factory": "pkg.mod:build", "weights": "w.safetensors"}
    return base | {"uri": "models:/emm-census-income/1"}


@pytest.mark.parametrize("kind", ["builtin", "factory", "uri"])
@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n[:12]))
def test_a_name_that_is_not_a_plain_file_name_is_refused_at_parse_time(kind, name):
    with pytest.raises(EMMError) as info:
        parse_member(entry(kind, name), WHERE)
    message = str(info.value)
    assert WHERE in message
    assert repr(name) in message  # the bad name itself, even the empty one
    assert "letters, digits" in message and "64" in message  # what a valid name looks like


@pytest.mark.parametrize("kind", ["builtin", "factory", "uri"])
@pytest.mark.parametrize("name", GOOD_NAMES)
def test_plain_names_are_accepted_unchanged(kind, name):
    member = parse_member(entry(kind, name), WHERE)
    assert member.name == name
    assert isinstance(member, {"builtin": ModelSpec, "factory": FactoryMember, "uri": UriMember}[kind])


def test_the_models_refuse_a_bad_name_when_built_directly():
    """Not only parse_member: code that builds a spec itself (the benchmark, the import stage) is covered."""
    with pytest.raises(ValueError, match="'../x'"):
        ModelSpec(name="../x", task="income", arch="mlp", hidden=[4])
    with pytest.raises(ValueError, match="'a/b'"):
        UriMember(name="a/b", task="income", uri="models:/x/1")


def specs(*names: str):
    cfg = PretrainConfig(pool={"census-income": [entry("builtin", n) for n in names]})
    return pool_specs("census-income", cfg, SimpleNamespace(task_names=["income", "marital"]))


def test_names_that_differ_only_in_case_are_one_name():
    """'m' and 'M' are one pool/m.safetensors on a case-insensitive filesystem: the second would overwrite
    the first. The error names both entries."""
    with pytest.raises(EMMError, match=r"pretrain.pool.census-income.*unique.*case.*\[0\] 'm' \(builtin\), "
                                       r"\[2\] 'M' \(builtin\)"):
        specs("m", "other", "M")


def test_distinct_names_pass_the_duplicate_check():
    assert [s.name for s in specs("m", "m2", "n")] == ["m", "m2", "n"]


def test_the_benchmark_pool_is_checked_like_the_pretrain_pool():
    """The benchmark builds its pool from pretrain.pool too: a bad name is the same EMMError, not pydantic's."""
    from harness.experiments.runner import parse_builtin

    with pytest.raises(EMMError, match=r"pretrain\.pool\.census-income\[1\].*'\.\./x'"):
        parse_builtin({"name": "../x", "task": "income", "arch": "mlp"}, "pretrain.pool.census-income[1]")
    with pytest.raises(EMMError, match="built-in entries"):
        parse_builtin({"name": "m", "task": "income", "uri": "models:/m/1"}, "pretrain.pool.census-income[0]")
    assert parse_builtin({"name": "m", "task": "income", "arch": "mlp", "hidden": [4]}, "x").name == "m"
