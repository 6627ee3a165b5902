"""The processes of one worker: one in a plain run, several under `accelerate launch` (data parallel).

Process 0 holds the lease, reads the store, fits the reward model and publishes; every process
samples its own share of each PPO batch. `Team` is the one place that knows how many processes
there are: it hands process 0's decisions to the others and averages what must agree (gradients,
the KL, the statistics), so that every process keeps identical weights. In a plain run each of its
methods returns its input.
"""
from __future__ import annotations

from typing import Callable, Iterable, TypeVar

import torch

T = TypeVar("T")


class Team:
    """The processes of one worker, given an `accelerate.Accelerator` (none, or one process: a team of one)."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator if accelerator is not None and accelerator.num_processes > 1 else None

    @property
    def is_main(self) -> bool:
        """Return whether this is the process that talks to the store."""
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        """Return this process's index, 0 for the main one."""
        return 0 if self.accelerator is None else self.accelerator.process_index

    @property
    def size(self) -> int:
        """Return how many processes there are."""
        return 1 if self.accelerator is None else self.accelerator.num_processes

    # ------------------------------------------------------------------------------ decisions

    def share(self, value: T) -> T:
        """Return process 0's `value` in every process."""
        if self.accelerator is None:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def from_main(self, work: Callable[[], T]) -> T:
        """Return what `work()` returns in process 0, in every process; only process 0 runs it, the others wait."""
        return self.share(work() if self.is_main else None)

    # ------------------------------------------------------------------------------ reductions

    def mean(self, value: torch.Tensor | float) -> float:
        """Return the mean of `value` over all processes."""
        if self.accelerator is None:
            return float(value)
        return float(self.accelerator.reduce(torch.as_tensor(float(value)).reshape(1), reduction="mean"))

    def any(self, flag: bool) -> bool:
        """Return whether `flag` is set in any process: decided together, so no process waits on the others alone."""
        return self.mean(1.0 if flag else 0.0) > 0

    def mean_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Return every statistic averaged over all processes, by one all-reduce."""
        if self.accelerator is None:
            return stats
        names = list(stats)
        means = self.accelerator.reduce(torch.tensor([float(stats[n]) for n in names]), reduction="mean")
        return dict(zip(names, means.tolist()))

    def mean_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its mean over all processes."""
        if self.accelerator is None:
            return
        for p in parameters:
            if p.grad is not None:
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    def copy_from_main(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Overwrite `parameters` in place with process 0's values, so every process starts from the same weights."""
        if self.accelerator is None:
            return
        from accelerate.utils import broadcast

        for p in parameters:
            p.data.copy_(broadcast(p.data.clone(), from_process=0))
