"""The scarce-label benchmark's plan (harness/scarce.yaml -> cells -> data variants), without training."""

from __future__ import annotations

import pytest
import yaml

from emm.errors import EMMError
from emm.pipeline.params import load_params
from harness.experiments.scarce_plan import (DEFAULT_SCARCE_CONFIG, cell_signature, load_scarce_config, plan_cells,
                                             synth_config, variant_key, variants)
from harness.params import HarnessParams

SYNTH = "aliexpress-synth"


@pytest.fixture(scope="module")
def full():
    return load_scarce_config(DEFAULT_SCARCE_CONFIG).pick("full")


def test_the_synth_grid_runs_headline_cells_first_on_three_seeds(full):
    cells = plan_cells(SYNTH, SYNTH, full)
    weights, fractions = full.synth.shared_weights, full.synth.fractions
    rare = len(full.synth.rare_shared_weights)
    extra = len(full.headline_seeds) - len(full.seeds)
    assert len(cells) == len(weights) * len(fractions) + rare + extra
    head = [c for c in cells if c.headline]
    assert cells[:len(head)] == head  # an interrupted run already holds the headline numbers
    assert {(c.shared_weight, c.fraction) for c in head} == {(0.9, 0.02)}
    assert sorted(c.seed for c in head) == sorted(full.headline_seeds)
    assert all(c.seed in full.seeds for c in cells if not c.headline)
    assert [c for c in cells if c.rare] and all(c.fraction == 1.0 and c.task == "conversion" for c in cells if c.rare)
    assert len({c.key for c in cells}) == len(cells)


def test_census_cells_that_need_the_same_data_share_a_variant(full):
    cells = plan_cells("census-income", SYNTH, full)
    vs = {v.key: v for v in variants(cells)}
    assert {(c.task, c.fraction) for c in vs["full"].cells} == {("income", 1.0), ("marital", 1.0)}
    assert vs["income-0.01"].label_fraction == {"income": 0.01} and vs["full"].label_fraction == {}
    assert vs["income-0.01"].seeds == sorted(full.headline_seeds)
    assert vs["marital-0.01"].seeds == full.seeds
    assert len(vs) == 2 * (len(full.census.fractions) - 1) + 1


def test_variant_keys_name_the_relatedness_and_the_kept_fraction():
    assert variant_key("synth", 0.9, False, {"conversion": 0.02}) == "w0.90-conversion-0.02"
    assert variant_key("synth", 0.9, True, {}) == "w0.90-rare-full"
    assert variant_key("census", None, False, {"income": 1.0}) == "full"


def test_a_synth_variant_gets_its_label_fraction_and_rare_conversions(full):
    cfg = HarnessParams(**dict(load_params(None)))
    by = {v.key: v for v in variants(plan_cells(SYNTH, SYNTH, full))}
    scarce = synth_config(cfg, full, by["w0.00-conversion-0.005"])
    assert scarce.shared_weight == 0.0 and scarce.label_fraction == {"conversion": 0.005}
    assert scarce.rows == full.synth.config["rows"]
    rare = synth_config(cfg, full, by["w0.90-rare-full"])
    assert rare.conversion_given_click == full.synth.rare_conversion_given_click and rare.label_fraction == {}


def test_a_stored_cell_is_reused_only_while_its_settings_are_unchanged(full):
    cfg = HarnessParams(**dict(load_params(None)))
    cell = plan_cells(SYNTH, SYNTH, full)[0]
    data = {"synth": {"rows": 1}}
    sig = cell_signature(cell, data, cfg, full)
    assert sig == cell_signature(cell, data, cfg, full)
    other_fuse = cfg.model_copy(update={"fuse": cfg.fuse.model_copy(update={"tower": [4]})})
    assert sig != cell_signature(cell, data, other_fuse, full)
    assert sig != cell_signature(cell, {"synth": {"rows": 2}}, cfg, full)
    assert sig != cell_signature(cell, data, cfg, full.model_copy(update={"max_epochs": 99}))


def test_bad_settings_and_datasets_are_refused_by_name(tmp_path, full):
    bad = tmp_path / "scarce.yaml"
    bad.write_text(yaml.safe_dump({"scarce": {"variants": {"full": {"synth": {"fractions": [0.02, 1.5]}}}}}))
    with pytest.raises(EMMError, match=r"scarce\.yaml is invalid(.|\n)*fractions"):
        load_scarce_config(bad)
    bad.write_text(yaml.safe_dump({"scarce": {"variants": {"full": {"baselines": ["nope"]}}}}))
    with pytest.raises(EMMError, match="nope"):
        load_scarce_config(bad)
    with pytest.raises(EMMError, match="variant 'nope'.*known"):
        load_scarce_config(DEFAULT_SCARCE_CONFIG).pick("nope")
    with pytest.raises(EMMError, match="ali-ccp"):
        plan_cells("ali-ccp", SYNTH, full)
