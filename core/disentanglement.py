"""Disentanglement metrics against ground-truth factors, as plain functions on arrays.

Every metric follows disentanglement_lib (Locatello et al., 2019) in its definition and its
defaults (10,000 training / 5,000 test points, mean representation, 20 equal-width bins, ...),
so the numbers are comparable with the literature. What differs is where the points come
from: disentanglement_lib samples fresh observations from a full-factorial simulator, gem works
on any **pool** of observations that carries factor labels.

Interface
---------
Every metric takes the same two arrays, computed once upstream (encode the pool in batches, e.g.
with :func:`gem.training.encode_images`, so 10,000 images never sit in memory at once):

``codes`` : float array (N, d)
    The representation of each observation of the pool (posterior means).
``factors`` : int array (N, K)
    Its ground-truth factor classes (any integers; a factor is a column).

plus keyword arguments for sizes and ``seed`` (an int). The result is deterministic for a fixed
seed: every random choice comes from ``numpy.random.default_rng((seed, stream))`` with a fixed
stream number per metric, and scikit-learn estimators get a ``random_state`` derived from it,
so running one metric alone or through :func:`compute_disentanglement` gives the same number.

Sampling from a pool
--------------------
* **Train/test metrics** (MIG, DCI, SAP, modularity, explicitness, Spearman MCC) use
  :func:`split_pool`: a random permutation of the pool, the first ``n_train`` rows for training
  and the next ``n_test`` for testing (disjoint, drawn without replacement). A pool smaller than
  ``n_train + n_test`` is split in the same proportion, with a warning. MIG, modularity and
  Spearman MCC only use the training part (as disentanglement_lib), but take ``n_test`` too so
  that every metric sees the same training rows.
* **Intervention metrics** (FactorVAE and BetaVAE scores) need "a batch with factor k fixed". A
  simulator can render one; a pool cannot, so the batch is drawn by conditioning on existing
  observations: pick a random observation, take its value v of factor k, and draw the batch
  uniformly with replacement among the pool's observations whose factor k equals v. For a
  full-factorial pool this matches disentanglement_lib's sampling (other factors uniform and
  independent); for a correlated pool the other factors follow their conditional distribution
  given factor k = v, which is the only honest reading of "fix factor k" without a simulator.

Every factor must vary over the pool (a constant factor column is an error naming it).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from gem.errors import ConfigurationError
from gem.metrics import spearman_mcc

__all__ = [
    "METRICS", "resolve_metrics", "split_pool", "histogram_discretize", "discrete_mutual_info", "discrete_entropy",
    "mig_from_mutual_info", "dci_from_importance", "modularity_from_mutual_info",
    "mig", "dci", "sap", "modularity", "explicitness", "spearman_mcc_score",
    "factorvae_score", "betavae_score", "compute_disentanglement",
]

# Fixed random streams, one per metric: (seed, stream) seeds numpy's generator.
_STREAM_SPLIT, _STREAM_DCI, _STREAM_SAP, _STREAM_EXPLICIT = 0, 1, 2, 3
_STREAM_FACTORVAE, _STREAM_BETAVAE = 4, 5


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng((int(seed), stream))


def _random_state(rng: np.random.Generator) -> int:
    """An int seed for a scikit-learn estimator, drawn from ``rng``."""
    return int(rng.integers(0, 2 ** 31 - 1))


# ---------------------------------------------------------------------------------------------
# inputs and sampling
# ---------------------------------------------------------------------------------------------

def _check(codes: Any, factors: Any) -> tuple[np.ndarray, np.ndarray]:
    """float64 codes (N, d) and int64 factors (N, K), validated."""
    if hasattr(codes, "detach"):
        codes = codes.detach().cpu().numpy()
    if hasattr(factors, "detach"):
        factors = factors.detach().cpu().numpy()
    codes = np.asarray(codes, dtype=np.float64)
    factors = np.asarray(factors)
    if codes.ndim != 2 or factors.ndim != 2 or len(codes) != len(factors):
        raise ValueError(f"codes must be (N, d) and factors (N, K) with the same N; "
                         f"got {codes.shape} and {factors.shape}")
    if len(codes) < 2 or codes.shape[1] < 1 or factors.shape[1] < 1:
        raise ValueError(f"need at least 2 observations, 1 code and 1 factor; got codes {codes.shape}, "
                         f"factors {factors.shape}")
    if not np.isfinite(codes).all():
        raise ValueError("codes contain NaN or infinite values")
    if not np.issubdtype(factors.dtype, np.integer):
        if not np.issubdtype(factors.dtype, np.number) or not np.all(np.isfinite(factors)) \
                or not np.all(factors == np.round(factors)):
            raise ValueError("factors must be integer classes (N, K)")
    factors = factors.astype(np.int64)
    constant = [k for k in range(factors.shape[1]) if np.all(factors[:, k] == factors[0, k])]
    if constant:
        raise ValueError(f"factor column(s) {constant} are constant over the pool; a metric cannot "
                         "score a factor that never varies: drop those columns")
    return codes, factors


def split_pool(n_pool: int, n_train: int = 10000, n_test: int = 5000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint random training and test rows of a pool of ``n_pool`` observations.

    Parameters
    ----------
    n_pool : number of observations in the pool
    n_train, n_test : wanted sizes (disentanglement_lib: 10,000 and 5,000)
    seed : int

    Returns
    -------
    train, test : int arrays of row indices, disjoint, drawn without replacement from one
        permutation. When ``n_pool < n_train + n_test`` both shrink in proportion (with a
        warning) so that together they use the whole pool.
    """
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0; got {n_train} and {n_test}")
    perm = _rng(seed, _STREAM_SPLIT).permutation(n_pool)
    if n_train + n_test > n_pool:
        if n_test > 0:
            warnings.warn(f"the pool has {n_pool} observations, fewer than n_train + n_test = "
                          f"{n_train + n_test}; splitting it in the same proportion instead",
                          stacklevel=3)
        new_train = max(1, int(round(n_pool * n_train / (n_train + n_test))))
        n_test = n_pool - new_train
        n_train = new_train
    return perm[:n_train], perm[n_train:n_train + n_test]


