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
