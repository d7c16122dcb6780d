"""Honest comparison: training batches that change between epochs, one fixed outer test set,
intervals named for what they cover, a step budget with a floor and a cap."""

from __future__ import annotations

import numpy as np

from scdlkit.foundation._batching import length_grouped_batches


def _pairs(lengths, epoch):
    pairs = set()
    for batch in length_grouped_batches(lengths, 64, shuffle=True, seed=3, epoch=epoch):
        members = np.sort(batch)
        pairs.update((a, b) for i, a in enumerate(members) for b in members[i + 1 :])
    return pairs


def test_small_data_batches_change_between_epochs():
    lengths = np.random.default_rng(0).integers(200, 1200, 600)
    first, second = _pairs(lengths, 0), _pairs(lengths, 1)
    # an exact length sort (one mega-batch holds all 600 cells) repeats 99% of the pairs
    assert len(first & second) / len(first) < 0.7
    cells = np.concatenate(list(length_grouped_batches(lengths, 64, shuffle=True, epoch=1)))
    assert np.array_equal(np.sort(cells), np.arange(600))
    again = list(length_grouped_batches(lengths, 64, shuffle=True, seed=3, epoch=1))
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            again, length_grouped_batches(lengths, 64, shuffle=True, seed=3, epoch=1), strict=True
        )
    )


def _fit(adata, checkpoint_dir, **kwargs):
    from scdlkit.foundation import ScGPTAnnotationRunner

    return ScGPTAnnotationRunner(
        label_key="bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=("frozen_probe", "baseline"),
        progress=False,
        **kwargs,
    ).fit(adata)


def test_no_test_cell_of_the_kept_split_validates_in_any_repeat(_pbmc_raw, checkpoint_dir):
    from scdlkit.foundation import split_scgpt_data

    runner = _fit(_pbmc_raw, checkpoint_dir, n_repeats=2, val_size=0.15, test_size=0.15)
    test = runner.split_.test_indices
    assert len(test) > 50
    for seed in (runner.random_state + 1, runner.random_state + 2):
        redrawn = split_scgpt_data(
            runner.prepared_, val_size=0.15, test_size=0.15, random_state=seed, fixed_test=test
        )
        np.testing.assert_array_equal(redrawn.test_indices, test)
        assert not np.intersect1d(redrawn.val_indices, test).size
        assert not np.intersect1d(redrawn.train_indices, test).size
        # validation is still about val_size of the labelled cells, and really redrawn
        assert abs(len(redrawn.val_indices) - len(runner.split_.val_indices)) <= 10
        assert not np.array_equal(redrawn.val_indices, runner.split_.val_indices)
    summary = runner.strategy_metrics_.set_index("strategy")
    repeats = runner.repeat_metrics_
    assert repeats["repeat"].nunique() == 2
    for name in ("frozen_probe", "baseline"):
        low, high = summary.loc[name, ["test_macro_f1_t_ci_low", "test_macro_f1_t_ci_high"]]
        assert low <= summary.loc[name, "test_macro_f1"] <= high
    assert "test_macro_f1_boot_ci_low" not in summary.columns


def test_corrected_t_interval_is_wider_than_the_naive_one():
    from scipy.stats import t

    from scdlkit.foundation._selection import corrected_t_interval

    values = np.array([0.61, 0.58, 0.66, 0.63, 0.60])
    low, high = corrected_t_interval(values, held_out_ratio=0.15 / 0.7)
    naive = t.ppf(0.975, 4) * values.std(ddof=1) / np.sqrt(5)
    # Nadeau-Bengio: sqrt((1/n + n_val/n_train) / (1/n)) = sqrt(1 + 5 * 0.214) = 1.44 at n=5
    np.testing.assert_allclose((high - low) / 2 / naive, np.sqrt(1 + 5 * 0.15 / 0.7))
    assert low < values.mean() < high


def test_batch_splits_keep_the_first_repeats_test_donors(_pbmc_raw, checkpoint_dir):
    from scdlkit.foundation import prepare_scgpt_data, split_scgpt_data

    adata = _pbmc_raw.copy()
    adata.obs["donor"] = np.array(["d1", "d2", "d3", "d4"])[np.arange(adata.n_obs) % 4]
    prepared = prepare_scgpt_data(
        adata, checkpoint=checkpoint_dir, label_key="bulk_labels", batch_key="donor"
    )
    first = split_scgpt_data(prepared, split_by="batch", random_state=0)
    donors = adata.obs["donor"].to_numpy()
    for seed in (1, 2, 3):
        redrawn = split_scgpt_data(
            prepared, split_by="batch", random_state=seed, fixed_test=first.test_indices
        )
        np.testing.assert_array_equal(redrawn.test_indices, first.test_indices)
        assert not set(donors[redrawn.train_indices]) & set(donors[first.test_indices])


def test_every_strategy_is_fitted_on_the_same_cells(_pbmc_raw, checkpoint_dir, monkeypatch):
    """Closed-form fits (probe, baseline) and the neural strategies train on the same cells: the
    training split less the early-stopping cells, which only the neural strategies read."""
    from sklearn.linear_model import LogisticRegression

    from scdlkit.baselines._expression import ExpressionLogisticBaseline
    from scdlkit.foundation import ScGPTAnnotationRunner
    from scdlkit.training import Trainer

    fitted: dict[str, int] = {}
    real_lr_fit, real_trainer_fit = LogisticRegression.fit, Trainer.fit
    real_baseline_fit = ExpressionLogisticBaseline.fit

    def lr_fit(self, x, y, *args, **kwargs):
        fitted.setdefault("probe", len(y))  # the first: the probe fits before the baseline
        return real_lr_fit(self, x, y, *args, **kwargs)

    def baseline_fit(self, matrix, genes, labels, *args, **kwargs):
        fitted.setdefault("baseline", matrix.shape[0])  # the selection fit, not the refit
        return real_baseline_fit(self, matrix, genes, labels, *args, **kwargs)

    def trainer_fit(self, train, val=None):
        fitted["head"], fitted["head_stop"] = len(train), len(val)
        return real_trainer_fit(self, train, val)

    monkeypatch.setattr(LogisticRegression, "fit", lr_fit)
    monkeypatch.setattr(Trainer, "fit", trainer_fit)
    monkeypatch.setattr(ExpressionLogisticBaseline, "fit", baseline_fit)
    runner = ScGPTAnnotationRunner(
        checkpoint=checkpoint_dir,
        label_key="bulk_labels",
        strategies=("frozen_probe", "head", "baseline"),
        epochs=1,
        progress=False,
        random_state=0,
    ).fit(_pbmc_raw[:240].copy())
    n_train = len(runner.split_.indices("train"))
    assert fitted["probe"] == fitted["baseline"] == fitted["head"]
    assert fitted["head"] + fitted["head_stop"] == n_train
    assert 0 < fitted["head_stop"] < n_train