def _split(codes, factors, n_train, n_test, seed):
    train, test = split_pool(len(codes), n_train, n_test, seed)
    return codes[train], factors[train], codes[test], factors[test]


class _Groups:
    """Rows of the pool grouped by the value of each factor, for conditional sampling."""

    def __init__(self, factors: np.ndarray):
        self.order = [np.argsort(factors[:, k], kind="stable") for k in range(factors.shape[1])]
        self.sorted = [factors[order, k] for k, order in enumerate(self.order)]
        self.factors = factors

    def sample_same(self, k: int, anchors: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
        """For each anchor row, ``size`` rows drawn uniformly (with replacement) among the rows
        whose factor k equals the anchor's. Returns (len(anchors), size) row indices."""
        values = self.factors[anchors, k]
        start = np.searchsorted(self.sorted[k], values, side="left")
        count = np.searchsorted(self.sorted[k], values, side="right") - start
        offset = np.floor(rng.random((len(anchors), size)) * count[:, None]).astype(np.int64)
        return self.order[k][start[:, None] + np.minimum(offset, count[:, None] - 1)]


# ---------------------------------------------------------------------------------------------
# discretisation and mutual information (disentanglement_lib utils)
# ---------------------------------------------------------------------------------------------

def histogram_discretize(codes: np.ndarray, num_bins: int = 20) -> np.ndarray:
    """disentanglement_lib's ``_histogram_discretize`` on (N, d) codes.

    Each code (column) is cut into ``num_bins`` equal-width bins between its minimum and
    maximum (``np.histogram``), and each value is replaced by ``np.digitize`` against the bins'
    left edges: an int array (N, d) with values 1 .. num_bins.
    """
    codes = np.asarray(codes, dtype=np.float64)
    out = np.zeros(codes.shape, dtype=np.int64)
    for i in range(codes.shape[1]):
        edges = np.histogram(codes[:, i], num_bins)[1]
        out[:, i] = np.digitize(codes[:, i], edges[:-1])
    return out


def discrete_mutual_info(discrete_codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Mutual information in nats (``sklearn.metrics.mutual_info_score``), (d, K):
    ``m[i, k] = I(code i; factor k)`` of discrete codes (N, d) and factors (N, K)."""
    from sklearn.metrics import mutual_info_score

    d, K = discrete_codes.shape[1], factors.shape[1]
    m = np.zeros((d, K))
    for i in range(d):
        for k in range(K):
            m[i, k] = mutual_info_score(factors[:, k], discrete_codes[:, i])
    return m


def discrete_entropy(factors: np.ndarray) -> np.ndarray:
    """Entropy in nats of each factor column (K,), as ``mutual_info_score(y, y)``."""
    from sklearn.metrics import mutual_info_score

    return np.array([mutual_info_score(factors[:, k], factors[:, k]) for k in range(factors.shape[1])])


def mig_from_mutual_info(mutual_info: np.ndarray, entropy: np.ndarray) -> float:
    """Mutual information gap from a (d, K) MI matrix and the (K,) factor entropies.

    For each factor, the gap between the largest and second-largest MI over codes, divided by
    the factor's entropy; averaged over factors. With a single code the second MI is 0.
    Factors with zero entropy (constant on the sample) are left out; nan if none is left.
    """
    ordered = np.sort(mutual_info, axis=0)[::-1]
    second = ordered[1] if len(ordered) > 1 else np.zeros(mutual_info.shape[1])
    ok = entropy > 0
    if not ok.any():
        return math.nan
    return float(np.mean((ordered[0, ok] - second[ok]) / entropy[ok]))


def _one_minus_entropy(p: np.ndarray, base: int) -> np.ndarray:
    """1 - entropy (log base ``base``) of each column of the non-negative p, as
    ``1 - scipy.stats.entropy(p + 1e-11, base=base)``; 1 when base is 1."""
    if base <= 1:
        return np.ones(p.shape[1])
    q = p + 1e-11
    q = q / q.sum(axis=0, keepdims=True)
    return 1.0 - (-(q * np.log(q)).sum(axis=0) / np.log(base))


def dci_from_importance(importance: np.ndarray) -> tuple[float, float]:
    """DCI disentanglement and completeness of a (d, K) importance matrix (codes x factors).

    Disentanglement: 1 - entropy (base K) of each code's importance over factors, weighted by
    the code's share of the total importance. Completeness: 1 - entropy (base d) of each
    factor's importance over codes, weighted by the factor's share. As disentanglement_lib.
    """
    importance = np.abs(np.asarray(importance, dtype=np.float64))
    d, K = importance.shape
    per_code = _one_minus_entropy(importance.T, K)
    per_factor = _one_minus_entropy(importance, d)
    weights = importance if importance.sum() > 0 else np.ones_like(importance)
    code_share = weights.sum(axis=1) / weights.sum()
    factor_share = weights.sum(axis=0) / weights.sum()
    return float(np.sum(per_code * code_share)), float(np.sum(per_factor * factor_share))


def modularity_from_mutual_info(mutual_info: np.ndarray) -> float:
    """Ridgeway & Zemel's modularity from a (d, K) MI matrix, as disentanglement_lib.

    For code i with squared MIs ``s_ik`` and largest ``s_i*``: ``1 - (sum_k s_ik - s_i*) /
    (s_i* (K - 1))``; a code with no information (all MI 0) scores 0; the mean over codes.
    With a single factor every informative code scores 1.
    """
    squared = np.square(np.asarray(mutual_info, dtype=np.float64))
    top = squared.max(axis=1)
    K = squared.shape[1]
    if K == 1:
        per_code = np.where(top > 0, 1.0, 0.0)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            per_code = 1.0 - (squared.sum(axis=1) - top) / (top * (K - 1))
        per_code[top == 0] = 0.0
    return float(np.mean(per_code))


# ---------------------------------------------------------------------------------------------
# the metrics
# ---------------------------------------------------------------------------------------------

def mig(codes: Any, factors: Any, *, n_train: int = 10000, n_test: int = 5000, num_bins: int = 20,
        seed: int = 0) -> dict[str, float]:
    """Mutual information gap (Chen et al., 2018), disentanglement_lib's ``discrete_mig``.

    On the training rows of :func:`split_pool`: each code discretised into ``num_bins``
    equal-width bins (:func:`histogram_discretize`), MI in nats with each factor, normalised by
    the factor's entropy; the gap between the top two codes per factor, averaged over factors.

    Returns ``{"mig": float}`` in [0, 1]; 1 for a perfect axis-aligned code.
    """
    codes, factors = _check(codes, factors)
    z, y, _, _ = _split(codes, factors, n_train, n_test, seed)
    mi = discrete_mutual_info(histogram_discretize(z, num_bins), y)
    return {"mig": mig_from_mutual_info(mi, discrete_entropy(y))}


def _fit_gbt(z_train, y_train, z_test, y_test, n_estimators, random_state):
    from sklearn.ensemble import GradientBoostingClassifier

    if np.all(y_train == y_train[0]):   # one class on the training rows: nothing to learn
        return np.zeros(z_train.shape[1]), 1.0, float(np.mean(y_test == y_train[0])) if len(y_test) else math.nan
    model = GradientBoostingClassifier(n_estimators=n_estimators, random_state=random_state)
    model.fit(z_train, y_train)
    acc_train = float(np.mean(model.predict(z_train) == y_train))
    acc_test = float(np.mean(model.predict(z_test) == y_test)) if len(y_test) else math.nan
    return np.abs(model.feature_importances_), acc_train, acc_test


def dci(codes: Any, factors: Any, *, n_train: int = 10000, n_test: int = 5000, seed: int = 0,
        dci_trees: int = 100, n_jobs: int = 1) -> dict[str, float]:
    """DCI disentanglement, completeness and informativeness (Eastwood & Williams, 2018).

    As disentanglement_lib: one ``sklearn.ensemble.GradientBoostingClassifier`` per factor
    predicts the factor's class from all codes on the training rows; ``feature_importances_``
    form the (d, K) importance matrix (:func:`dci_from_importance`); informativeness is the
    classifiers' mean accuracy on the training and on the test rows.

    Parameters
    ----------
    dci_trees : boosting stages per classifier; 100 is scikit-learn's default and the
        reference's. Fitting costs about ``dci_trees * classes`` depth-3 trees per factor, the
        slowest part of :func:`compute_disentanglement`; fewer trees trade fidelity for time.
    n_jobs : factors fitted in parallel (joblib processes; -1 = all cores); 1 fits them one after
        another. The result does not depend on it; it only pays off with idle cores.

    DCI is by far the slowest metric (docs/design.md, "Evaluation sizes", has measured times).

    Returns
    -------
    dict with ``dci_disentanglement``, ``dci_completeness`` (in [0, 1], 1 for a perfect code),
    ``dci_informativeness_train``, ``dci_informativeness_test`` (accuracies in [0, 1]).
    """
    codes, factors = _check(codes, factors)
    z, y, zt, yt = _split(codes, factors, n_train, n_test, seed)
    rng = _rng(seed, _STREAM_DCI)
    states = [_random_state(rng) for _ in range(y.shape[1])]
    jobs = [(z, y[:, k], zt, yt[:, k], dci_trees, states[k]) for k in range(y.shape[1])]
    if n_jobs == 1:
        fits = [_fit_gbt(*job) for job in jobs]
    else:
        from joblib import Parallel, delayed

        # processes (joblib's default): gradient boosting holds the GIL between its trees
        fits = Parallel(n_jobs=n_jobs)(delayed(_fit_gbt)(*job) for job in jobs)
    importance = np.stack([f[0] for f in fits], axis=1)
    disentanglement, completeness = dci_from_importance(importance)
    return {
        "dci_disentanglement": disentanglement,
        "dci_completeness": completeness,
        "dci_informativeness_train": float(np.mean([f[1] for f in fits])),
        "dci_informativeness_test": float(np.mean([f[2] for f in fits])),
    }


def sap(codes: Any, factors: Any, *, n_train: int = 10000, n_test: int = 5000, seed: int = 0,
        C: float = 0.01) -> dict[str, float]:
    """Separated attribute predictability (Kumar et al., 2018), disentanglement_lib's discrete path.

    For every code i and factor k, ``sklearn.svm.LinearSVC(C=0.01, class_weight="balanced")``
    is trained on code i alone (training rows) to predict factor k; the score is its test
    accuracy. SAP is the mean over factors of the gap between the two best codes (with a single
    code, the best score). The score is not invariant to rescaling a code (the SVM is
    regularised) and is far below 1 even for a perfect code: a linear classifier on one code
    cannot single out the middle classes of a many-class factor.

    Returns ``{"sap": float}``.
    """
    from sklearn.svm import LinearSVC

    codes, factors = _check(codes, factors)
    z, y, zt, yt = _split(codes, factors, n_train, n_test, seed)
    rng = _rng(seed, _STREAM_SAP)
    d, K = z.shape[1], y.shape[1]
    scores = np.zeros((d, K))
    for k in range(K):
        state = _random_state(rng)
        for i in range(d):
            if np.all(y[:, k] == y[0, k]):
                pred = np.full(len(yt), y[0, k])
            else:
                clf = LinearSVC(C=C, class_weight="balanced", dual="auto", random_state=state)
                clf.fit(z[:, i:i + 1], y[:, k])
                pred = clf.predict(zt[:, i:i + 1])
            scores[i, k] = np.mean(pred == yt[:, k]) if len(yt) else math.nan
    ordered = np.sort(scores, axis=0)[::-1]
    second = ordered[1] if d > 1 else np.zeros(K)
    return {"sap": float(np.mean(ordered[0] - second))}


def modularity(codes: Any, factors: Any, *, n_train: int = 10000, n_test: int = 5000, num_bins: int = 20,
               seed: int = 0) -> dict[str, float]:
    """Modularity (Ridgeway & Zemel, 2018) as disentanglement_lib.

    The (d, K) MI matrix of the discretised codes (as :func:`mig`) on the training rows, then
    :func:`modularity_from_mutual_info`. A perfect code scores 1; a random one does not score
    0 (its small MIs are spread evenly, which the definition counts as partly modular).

    Returns ``{"modularity": float}``.
    """
    codes, factors = _check(codes, factors)
    z, y, _, _ = _split(codes, factors, n_train, n_test, seed)
    mi = discrete_mutual_info(histogram_discretize(z, num_bins), y)
    return {"modularity": modularity_from_mutual_info(mi)}


def _logistic_ovr(random_state: int):
    """scikit-learn's LogisticRegression as disentanglement_lib ran it (sklearn 0.20 defaults:
    liblinear, one-vs-rest, C = 1, probabilities of the binary models normalised to sum 1)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    return OneVsRestClassifier(LogisticRegression(solver="liblinear", C=1.0, random_state=random_state))


def _macro_auc(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Mean one-vs-rest ROC AUC over the classes that have positives and negatives in y."""
    from sklearn.metrics import roc_auc_score

    aucs = []
    for c, cls in enumerate(classes):
        positive = y == cls
        if 0 < positive.sum() < len(y):
            aucs.append(roc_auc_score(positive, proba[:, c]))
    return float(np.mean(aucs)) if aucs else math.nan


def explicitness(codes: Any, factors: Any, *, n_train: int = 10000, n_test: int = 5000,
                 seed: int = 0) -> dict[str, float]:
    """Explicitness (Ridgeway & Zemel, 2018) as disentanglement_lib.

    Codes standardised with the training rows' mean and standard deviation (a constant code is
    left at 0); per factor a one-vs-rest logistic regression on all codes (liblinear, C = 1, as
    the reference's scikit-learn defaults of the time); the score is the one-vs-rest ROC AUC
    averaged over the factor's classes, then over factors, on the training and the test rows.
    A random code scores 0.5; a perfect one close to 1 (about 0.93 with ten-class factors, one
    code each: a linear one-vs-rest model on one code cannot single out the middle classes).

    Returns ``{"explicitness_train": float, "explicitness_test": float}``.
    """
    codes, factors = _check(codes, factors)
    z, y, zt, yt = _split(codes, factors, n_train, n_test, seed)
    mean, std = z.mean(axis=0), z.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    z, zt = (z - mean) / std, (zt - mean) / std
    rng = _rng(seed, _STREAM_EXPLICIT)
    train, test = [], []
    for k in range(y.shape[1]):
        state = _random_state(rng)
        if np.all(y[:, k] == y[0, k]):
            continue
        clf = _logistic_ovr(state).fit(z, y[:, k])
        train.append(_macro_auc(y[:, k], clf.predict_proba(z), clf.classes_))
        if len(yt):
            test.append(_macro_auc(yt[:, k], clf.predict_proba(zt), clf.classes_))
    return {
        "explicitness_train": float(np.nanmean(train)) if train else math.nan,
        "explicitness_test": float(np.nanmean(test)) if test else math.nan,
    }


def spearman_mcc_score(codes: Any, factors: Any, *, n_train: int = 10000, n_test: int = 5000,
                       seed: int = 0) -> dict[str, float]:
    """Mean |Spearman rho| of Hungarian-matched factor/code pairs (:func:`gem.metrics.spearman_mcc`)
    on the training rows of :func:`split_pool`. Returns ``{"spearman_mcc": float}``."""
    codes, factors = _check(codes, factors)
    z, y, _, _ = _split(codes, factors, n_train, n_test, seed)
    return {"spearman_mcc": spearman_mcc(z, y)["mcc"]}


def _factorvae_votes(codes, groups, n_votes, batch_size, global_var, active, rng, chunk=512):
    K = groups.factors.shape[1]
    votes = np.zeros((K, codes.shape[1]), dtype=np.int64)
    active_index = np.flatnonzero(active)
    for start in range(0, n_votes, chunk):
        m = min(chunk, n_votes - start)
        fixed = rng.integers(K, size=m)
        anchors = rng.integers(len(codes), size=m)
        for k in range(K):
            sel = np.flatnonzero(fixed == k)
            if not len(sel):
                continue
            rows = groups.sample_same(k, anchors[sel], batch_size, rng)
            local = np.var(codes[rows][:, :, active_index], axis=1, ddof=1)
            best = active_index[np.argmin(local / global_var[active_index], axis=1)]
            np.add.at(votes, (k, best), 1)
    return votes


def factorvae_score(codes: Any, factors: Any, *, batch_size: int = 64, n_train: int = 10000,
                    n_test: int = 5000, n_variance: int = 10000, prune_threshold: float = 0.05,
                    seed: int = 0) -> dict[str, float]:
    """FactorVAE score (Kim & Mnih, 2018), disentanglement_lib's ``factor_vae_score`` defaults.

    1. Global variances of the codes over ``n_variance`` random observations (ddof 1); codes
       whose standard deviation is below ``prune_threshold`` are inactive.
    2. A vote: choose a factor k, draw a batch of ``batch_size`` observations with factor k
       fixed (conditioning on the pool, see the module notes), divide each active code's
       variance over the batch by its global variance and vote (k, code with the smallest).
    3. ``n_train`` votes train a majority-vote classifier (each code predicts the factor that
       voted for it most); its accuracy on ``n_test`` fresh votes is the score.

    Unlike disentanglement_lib, a vote indexes the code among *all* codes (the reference
    indexes the active codes only, which mislabels votes once a code is pruned); the two agree
    when no code is pruned.

    Returns
    -------
    dict: ``factorvae_score`` (evaluation accuracy, 1 for a perfect code, about 1/K for a
    random one), ``factorvae_score_train`` (training accuracy), ``factorvae_active_dims``.
    """
    codes, factors = _check(codes, factors)
    rng = _rng(seed, _STREAM_FACTORVAE)
    sample = rng.choice(len(codes), size=n_variance, replace=n_variance > len(codes))
    global_var = np.var(codes[sample], axis=0, ddof=1)
    active = (np.sqrt(global_var) >= prune_threshold) & (global_var > 0)
    if not active.any():
        return {"factorvae_score": 0.0, "factorvae_score_train": 0.0, "factorvae_active_dims": 0.0}
    groups = _Groups(factors)
    train_votes = _factorvae_votes(codes, groups, n_train, batch_size, global_var, active, rng)
    classifier = np.argmax(train_votes, axis=0)
    columns = np.arange(train_votes.shape[1])
    eval_votes = _factorvae_votes(codes, groups, n_test, batch_size, global_var, active, rng)
    return {
        "factorvae_score": float(eval_votes[classifier, columns].sum() / max(eval_votes.sum(), 1)),
        "factorvae_score_train": float(train_votes[classifier, columns].sum() / max(train_votes.sum(), 1)),
        "factorvae_active_dims": float(active.sum()),
    }


def _betavae_points(codes, groups, n_points, batch_size, rng, chunk=512):
    K = groups.factors.shape[1]
    points = np.zeros((n_points, codes.shape[1]))
    labels = rng.integers(K, size=n_points)
    for start in range(0, n_points, chunk):
        stop = min(start + chunk, n_points)
        first = rng.integers(len(codes), size=(stop - start, batch_size))
        for k in range(K):
            sel = np.flatnonzero(labels[start:stop] == k)
            if not len(sel):
                continue
            anchors = first[sel].reshape(-1)
            second = groups.sample_same(k, anchors, 1, rng).reshape(len(sel), batch_size)
            points[start + sel] = np.abs(codes[first[sel]] - codes[second]).mean(axis=1)
    return points, labels


def betavae_score(codes: Any, factors: Any, *, batch_size: int = 64, n_train: int = 10000,
                  n_test: int = 5000, seed: int = 0) -> dict[str, float]:
    """BetaVAE score (Higgins et al., 2017), disentanglement_lib's ``beta_vae_sklearn``.

    A point: choose a factor k; draw ``batch_size`` pairs of observations that share the value
    of factor k (the first of each pair uniformly from the pool, the second among the
    observations with the same value of factor k); the feature vector is the mean absolute
    difference of the pairs' codes and the label is k. A logistic regression (the reference's
    scikit-learn defaults: liblinear, one-vs-rest, C = 1) is trained on ``n_train`` points; the
    score is its accuracy on ``n_test`` fresh points.

    Returns ``{"betavae_score": evaluation accuracy, "betavae_score_train": training accuracy}``;
    1 for a perfect code, about 1/K for a random one.
    """
    codes, factors = _check(codes, factors)
    rng = _rng(seed, _STREAM_BETAVAE)
    groups = _Groups(factors)
    x_train, y_train = _betavae_points(codes, groups, n_train, batch_size, rng)
    x_test, y_test = _betavae_points(codes, groups, n_test, batch_size, rng)
    if np.all(y_train == y_train[0]):   # a single factor: nothing to tell apart
        return {"betavae_score": float(np.mean(y_test == y_train[0])), "betavae_score_train": 1.0}
    clf = _logistic_ovr(_random_state(rng)).fit(x_train, y_train)
    return {
        "betavae_score": float(np.mean(clf.predict(x_test) == y_test)),
        "betavae_score_train": float(np.mean(clf.predict(x_train) == y_train)),
    }


#: Metric name -> (function, the keys it returns). ``compute_disentanglement`` runs them in order.
METRICS: dict[str, tuple[Callable[..., dict], tuple[str, ...]]] = {
    "mig": (mig, ("mig",)),
    "dci": (dci, ("dci_disentanglement", "dci_completeness", "dci_informativeness_train",
                  "dci_informativeness_test")),
    "sap": (sap, ("sap",)),
    "modularity": (modularity, ("modularity",)),
    "explicitness": (explicitness, ("explicitness_train", "explicitness_test")),
    "spearman_mcc": (spearman_mcc_score, ("spearman_mcc",)),
    "factorvae": (factorvae_score, ("factorvae_score", "factorvae_score_train", "factorvae_active_dims")),
    "betavae": (betavae_score, ("betavae_score", "betavae_score_train")),
}


def resolve_metrics(metrics: Optional[Iterable[str]]) -> list[str]:
    """Metric names of :data:`METRICS` for names or result keys (None = all), in table order."""
    if metrics is None:
        return list(METRICS)
    if isinstance(metrics, str):
        metrics = [metrics]
    by_key = {key: name for name, (_, keys) in METRICS.items() for key in keys}
    chosen = []
    for item in metrics:
        name = item if item in METRICS else by_key.get(item)
        if name is None:
            raise ConfigurationError(f"unknown disentanglement metric {item!r}; choose from "
                                     f"{', '.join(METRICS)} (or any of their result keys)")
        if name not in chosen:
            chosen.append(name)
    return [name for name in METRICS if name in chosen]


def compute_disentanglement(codes: Any, factors: Any, seed: int = 0, n_train: int = 10000, n_test: int = 5000,
                            metrics: Optional[Sequence[str]] = None, *, batch_size: int = 64,
                            num_bins: int = 20, dci_trees: int = 100, n_jobs: int = 1,
                            on_metric: Optional[Callable[[str], None]] = None) -> dict[str, float]:
    """Run all (or some) disentanglement metrics on one pool and return a flat dict of floats.

    Parameters
    ----------
    codes : float array (N, d)
        Representation (posterior means) of every observation of the pool.
    factors : int array (N, K)
        Ground-truth factor classes of the same observations.
    seed : int
        Every metric is deterministic for a fixed seed, and gives the same value alone.
    n_train, n_test : int
        Training / test rows of the split (MIG, DCI, SAP, modularity, explicitness, MCC) and
        training / evaluation votes or points (FactorVAE, BetaVAE); disentanglement_lib: 10,000
        and 5,000.
    metrics : names from :data:`METRICS` (``mig``, ``dci``, ``sap``, ``modularity``,
        ``explicitness``, ``spearman_mcc``, ``factorvae``, ``betavae``) or result keys; None = all.
    batch_size : batch of the FactorVAE / BetaVAE scores (64).
    num_bins : bins of the MI discretisation (20).
    dci_trees, n_jobs : see :func:`dci`.
    on_metric : called with each metric's name when it is done (progress).

    Returns
    -------
    dict of floats with the keys of the chosen metrics: ``mig``, ``dci_disentanglement``,
    ``dci_completeness``, ``dci_informativeness_train``, ``dci_informativeness_test``, ``sap``,
    ``modularity``, ``explicitness_train``, ``explicitness_test``, ``spearman_mcc``,
    ``factorvae_score`` (+ ``factorvae_score_train``, ``factorvae_active_dims``),
    ``betavae_score`` (+ ``betavae_score_train``).
    """
    codes, factors = _check(codes, factors)
    split = dict(n_train=n_train, n_test=n_test, seed=seed)
    extra = {
        "mig": dict(num_bins=num_bins),
        "dci": dict(dci_trees=dci_trees, n_jobs=n_jobs),
        "modularity": dict(num_bins=num_bins),
        "factorvae": dict(batch_size=batch_size),
        "betavae": dict(batch_size=batch_size),
    }
    names = resolve_metrics(metrics)
    if len(codes) < n_train + n_test and any(n in names for n in ("mig", "dci", "sap", "modularity",
                                                                    "explicitness", "spearman_mcc")):
        split_pool(len(codes), n_train, n_test, seed)   # warn once here ...
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the pool has")   # ... not once per metric
        for name in names:
            function = METRICS[name][0]
            out.update(function(codes, factors, **split, **extra.get(name, {})))
            if on_metric is not None:
                on_metric(name)
    return out
