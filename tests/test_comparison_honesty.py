"""Honest comparison: training batches that change between epochs, one fixed outer test set,
intervals named for what they cover, a step budget with a floor and a cap."""

from __future__ import annotations

import numpy as np

from scdlkit.foundation._tokenize import length_grouped_batches


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
