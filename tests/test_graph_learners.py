"""The graph learners: GCN normalisation (paper Eq. 9), anchoring, training, binding."""

import numpy as np
import pytest
import torch
from torch_geometric.nn import GCNConv

from gem.interfaces import BuildContext
from gem.relations import RelationModel
from gem_plugins.graph_learners import FixedGraph, FixedGraphOptions, GCNGraph, GCNGraphOptions, IdentityGraph


def test_gcn_normalisation_matches_hand_computed_case():
    # Directed weighted graph on 3 nodes: 0->1 (0.5), 1->2 (1.0), 2->0 (0.2).
    # Ã = A + I; degrees are the column sums of Ã (the in-degree of each target):
    # d = [1.2, 1.5, 2.0]; N = D^-1/2 Ã D^-1/2, by hand:
    expected_n = np.array([
        [1 / 1.2, 0.5 / np.sqrt(1.2 * 1.5), 0.0],
        [0.0, 1 / 1.5, 1 / np.sqrt(1.5 * 2.0)],
        [0.2 / np.sqrt(2.0 * 1.2), 0.0, 1 / 2.0],
    ])
    assert expected_n[0, 1] == pytest.approx(0.372678, abs=1e-6)
    assert expected_n[2, 0] == pytest.approx(0.129099, abs=1e-6)
    # gem's layers are dense (DenseGCNConv); they must give what the sparse GCNConv gives.
    graph = GCNGraph(GCNGraphOptions(hidden=3, layers=1), _context(3))
    graph.set_anchor(torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 1.0], [0.2, 0.0, 1.0]]))
    sparse = GCNConv(3, 3, add_self_loops=True, normalize=True)
    with torch.no_grad():
        for conv in (graph.convs[0], sparse):
            conv.lin.weight.copy_(torch.eye(3))
            conv.bias.zero_()
    edge_index = torch.tensor([[0, 1, 2], [1, 2, 0]])
    weight = torch.tensor([0.5, 1.0, 0.2])
    # A message flows source -> target, so node j receives sum_i N[i, j] x_i: out = N^T X W.
    out = sparse(torch.eye(3), edge_index, weight)
    np.testing.assert_allclose(out.detach().numpy(), expected_n.T, atol=1e-6)
    np.testing.assert_allclose(graph.node_embeddings().detach().numpy(), np.tanh(expected_n.T), atol=1e-6)


def _context(n):
    return BuildContext(seed=0, run_dir=None, cache_dir=None, attributes=[f"a{i}" for i in range(n)])


S = torch.tensor([[1.0, 0.6, -0.3], [0.2, 1.0, 0.0], [-0.5, 0.1, 1.0]])


def test_gcn_graph_starts_at_its_anchor_with_signs_and_unit_diagonal():
    graph = GCNGraph(GCNGraphOptions(), _context(3))
    graph.set_anchor(S)
    A = graph().detach()
    off = ~torch.eye(3, dtype=torch.bool)
    # S = 0 becomes the smallest representable edge (sigmoid of logit(1e-3)).
    expected = torch.where(S.abs() > 0, S, torch.full_like(S, 1e-3))
    torch.testing.assert_close(A[off], expected[off], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.diagonal(A), torch.ones(3))
    assert float(graph.penalty().detach()) == pytest.approx(10 * 1e-3 ** 2, rel=1e-3)  # only the S = 0 edge


def test_gcn_graph_learns_an_asymmetric_target_through_its_output():
    graph = GCNGraph(GCNGraphOptions(anchor_weight=0.0), _context(3))
    graph.set_anchor(S)
    target = torch.tensor([[0.0, 0.3, 0.1], [0.7, 0.0, 0.4], [0.2, 0.5, 0.0]])
    opt = torch.optim.Adam(graph.parameters(), lr=0.01)
    start = float((graph.magnitude() - target).abs().max())
    for _ in range(300):
        opt.zero_grad()
        (graph.magnitude() - target).pow(2).sum().backward()
        opt.step()
    A = graph().detach()
    assert float((graph.magnitude() - target).abs().max()) < min(0.1, start / 3)
    assert A[0, 2] < 0 and A[2, 0] < 0 and A[0, 1] > 0  # signs of S kept
    assert abs(float(A[1, 0] - A[0, 1])) > 0.2  # asymmetric


def test_anchor_penalty_pulls_back_and_bootstrap_moves_anchor():
    graph = GCNGraph(GCNGraphOptions(anchor_tau=0.5, anchor_every=1), _context(3))
    graph.set_anchor(S)
    with torch.no_grad():
        graph.target.weight.fill_(0.5)
    assert float(graph.penalty()) > 0
    before = graph.anchor.clone()
    graph.end_step(1)
    expected = 0.5 * before + 0.5 * graph.magnitude().detach()
    torch.testing.assert_close(graph.anchor, expected)


