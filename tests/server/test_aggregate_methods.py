"""Exact, FFA and TIES aggregation: hand-computed cases and properties (hypothesis)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.aggregate import (
    ExactAggregator,
    FfaAggregator,
    TiesAggregator,
    delta_w,
    fedavg,
    make_aggregator,
    modules,
)
from server.modulewise import round_aggregator

A, B = "m.lora_A.weight", "m.lora_B.weight"


def product(state, scale=1.0):
    return {m: delta_w(state, m, scale) for m in modules(state)}


def run(agg, clients):
    for state, weight in clients:
        agg.add(state, weight)
    return agg.result()


def test_exact_reproduces_the_weighted_mean_of_products_hand_computed():
    c1 = {B: torch.tensor([[1.0, 0.0], [0.0, 0.0]]), A: torch.eye(2)}  # dW1 = [[1, 0], [0, 0]]
    # dW2 = B2 @ A2 = [[0, 0], [1, 0]]
    c2 = {B: torch.tensor([[0.0, 0.0], [0.0, 1.0]]), A: torch.tensor([[0.0, 2.0], [1.0, 0.0]])}
    out = run(ExactAggregator(rank=2, scale=0.5), [(c1, 1), (c2, 3)])
    # s = 0.5: mean dW = 0.5 * (1 * dW1 + 3 * dW2) / 4 = [[0.125, 0], [0.375, 0]]
    assert torch.allclose(delta_w(out, "m", 0.5), torch.tensor([[0.125, 0.0], [0.375, 0.0]]), atol=1e-6)
    # FedAvg of the same factors gives another matrix: the bias exact aggregation removes
    avg = fedavg([(c1, 1), (c2, 3)])
    assert not torch.allclose(delta_w(avg, "m", 0.5), delta_w(out, "m", 0.5), atol=1e-3)


def test_refactored_factors_share_the_singular_values_evenly():
    c = {B: torch.tensor([[4.0], [0.0]]), A: torch.tensor([[1.0, 0.0, 0.0]])}  # dW = 4 e1 e1^T
    out = run(ExactAggregator(rank=1, scale=1.0), [(c, 1)])
    assert out[B].abs().max().item() == pytest.approx(2.0) and out[A].abs().max().item() == pytest.approx(2.0)


def test_ffa_is_exact_with_a_frozen_shared_a():
    a = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    glob = {A: a, B: torch.zeros(2, 2)}
    c1, c2 = {A: a, B: torch.tensor([[1.0, 0.0], [0.0, 0.0]])}, {A: a, B: torch.tensor([[0.0, 0.0], [2.0, 2.0]])}
    out = run(FfaAggregator(glob), [(c1, 1), (c2, 1)])
    mean_of_products = (product(c1)["m"] + product(c2)["m"]) / 2
    assert torch.equal(out[A], a)
    assert torch.allclose(product(out)["m"], mean_of_products)


def test_ffa_refuses_a_client_that_trained_a():
    glob = {A: torch.ones(1, 2), B: torch.zeros(2, 1)}
    with pytest.raises(ValueError, match="differs from the frozen A"):
        FfaAggregator(glob).add({A: torch.zeros(1, 2), B: torch.zeros(2, 1)}, 1)


def test_ties_trims_elects_and_takes_the_disjoint_mean_hand_computed():
    glob = {B: torch.ones(1, 1), A: torch.zeros(1, 4)}  # global dW = 0, so tau_i = dW_i = A_i
    c1 = {B: torch.ones(1, 1), A: torch.tensor([[3.0, -1.0, 0.5, 2.0]])}  # trimmed (top 2): [3, 0, 0, 2]
    c2 = {B: torch.ones(1, 1), A: torch.tensor([[-2.0, -2.0, 1.0, 1.0]])}  # trimmed (top 2): [-2, -2, 0, 0]
    out = run(TiesAggregator(glob, rank=1, scale=1.0, density=0.5, lam=1.0), [(c1, 1), (c2, 1)])
    # elected signs of [1, -2, 0, 2]: +, -, +, +; disjoint means: [3, -2, 0 (no one agrees), 2]
    assert torch.allclose(product(out)["m"], torch.tensor([[3.0, -2.0, 0.0, 2.0]]), atol=1e-5)


def test_ties_lambda_scales_the_merged_update():
    glob = {B: torch.ones(1, 1), A: torch.zeros(1, 2)}
    c = {B: torch.ones(1, 1), A: torch.tensor([[1.0, -4.0]])}
    out = run(TiesAggregator(glob, rank=1, scale=1.0, density=1.0, lam=0.5), [(c, 1)])
    assert torch.allclose(product(out)["m"], torch.tensor([[0.5, -2.0]]), atol=1e-5)


# ------------------------------------------------------------------ properties

METHODS = ("fedavg", "exact", "ffa", "ties")
D_OUT, D_IN, R = 3, 4, 2


def _clients(seed: int, n: int, shared_a: torch.Tensor):
    g = torch.Generator().manual_seed(seed)
    return [
        ({A: shared_a.clone(), B: torch.randn(D_OUT, R, generator=g)}, float(torch.randint(1, 50, (1,), generator=g)))
        for _ in range(n)
    ]


def _global(seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    return {A: torch.randn(R, D_IN, generator=g), B: torch.randn(D_OUT, R, generator=g)}


class _Deltas:
    """The module-wise aggregators take deltas: feed them ``state - global``."""

    def __init__(self, method, glob):
        self.glob = glob
        density = 1.0 if method == "ties" else 0.2
        self.agg = round_aggregator(method, glob, rank=R, alpha=2.0 * R, density=density)

    def add(self, state, weight):
        self.agg.add({k: state[k] - self.glob[k] for k in state}, weight)

    def result(self):
        return self.agg.result()


def _agg(method, glob, impl="today"):
    if impl == "new":
        return _Deltas(method, glob)
    return make_aggregator(method, glob, rank=R, alpha=2.0 * R, density=1.0 if method == "ties" else 0.2)


IMPLS = st.sampled_from(["today", "new"])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 5), method=st.sampled_from(METHODS), data=st.data(), impl=IMPLS)
def test_order_of_clients_does_not_matter(seed, n, method, data, impl):
    glob = _global(seed)
    clients = _clients(seed, n, glob[A])
    order = data.draw(st.permutations(range(n)))
    first = product(run(_agg(method, glob, impl), clients), 2.0)
    second = product(run(_agg(method, glob, impl), [clients[i] for i in order]), 2.0)
    assert torch.allclose(first["m"], second["m"], atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), method=st.sampled_from(METHODS), copies=st.integers(1, 4), impl=IMPLS)
def test_identical_clients_give_back_their_adapter(seed, method, copies, impl):
    glob = _global(seed)
    ((client, _),) = _clients(seed, 1, glob[A])
    out = run(_agg(method, glob, impl), [(client, 7.0)] * copies)
    # up to the sign/rotation freedom of an SVD re-factorization: compare the products
    assert torch.allclose(product(out, 2.0)["m"], product(client, 2.0)["m"], atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), method=st.sampled_from(METHODS), factor=st.floats(0.01, 100), impl=IMPLS)
def test_weights_are_normalized(seed, method, factor, impl):
    glob = _global(seed)
    clients = _clients(seed, 3, glob[A])
    base = product(run(_agg(method, glob, impl), clients), 2.0)
    scaled = product(run(_agg(method, glob, impl), [(s, w * factor) for s, w in clients]), 2.0)
    assert torch.allclose(base["m"], scaled["m"], atol=1e-4)
