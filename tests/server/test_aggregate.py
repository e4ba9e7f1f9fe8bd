import pytest
import torch

from server.aggregate import RunningWeightedMean, apply_update, fedavg


def test_fedavg_weights_by_example_count_hand_computed():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([4.0, -1.0]), "b": torch.tensor([[3.0]])}
    out = fedavg([(a, 100), (b, 300)])
    # (100*1 + 300*4)/400 = 3.25 ; (100*2 + 300*-1)/400 = -0.25 ; (0 + 900)/400 = 2.25
    assert torch.allclose(out["w"], torch.tensor([3.25, -0.25]))
    assert torch.allclose(out["b"], torch.tensor([[2.25]]))


def test_fedavg_of_factors_is_not_the_average_product():
    """mean(B) @ mean(A) != mean(B @ A): why issue 'Aggregation strategies' adds exact methods."""
    a1, b1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]])
    a2, b2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]])
    avg = fedavg([({"A": a1, "B": b1}, 1), ({"A": a2, "B": b2}, 1)])
    product_of_means = avg["B"] @ avg["A"]  # [[.25, .25], [.25, .25]]
    mean_of_products = (b1 @ a1 + b2 @ a2) / 2  # [[.5, 0], [0, .5]]
    assert torch.allclose(product_of_means, torch.full((2, 2), 0.25))
    assert torch.allclose(mean_of_products, torch.tensor([[0.5, 0.0], [0.0, 0.5]]))


def test_fedavg_accepts_fp16_updates_and_returns_fp32():
    out = fedavg([({"w": torch.tensor([1.0], dtype=torch.float16)}, 1)])
    assert out["w"].dtype == torch.float32


def test_fedavg_consumes_a_stream_once():
    consumed = []

    def gen():
        for i in range(3):
            consumed.append(i)
            yield {"w": torch.tensor([float(i)])}, 1.0

    assert fedavg(gen())["w"].item() == pytest.approx(1.0)
    assert consumed == [0, 1, 2]


def test_running_mean_refuses_mismatched_keys_and_bad_weights():
    running = RunningWeightedMean()
    running.add({"w": torch.zeros(1)}, 1)
    with pytest.raises(ValueError, match="keys differ"):
        running.add({"v": torch.zeros(1)}, 1)
    with pytest.raises(ValueError, match="weight must be > 0"):
        running.add({"w": torch.zeros(1)}, 0)
    with pytest.raises(ValueError, match="no updates"):
        RunningWeightedMean().result()


def test_apply_update_adds_the_delta():
    out = apply_update({"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([0.5, -2.0], dtype=torch.float16)})
    assert torch.equal(out["w"], torch.tensor([1.5, -1.0]))


def test_apply_update_keeps_keys_the_delta_lacks():
    out = apply_update({"a": torch.tensor([1.0]), "b": torch.tensor([2.0])}, {"b": torch.tensor([1.0])})
    assert torch.equal(out["a"], torch.tensor([1.0])) and torch.equal(out["b"], torch.tensor([3.0]))
