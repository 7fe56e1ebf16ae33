"""Somers' D matrix and ranker: pinned against scipy.stats.somersd (row i independent)."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from gem.interfaces import BuildContext, Ranking
from gem.somers_d import somers_d_matrix
from gem_plugins.somersd import SomersDOptions, SomersDRanker


def scipy_matrix(scores):
    """Pairwise scipy.stats.somersd(x=col i, y=col j), nan where scipy gives nan."""
    n = scores.shape[1]
    out = np.full((n, n), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(n):
            for j in range(n):
                out[i, j] = scipy.stats.somersd(scores[:, i], scores[:, j]).statistic
    return out


def tied_scores(rng, n_rows=300):
    scores = rng.integers(0, 6, (n_rows, 5))
    scores[:, 1] = rng.integers(0, 2, n_rows) * 5      # two levels only: 0 and 5
    scores[:, 2] = np.minimum(scores[:, 0], rng.integers(2, 4, n_rows))  # dependent on 0, tied
    scores[:, 4] = rng.integers(3, 5, n_rows)           # two adjacent levels
    return scores


def context(**kwargs):
    return BuildContext(seed=0, run_dir=Path("."), cache_dir=Path("."), **kwargs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scipy_with_heavy_ties(seed):
    scores = tied_scores(np.random.default_rng(seed))
    S = somers_d_matrix(scores)
    ref = scipy_matrix(scores)
    assert S.dtype == np.float64 and S.shape == (5, 5)
    np.testing.assert_allclose(S, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.diag(S), 1.0, atol=1e-12)


def test_constant_column_is_zero_where_scipy_is_nan():
    rng = np.random.default_rng(3)
    scores = tied_scores(rng)
    scores[:, 3] = 2
    S = somers_d_matrix(scores)
    ref = scipy_matrix(scores)
    assert np.isnan(ref[3]).all() and np.isnan(ref[:, 3]).all()
    assert (S[3] == 0).all() and (S[:, 3] == 0).all()
    keep = [0, 1, 2, 4]
    np.testing.assert_allclose(S[np.ix_(keep, keep)], ref[np.ix_(keep, keep)], rtol=0, atol=1e-12)


def test_hand_computed_case():
    # x = [0, 0, 1, 1], y = [0, 1, 1, 1]. The 6 unordered pairs (by index):
    #   (0,1): x tied                  (2,3): x tied
    #   (0,2): x up, y up -> concordant (0,3): concordant
    #   (1,2): x up, y tied             (1,3): x up, y tied
    # D(y|x) = (C - D) / (pairs not tied on x) = (2 - 0) / 4 = 0.5.
    # D(x|y): pairs not tied on y are (0,1), (0,2), (0,3): (2 - 0) / 3 = 2/3.
    scores = np.array([[0, 0], [0, 1], [1, 1], [1, 1]])
    S = somers_d_matrix(scores)
    assert S[0, 1] == pytest.approx(0.5, abs=1e-15)
    assert S[1, 0] == pytest.approx(2 / 3, abs=1e-15)
    assert S[0, 1] == pytest.approx(scipy.stats.somersd(scores[:, 0], scores[:, 1]).statistic, abs=1e-12)
    assert S[1, 0] == pytest.approx(scipy.stats.somersd(scores[:, 1], scores[:, 0]).statistic, abs=1e-12)


def test_asymmetric_for_different_tie_structure():
    rng = np.random.default_rng(4)
    scores = tied_scores(rng)
    S = somers_d_matrix(scores)
    assert abs(S[0, 1] - S[1, 0]) > 1e-3 or abs(S[0, 2] - S[2, 0]) > 1e-3
    assert not np.allclose(S, S.T)


def test_direction_is_prediction_not_cause():
    # The design notes and the README quote these numbers: the two cases in which reading an
    # edge's direction as cause -> effect goes wrong.
    rng = np.random.default_rng(0)
    cause = rng.integers(0, 6, 20000)
    effect = np.where(cause >= 3, 5, 0)           # a two-level attribute set by a six-level one
    s = somers_d_matrix(np.stack([cause, effect], 1))
    assert s[1, 0] == pytest.approx(1.0) and s[0, 1] == pytest.approx(0.60, abs=0.01)
    x = rng.integers(0, 6, 20000)
    y = np.clip(x + rng.integers(-1, 2, 20000), 0, 5)   # one-way, symmetric noise
    s = somers_d_matrix(np.stack([x, y], 1))
    assert s[0, 1] == pytest.approx(0.81, abs=0.01) and s[1, 0] == pytest.approx(s[0, 1], abs=0.01)


def test_weights_equal_repeated_rows():
    rng = np.random.default_rng(5)
    scores = tied_scores(rng, n_rows=120)
    weights = rng.integers(0, 4, len(scores))
    repeated = np.repeat(scores, weights, axis=0)
    S_weighted = somers_d_matrix(scores, weights=weights)
    np.testing.assert_allclose(S_weighted, somers_d_matrix(repeated), rtol=0, atol=1e-12)
    np.testing.assert_allclose(S_weighted, scipy_matrix(repeated), rtol=0, atol=1e-12)


def test_fractional_weights_use_float64_and_scale_out():
    rng = np.random.default_rng(13)
    scores = tied_scores(rng, n_rows=150)
    weights = rng.integers(0, 5, len(scores)).astype(float)
    np.testing.assert_allclose(somers_d_matrix(scores, weights=0.5 * weights),
                               somers_d_matrix(scores, weights=weights), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="non-negative"):
        somers_d_matrix(scores, weights=-weights)


def test_many_rows_cross_chunk_boundary():
    rng = np.random.default_rng(6)
    scores = tied_scores(rng, n_rows=9000)  # more than one block of the one-hot product
    np.testing.assert_allclose(somers_d_matrix(scores), scipy_matrix(scores), rtol=0, atol=1e-12)


def test_float_scores_and_levels_are_validated():
    np.testing.assert_array_equal(somers_d_matrix(np.array([[0.0, 1.0], [1.0, 0.0]])), [[1, -1], [-1, 1]])
    with pytest.raises(ValueError, match="2.5"):
        somers_d_matrix(np.array([[0.0, 2.5], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="6"):
        somers_d_matrix(np.array([[0, 6], [1, 0]]))
    with pytest.raises(ValueError, match="3"):
        somers_d_matrix(np.array([[0, 3], [1, 0]]), levels=3)


# ---------------------------------------------------------------------------------------- ranker


def correlated_scores(rng, n_rows):
    base = rng.integers(0, 6, n_rows)
    scores = np.column_stack([
        base,
        np.clip(base + rng.integers(-1, 2, n_rows), 0, 5),
        rng.integers(0, 6, n_rows),
        np.clip(5 - base + rng.integers(-2, 3, n_rows), 0, 5),
    ]).astype(float)
    return scores


def test_ranker_drops_nan_rows_and_counts_them():
    rng = np.random.default_rng(7)
    scores = correlated_scores(rng, 1500)
    scores[[3, 50, 51], [0, 2, 3]] = np.nan
    scores[800] = np.nan
    ranking = SomersDRanker(SomersDOptions(bootstrap=0), context()).rank(scores)
    assert isinstance(ranking, Ranking)
    assert ranking.n_used == 1496
    assert any("4 of 1500 images had a missing score and were left out" in note for note in ranking.notes)
    complete = scores[~np.isnan(scores).any(axis=1)].astype(int)
    np.testing.assert_allclose(ranking.impact, scipy_matrix(complete), rtol=0, atol=1e-12)
    assert ranking.ci_low is None and ranking.ci_high is None


def test_ranker_rounds_scores():
    rng = np.random.default_rng(8)
    scores = correlated_scores(rng, 200)
    noisy = scores + rng.uniform(-0.4, 0.4, scores.shape)
    noisy = np.clip(noisy, -0.4, 5.4)
    ranker = SomersDRanker(SomersDOptions(bootstrap=0), context())
    np.testing.assert_array_equal(ranker.rank(noisy).impact, ranker.rank(scores).impact)


def test_ranker_ci_contains_estimate_and_narrows():
    rng = np.random.default_rng(9)
    ranker = SomersDRanker(SomersDOptions(bootstrap=200, seed=1), context())
    small = ranker.rank(correlated_scores(rng, 300))
    large = ranker.rank(correlated_scores(rng, 3000))
    for ranking in (small, large):
        assert ranking.ci_low.shape == ranking.ci_high.shape == (4, 4)
        assert (ranking.ci_low <= ranking.impact + 1e-12).all()
        assert (ranking.impact <= ranking.ci_high + 1e-12).all()
    off = ~np.eye(4, dtype=bool)
    width_small = (small.ci_high - small.ci_low)[off]
    width_large = (large.ci_high - large.ci_low)[off]
    assert width_large.mean() < 0.5 * width_small.mean()
    assert (width_large < width_small).all()


def test_ranker_bootstrap_is_seeded():
    scores = correlated_scores(np.random.default_rng(10), 400)
    a = SomersDRanker(SomersDOptions(bootstrap=50), context()).rank(scores)
    b = SomersDRanker(SomersDOptions(bootstrap=50), context()).rank(scores)
    c = SomersDRanker(SomersDOptions(bootstrap=50, seed=123), context()).rank(scores)
    np.testing.assert_array_equal(a.ci_low, b.ci_low)
    assert not np.array_equal(a.ci_low, c.ci_low)


def test_ranker_invalid_score_names_it():
    scores = correlated_scores(np.random.default_rng(11), 50)
    scores[7, 2] = 7
    ranker = SomersDRanker(SomersDOptions(bootstrap=0), context(attributes=["a", "b", "smile", "d"]))
    with pytest.raises(ValueError, match=r"7\.0.*'smile'"):
        ranker.rank(scores)
    scores[7, 2] = -1
    with pytest.raises(ValueError, match=r"-1\.0"):
        ranker.rank(scores)


def test_ranker_notes_constant_attribute():
    scores = correlated_scores(np.random.default_rng(12), 100)
    scores[:, 2] = 0
    ranking = SomersDRanker(SomersDOptions(bootstrap=20), context(attributes=["a", "b", "bald", "d"])).rank(scores)
    assert (ranking.impact[2] == 0).all()
    assert any("'bald' is constant" in note and "row is defined as 0" in note for note in ranking.notes)
    assert (ranking.ci_low[2] == 0).all() and (ranking.ci_high[2] == 0).all()


def test_ranker_needs_two_rows():
    scores = np.array([[1.0, 2.0], [np.nan, 1.0]])
    with pytest.raises(ValueError, match="at least 2"):
        SomersDRanker(SomersDOptions(), context()).rank(scores)


def test_registered_as_ranker():
    from gem import hooks  # noqa: F401
    import pluggy
    from gem.hooks import PROJECT, specs
    import gem_plugins.somersd as module

    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(specs)
    pm.register(module)
    seen = {}

    def register(name, factory, *, options=None, description=""):
        seen[name] = (factory, options, description)

    pm.hook.gem_register_rankers(register=register)
    factory, options, description = seen["somersd"]
    assert factory is SomersDRanker and options is SomersDOptions and "row i independent" in description
    ranker = factory(options(bootstrap=0), context())
    assert ranker.rank(np.array([[0.0, 1.0], [1.0, 2.0]])).impact[0, 1] == 1.0


def test_bootstrap_replicates_are_weighted_matrices():
    from gem.somers_d import somers_d_bootstrap

    scores = tied_scores(np.random.default_rng(14), n_rows=80)
    replicates = somers_d_bootstrap(scores, 7, seed=3)
    assert replicates.shape == (7, 5, 5)
    counts = np.random.default_rng(3).multinomial(80, np.full(80, 1 / 80), size=7)
    for b in range(7):
        np.testing.assert_allclose(replicates[b], somers_d_matrix(scores, weights=counts[b]), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(replicates, somers_d_bootstrap(scores, 7, seed=3))
    assert somers_d_bootstrap(scores, 0).shape == (0, 5, 5)
    with pytest.raises(ValueError, match="n_boot"):
        somers_d_bootstrap(scores, -1)


def test_most_asymmetric_pair_is_ordered_by_the_larger_direction():
    from gem.somers_d import most_asymmetric_pair

    S = np.array([[1.0, 0.53, 0.10], [0.87, 1.0, -0.20], [0.10, -0.25, 1.0]])
    assert most_asymmetric_pair(S) == (1, 0)
    S[2, 1] = -0.9  # |−0.9| against |−0.2|: the sign does not matter, the strength does
    assert most_asymmetric_pair(S) == (2, 1)
    assert most_asymmetric_pair(np.eye(1)) is None
    assert most_asymmetric_pair(np.full((2, 2), np.nan)) is None


def test_a_coarse_attribute_set_by_a_fine_one_gets_the_larger_entry_towards_the_fine_one():
    """The default synthetic data's window (2 levels) follows the wall hue (10 levels): S differs
    by more than 0.3 between the two directions on the 1,500 images the oracle scores."""
    from gem.labels import class_scores
    from gem.somers_d import most_asymmetric_pair
    from gem_plugins.synthetic import FACTOR_LEVELS, SyntheticOptions, sample_factors

    options = SyntheticOptions()
    names = options.factors
    scores = class_scores(sample_factors(options, 0)[:1500], [FACTOR_LEVELS[n] for n in names])
    S = somers_d_matrix(scores)
    window, wall = names.index("window"), names.index("wall_hue")
    assert S[window, wall] - S[wall, window] >= 0.3
    assert most_asymmetric_pair(S) == (window, wall)
