"""Aggregation of client adapter updates: pure functions over ``dict[str, Tensor]``.

Updates stream in: each is folded into a running state as it arrives, so memory holds one
running sum however many clients report.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

State = dict[str, torch.Tensor]


class NoUpdatesError(ValueError):
    """Nothing was left to aggregate (no update arrived, or every one was rejected)."""


class RunningWeightedMean:
    """Streaming weighted mean: fold ``(state, weight)`` pairs, read the mean at the end.

    Holds one fp32 sum per key plus the total weight, whatever the number of updates.
    """

    def __init__(self) -> None:
        self._sum: State = {}
        self._weight = 0.0
        self.count = 0

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one update in; every update must carry the same keys and shapes."""
        if not weight > 0:
            raise ValueError(f"update weight must be > 0, got {weight}")
        if self._sum and set(state) != set(self._sum):
            raise ValueError("update keys differ from the first update's keys")
        for key, tensor in state.items():
            contrib = tensor.to(torch.float32) * weight
            if key in self._sum:
                self._sum[key].add_(contrib)
            else:
                self._sum[key] = contrib.clone()
        self._weight += weight
        self.count += 1

    def mean(self) -> State:
        """Return the weighted mean, sum_i w_i x_i / sum_i w_i."""
        if not self.count:
            raise NoUpdatesError("no updates to aggregate")
        return {k: v / self._weight for k, v in self._sum.items()}


def fedavg(updates: Iterable[tuple[Mapping[str, torch.Tensor], float]]) -> State:
    """FedAvg (McMahan et al., 2017, arXiv 1602.05629) of LoRA factors, as FedIT does (arXiv 2305.05644).

    For each tensor key (every ``lora_A`` and ``lora_B`` separately):

        x = sum_i n_i x_i / sum_i n_i,   n_i = client i's example count.

    Averaging A and B separately is the baseline: mean(B) @ mean(A) != mean(B @ A).

    Parameters
    ----------
    updates
        ``(state, num_examples)`` pairs, consumed one at a time.
    """
    running = RunningWeightedMean()
    for state, weight in updates:
        running.add(state, weight)
    return running.mean()


def apply_update(global_state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> State:
    """Return the new global adapter, ``global + delta`` for every key (fp32)."""
    return {k: global_state[k].to(torch.float32) + delta[k].to(torch.float32) for k in global_state}
