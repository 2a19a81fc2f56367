"""Counting the aten ops a block of code dispatches: what a GPU step pays host time for, one launch or more each
(views included, as each costs a dispatch). The tests hold the merged training step to a budget of them; the
benchmarks report them."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class AtenOps(TorchDispatchMode):
    """`with AtenOps() as ops: …` then `ops.n`: every aten op dispatched inside, forward and backward."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))