@pytest.mark.parametrize("every", [0, -3])
def test_anchor_every_below_one_is_rejected_naming_the_key(registry, every):
    from gem.recipe import RecipeError, validate_recipe

    with pytest.raises(ValueError, match=rf"anchor_every must be >= 1, got {every}"):
        GCNGraphOptions(anchor_every=every)
    with pytest.raises(RecipeError, match=r"recipe key 'graph'.*anchor_every must be >= 1"):
        validate_recipe({"graph": {"plugin": "gcn", "anchor_every": every}}, registry)
    assert GCNGraphOptions(anchor_every=1).anchor_every == 1


def test_fixed_and_identity_graphs():
    fixed = FixedGraph(FixedGraphOptions(scale=0.5), _context(3))
    fixed.set_anchor(S)
    expected = torch.eye(3) + 0.5 * S * (1 - torch.eye(3))
    torch.testing.assert_close(fixed(), expected)
    ident = IdentityGraph(None, _context(3))
    ident.set_anchor(S)
    torch.testing.assert_close(ident(), torch.eye(3))


def test_relation_model_applies_a_transpose_z_in_bound_order():
    fixed = FixedGraph(FixedGraphOptions(), _context(3))
    fixed.set_anchor(S)
    rel = RelationModel(fixed, 3)
    z = torch.randn(4, 3)
    torch.testing.assert_close(rel(z), z)  # identity before binding
    latent_of, sign = np.array([2, 0, 1]), np.array([1.0, -1.0, 1.0])
    rel.bind(latent_of, sign)
    z_attr = z[:, latent_of] * torch.tensor(sign, dtype=torch.float32)
    expected_attr = (fixed().T @ z_attr.T).T
    out = rel(z)
    torch.testing.assert_close(rel.to_attributes(out), expected_attr)
    torch.testing.assert_close(rel.from_attributes(rel.to_attributes(z)), z)
    with pytest.raises(ValueError, match="permutation"):
        rel.bind(np.array([0, 0, 1]), sign)


# -- calibrated: S corrected for the oracle's measured validity ------------------------------------

from gem_plugins.graph_learners import (CalibratedGraph, CalibratedGraphOptions, disattenuate,  # noqa: E402
                                        oracle_validity)


def test_disattenuate_divides_strong_edges_by_the_validities_and_keeps_weak_ones():
    impact = torch.tensor([[1.0, 0.30, -0.05], [0.24, 1.0, 0.6], [-0.2, 0.09, 1.0]])
    out = disattenuate(impact, [0.5, 0.8, 1.0], floor=0.1)
    expected = torch.tensor([[1.0, 0.30 / 0.4, -0.05], [0.24 / 0.4, 1.0, min(0.6 / 0.8, 1.0)],
                             [-0.2 / 0.5, 0.09, 1.0]])
    torch.testing.assert_close(out, expected)
    # clipped to [-1, 1]; one value stands for every attribute; validity 1 changes nothing
    torch.testing.assert_close(disattenuate(impact, [0.3], floor=0.0)[0, 1], torch.tensor(1.0))
    torch.testing.assert_close(disattenuate(impact, [1.0], floor=0.0), impact)
    with pytest.raises(ValueError, match="one per attribute"):
        disattenuate(impact, [0.5, 0.5], floor=0.1)


def test_oracle_validity_is_spearman_per_column_and_skips_missing_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=(200, 3)).astype(float)
    scores = labels.copy()
    scores[:, 1] = 5 - scores[:, 1]  # reversed: rho = -1
    scores[:, 2] = rng.integers(0, 6, size=200)
    scores[:10, 0] = np.nan
    v = oracle_validity(scores, labels)
    assert v[0] == pytest.approx(1.0) and v[1] == pytest.approx(-1.0) and abs(v[2]) < 0.2
    assert np.isnan(oracle_validity(np.zeros((5, 1)), np.arange(5.0)[:, None]))[0]


def _correlated_scores(rng, n):
    """0-5 scores of 4 attributes with two strong relations (a Gaussian copula)."""
    g = rng.standard_normal((n, 4))
    g[:, 1] = 0.8 * g[:, 0] + 0.6 * g[:, 1]
    g[:, 3] = -0.7 * g[:, 2] + np.sqrt(1 - 0.49) * g[:, 3]
    from scipy.stats import norm

    return np.minimum((norm.cdf(g) * 6).astype(int), 5)


