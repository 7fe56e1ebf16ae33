"""Disentanglement measured as the correlated-factors protocol asks: on images whose factors are
independent, and on both codes (the exogenous μ and the attribute code z_rel = Aᵀμ)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from gem.context import RunContext, Split
from gem.evaluation import EvalSettings, evaluate
from gem.interfaces import BuildContext, ImageDataset
from gem.relations import RelationModel
from gem.run_folder import TrainedRun
from gem.somers_d import somers_d_matrix
from gem_plugins.graph_learners import FixedGraph, FixedGraphOptions
from gem_plugins.synthetic import SyntheticOptions, build_synthetic


def _off_diagonal(matrix: np.ndarray) -> np.ndarray:
    return np.abs(matrix[~np.eye(len(matrix), dtype=bool)])


def test_the_synthetic_independent_set_has_independent_factors(tmp_path):
    options = SyntheticOptions(n_images=3000, image_size=16)
    dataset = build_synthetic(options, BuildContext(seed=0, run_dir=tmp_path, cache_dir=tmp_path))
    levels = dataset.factor_levels
    # The training factors are correlated along the default edges ...
    trained = somers_d_matrix(np.minimum(dataset.factors * 6 // np.array(levels), 5))
    assert _off_diagonal(trained).max() > 0.3
    # ... the independent set's are not: every off-diagonal Somers' D is within sampling error of 0
    # (its standard error is about 1/sqrt(n) = 0.018 here; 0.06 is more than three of them).
    independent, rows = dataset.independent_sample(3000, 0)
    classes = independent.factors[rows]
    assert classes.shape == (3000, len(options.factors)) and independent.images.shape == (3000, 16, 16, 3)
    d = somers_d_matrix(np.minimum(classes * 6 // np.array(levels), 5))
    assert _off_diagonal(d).max() < 0.06
    # Each factor still covers its classes uniformly, and the set is new images, cached.
    for k, n_levels in enumerate(levels):
        assert np.bincount(classes[:, k], minlength=n_levels).min() > 3000 / n_levels * 0.7
    again, _ = dataset.independent_sample(3000, 0)
    assert again.info["cache_file"] == independent.info["cache_file"] != dataset.info["cache_file"]
    np.testing.assert_array_equal(again.factors, independent.factors)
    other, _ = dataset.independent_sample(3000, 1)
    assert not np.array_equal(other.factors, independent.factors)


class CodeInPixels(nn.Module):
    """An 'extractor' whose code is written into its images: pixel (0, k) of channel 0 holds code k."""

    def __init__(self, n: int):
        super().__init__()
        self.latent_dim = n
        self.anchor = nn.Parameter(torch.zeros(()))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = (x[:, 0, 0, :self.latent_dim].double() * 255 - 127.5) / 30.0
        return mu.float(), torch.zeros_like(mu).float()


def _run(codes: np.ndarray, factors: np.ndarray, adjacency: np.ndarray) -> TrainedRun:
    n = codes.shape[1]
    images = np.zeros((len(codes), 8, 8, 3), dtype=np.uint8)
    images[:, 0, :n, 0] = np.clip(np.round(codes * 30.0 + 127.5), 0, 255).astype(np.uint8)
    attributes = [f"a{k}" for k in range(n)]
    dataset = ImageDataset(images=images, attributes=attributes, factors=factors, factor_names=attributes,
                           factor_levels=[int(factors[:, k].max()) + 1 for k in range(n)])
    graph = FixedGraph(FixedGraphOptions(), SimpleNamespace(attributes=attributes))
    graph.set_anchor(torch.as_tensor(adjacency, dtype=torch.float32))
    relation = RelationModel(graph, n)
    relation.bind(np.arange(n), np.ones(n))
    context = RunContext(recipe=None, registry=None, accelerator=SimpleNamespace(device=torch.device("cpu")),
                         run_dir=Path("."), plugin_context=None)
    everything = np.arange(len(codes))
    return TrainedRun(context=context, dataset=dataset, extractor=CodeInPixels(n), relation=relation,
                      split=Split(everything, everything, everything), score_indices=everything,
                      scores=np.zeros((len(codes), n)), impact={})


def _decoded_codes(n_images: int, adjacency: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent codes c (written at the pixels' precision) and the factors the decoder sees,
    Aᵀc per image, cut into 8 equally filled classes."""
    rng = np.random.default_rng(0)
    c = np.round(rng.standard_normal((n_images, len(adjacency))).clip(-4, 4) * 30.0) / 30.0
    z_rel = c @ adjacency
    factors = np.stack([np.searchsorted(np.quantile(col, np.linspace(0, 1, 9)[1:-1]), col) for col in z_rel.T], 1)
    return c, factors


SETTINGS = EvalSettings(n_train=1200, n_test=600, dci_trees=10)
METRICS = ["spearman_mcc", "mig", "dci"]


def test_factors_that_are_a_transpose_of_independent_codes_score_higher_on_the_attribute_code():
    adjacency = np.array([[1.0, 0.9, 0.0], [0.0, 1.0, 0.0], [0.0, -0.8, 1.0]])
    codes, factors = _decoded_codes(1800, adjacency)
    result = evaluate(_run(codes, factors, adjacency), METRICS, SETTINGS)["disentanglement"]
    exo, attr = result["exogenous"], result["attribute"]
    assert not result["evaluation"]["identity_graph"] and result["evaluation"]["factor_set"] == "training"
    assert attr["spearman_mcc"] > 0.95 and attr["spearman_mcc"] > exo["spearman_mcc"] + 0.1
    assert attr["dci_disentanglement"] > exo["dci_disentanglement"] + 0.1
    assert attr["mig"] > exo["mig"] + 0.1


def test_under_the_identity_graph_both_codes_are_one():
    from gem.evaluation import _score_code
    from gem.training import encode_images

    identity = np.eye(3)
    codes, factors = _decoded_codes(1800, identity)
    run = _run(codes, factors, identity)
    result = evaluate(run, METRICS, SETTINGS)["disentanglement"]
    assert result["evaluation"]["identity_graph"]
    assert result["attribute"] == result["exogenous"]
    # The shortcut is exact: through the identity graph the attribute code is μ itself, and its
    # metrics computed the long way are the exogenous ones.
    mu = torch.from_numpy(encode_images(run.extractor, run.dataset.images, np.arange(len(codes)), run.device))
    attribute = run.relation.to_attributes(run.relation(mu))
    torch.testing.assert_close(attribute, run.relation.to_attributes(mu))
    assert _score_code(attribute.numpy(), factors, METRICS, SETTINGS, {}, "attribute") == result["exogenous"]
