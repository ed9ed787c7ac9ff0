"""``numeric: {mode: quantile}``: PLR embeddings of quantile-normalised dense values.

The transform must be scikit-learn's ``QuantileTransformer(output_distribution="uniform")`` (centred and
scaled to unit variance) inside each column's range, send the tied values of a mostly-zero column to the middle of their mass (not to the
clip bound), keep its knots in the state_dict, and export to ONNX like the rest of a model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.preprocessing import QuantileTransformer

from emm.models.embedding import (N_QUANTILES, UNIT_VARIANCE, FeatureEmbedding, NumericOptions, PeriodicNumeric,
                                  QuantileNumeric, fit_numeric, unfitted_numeric)

QUANTILE = NumericOptions(mode="quantile", dim=4, frequencies=6)


def columns(n: int = 20_000, seed: int = 0) -> torch.Tensor:
    """Three dense columns shaped like Census's: smooth (age), heavy-tailed with 90% zeros (capital gains),
    a few integer levels (weeks worked)."""
    rng = np.random.default_rng(seed)
    age = rng.gamma(4.0, 10.0, n)
    gains = np.where(rng.random(n) < 0.9, 0.0, rng.lognormal(8.0, 1.5, n))
    weeks = rng.integers(0, 53, n).astype(float)
    return torch.tensor(np.column_stack([age, gains, weeks]), dtype=torch.float32)


def scikit(rows: torch.Tensor) -> QuantileTransformer:
    return QuantileTransformer(n_quantiles=N_QUANTILES, output_distribution="uniform", subsample=None).fit(rows.numpy())


def fitted(rows: torch.Tensor) -> QuantileNumeric:
    enc = QuantileNumeric(rows.shape[1], QUANTILE)
    enc.fit(rows)
    return enc


def test_matches_scikit_learn_inside_each_columns_range():
    rows = columns()
    enc = fitted(rows)
    sk = scikit(rows)
    np.testing.assert_allclose(enc.quantiles.T.numpy(), sk.quantiles_, rtol=1e-5, atol=1e-4)
    fresh = columns(5_000, seed=1)
    ours, theirs = enc.normalise(fresh).numpy(), (sk.transform(fresh.numpy()) - 0.5) * UNIT_VARIANCE
    for j in range(fresh.shape[1]):  # inside the range (interior ties included): the same value
        knots = enc.quantiles[j].numpy()
        inside = (fresh[:, j].numpy() > knots[0]) & (fresh[:, j].numpy() < knots[-1])
        assert inside.sum() > 300, j
        np.testing.assert_allclose(ours[inside, j], theirs[inside, j], atol=1e-4, err_msg=f"column {j}")


def test_tied_minimum_goes_to_the_middle_of_its_mass_not_the_clip_bound():
    rows = columns()
    enc = fitted(rows)
    zeros = torch.zeros(4, 3)
    z = enc.normalise(zeros)[:, 1]  # 90% of the column is 0: its middle is the 45th percentile
    share = float((rows[:, 1] == 0).float().mean())
    want = (share / 2 - 0.5) * UNIT_VARIANCE
    assert torch.allclose(z, torch.full_like(z, want), atol=0.03), (z, share)
    assert scikit(rows).transform(zeros.numpy())[0, 1] == 0  # what scikit-learn does instead: the bound
    far = enc.normalise(torch.tensor([[-1e9, -1e9, -1e9], [1e9, 1e9, 1e9]]))
    torch.testing.assert_close(far, torch.tensor([[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]]) * UNIT_VARIANCE)


def test_monotone_in_every_column():
    enc = fitted(columns())
    grid = torch.linspace(-10, 5e4, 4001).unsqueeze(1).repeat(1, 3)
    z = enc.normalise(grid)
    assert torch.all(z[1:] >= z[:-1] - 1e-6)


def test_embedding_fits_once_keeps_knots_in_state_dict_and_reloads():
    rows = columns(4_000)
    emb = FeatureEmbedding(total_vocab=10, n_sparse=2, n_dense=3, dim=4, numeric=QUANTILE)
    assert isinstance(emb.periodic, QuantileNumeric) and isinstance(emb.periodic, PeriodicNumeric)
    assert "periodic.quantiles" in emb.state_dict() and "periodic.mean" not in emb.state_dict()
    assert unfitted_numeric(emb) == [emb.periodic]
    assert fit_numeric(emb, rows) == 1 and unfitted_numeric(emb) == []
    sparse = torch.randint(0, 10, (4_000, 2))
    again = FeatureEmbedding.from_config(emb.config())
    again.load_state_dict(emb.state_dict())
    torch.testing.assert_close(again(sparse, rows), emb(sparse, rows))
    assert emb(sparse, rows).shape == (4_000, emb.out_dim) and emb.out_dim == 2 * 4 + 3 * (1 + QUANTILE.dim)


def test_exports_to_onnx_with_the_same_outputs(tmp_path):
    pytest.importorskip("onnxruntime")
    from emm.pipeline.export import compare, export_onnx, onnx_session

    rows = columns(512)
    emb = FeatureEmbedding(total_vocab=10, n_sparse=2, n_dense=3, dim=4, numeric=QUANTILE)
    fit_numeric(emb, rows)
    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.out = emb, torch.nn.Linear(emb.out_dim, 1)

        def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:  # -> [B, 1]
            return self.out(self.emb(sparse, dense))

    model = Head().eval()
    sparse = torch.randint(0, 10, (512, 2))
    export_onnx(model, tmp_path / "m.onnx", (sparse[:64], rows[:64]), metadata={})
    diffs = compare(model, onnx_session(tmp_path / "m.onnx"), sparse, rows)
    assert diffs["max_abs_diff"] <= diffs["bound_used"] and diffs["max_abs_diff_probability"] < 1e-5, diffs