def test_disattenuated_impact_is_closer_to_the_truth_than_a_noisy_oracles():
    # What the calibrated learner relies on: an oracle that replaces 40% of its scores at random
    # attenuates Somers' D, and dividing by the validity measured on 300 labelled images undoes
    # most of that; a perfect oracle (validity 1) is left alone.
    from gem.somers_d import somers_d_matrix

    rng = np.random.default_rng(0)
    truth = _correlated_scores(rng, 4000)
    true_impact = torch.as_tensor(somers_d_matrix(truth), dtype=torch.float32)

    def noisy(x):
        x = x.copy()
        wrong = rng.random(x.shape) < 0.4
        x[wrong] = rng.integers(0, 6, size=int(wrong.sum()))
        return x

    scores = noisy(truth)
    S = torch.as_tensor(somers_d_matrix(scores), dtype=torch.float32)
    calibration = truth[:300]
    validity = oracle_validity(noisy(calibration), calibration)
    assert np.all((validity > 0.4) & (validity < 0.75))
    off = ~torch.eye(4, dtype=torch.bool)
    error_s = float((S - true_impact).abs()[off].mean())
    error_a = float((disattenuate(S, validity.tolist(), floor=0.1) - true_impact).abs()[off].mean())
    assert error_a < 0.5 * error_s
    exact = torch.as_tensor(somers_d_matrix(truth[:1500]), dtype=torch.float32)
    validity_exact = oracle_validity(calibration, calibration)
    torch.testing.assert_close(disattenuate(exact, validity_exact.tolist(), floor=0.1), exact)


def test_calibrated_graph_is_the_corrected_impact_untrained_by_default():
    graph = CalibratedGraph(CalibratedGraphOptions(validity=[0.8]), _context(3))
    graph.set_anchor(S)
    assert not graph.trainable and not any(p.requires_grad for p in graph.parameters())
    torch.testing.assert_close(graph(), disattenuate(S, [0.8], floor=0.1).clamp(-1, 1), atol=1e-6, rtol=0)
    assert float(graph.penalty()) == 0.0
    plain = CalibratedGraph(CalibratedGraphOptions(), _context(3))  # validity 1: A = S, as `fixed`
    plain.set_anchor(S)
    fixed = FixedGraph(FixedGraphOptions(), _context(3))
    fixed.set_anchor(S)
    torch.testing.assert_close(plain(), fixed())


def test_calibrated_graph_with_refine_trains_from_the_corrected_anchor():
    graph = CalibratedGraph(CalibratedGraphOptions(validity=[0.8], refine=True), _context(3))
    graph.set_anchor(S)
    assert graph.trainable
    corrected = disattenuate(S, [0.8], floor=0.1)
    off = ~torch.eye(3, dtype=torch.bool)
    strong = off & (S.abs() >= 0.1)
    torch.testing.assert_close(graph()[strong], corrected[strong], atol=1e-5, rtol=0)
    torch.testing.assert_close(graph.anchor[strong], corrected.abs()[strong])
    opt = torch.optim.Adam([p for p in graph.parameters() if p.requires_grad], lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        (graph.magnitude().sum() + graph.penalty()).backward()
        opt.step()
    assert float(graph.magnitude()[strong].sum()) < float(corrected.abs()[strong].sum())


@pytest.mark.parametrize("key, value, message", [
    ("validity", [0.0], r"validity values must be in \(0, 1\], got 0.0"),
    ("validity", [0.5, 1.2], r"validity values must be in \(0, 1\], got 1.2"),
    ("validity", [], "validity must have at least one value"),
    ("floor", 1.5, r"floor must be in \[0, 1\], got 1.5"),
    ("anchor_weight", -1.0, "anchor_weight must be >= 0"),
])
def test_calibrated_options_are_range_checked_naming_the_key(registry, key, value, message):
    from gem.recipe import RecipeError, validate_recipe

    with pytest.raises(RecipeError, match=rf"recipe key 'graph'.*{message}"):
        validate_recipe({"graph": {"plugin": "calibrated", key: value}}, registry)
    recipe = validate_recipe({"graph": {"plugin": "calibrated", "validity": [0.6], "floor": 0.0}}, registry)
    assert recipe.plugin_options["graph"].validity == [0.6]


def test_calibrated_graph_refuses_a_validity_list_of_the_wrong_length():
    from gem.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"graph.validity has 2 values; give one, or one per attribute \(3"):
        CalibratedGraph(CalibratedGraphOptions(validity=[0.5, 0.6]), _context(3))


def test_decoder_absorbs_any_relation_graph_so_the_loss_cannot_identify_a():
    # The mechanism behind docs/results/noisy-oracle.md: the decoder's first layer is linear, so
    # decoder(A^T z) with weight W equals decoder(B^T z) with weight W A^T B^-T for any invertible B.
    from gem_plugins.architectures import BurgessDecoder

    torch.manual_seed(0)
    decoder = BurgessDecoder(3)
    z = torch.randn(8, 3)
    A = torch.eye(3) + 0.6 * (1 - torch.eye(3)) * S
    B = torch.eye(3)
    with torch.no_grad():
        expected = decoder(z @ A)  # z_rel = A^T z per sample
        W = decoder.fc[0].weight.clone()
        decoder.fc[0].weight.copy_(W @ (torch.linalg.solve(B, A)).T)
        torch.testing.assert_close(decoder(z @ B), expected, atol=1e-5, rtol=1e-5)
        decoder.fc[0].weight.copy_(W)
        assert not torch.allclose(decoder(z @ B), expected, atol=1e-3)
