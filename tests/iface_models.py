"""Models for the standard-interface tests (V2, protobuf), served by ``python app.py --model``."""

from __future__ import annotations

from typing import Any

from ipcserve import MLProcess


def make_mlp() -> Any:
    """A seeded 4 -> 3 MLP (module level, so spawn pickles it by reference)."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


from ipcserve.adapters.pytorch import TorchModel  # noqa: E402


class TorchMLP(TorchModel):
    """``--model iface_models:TorchMLP``: a TorchModel that declares its tensor signature."""

    tensor_signature = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]}

    def __init__(self, **settings: Any) -> None:
        super().__init__(make_mlp, name="mlp", **settings)


def make_two_heads() -> Any:
    """A seeded torch module of two inputs and two outputs of different datatypes: an image
    (FP32, 3x4x4) and an offset (INT64, 2) in; a score (FP32, 5) and a label (INT64, the
    argmax of the score) out."""
    import torch

    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(48, 5)

        def forward(self, image: Any, offset: Any) -> Any:
            score = self.linear(image.flatten(1)) + offset.sum(1, keepdim=True).float()
            return {"score": score, "label": score.argmax(1)}

    torch.manual_seed(0)
    return TwoHeads()


class TorchTwoHeads(TorchModel):
    """``--model iface_models:TorchTwoHeads``: several inputs and outputs, two datatypes."""

    tensor_signature = {
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 4, 4]},
                   {"name": "offset", "datatype": "INT64", "shape": [-1, 2]}],
        "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1, 5]},
                    {"name": "label", "datatype": "INT64", "shape": [-1]}]}

    def __init__(self, **settings: Any) -> None:
        super().__init__(make_two_heads, name="twoheads", **settings)


class Echo(MLProcess):
    """Answers ``{"text": text, "count": count}``; text "break" answers a count that is no
    integer (to test response schemas)."""

    def predict(self, text: str = "", count: int = 0) -> Any:
        if text == "break":
            return {"text": text, "count": "not a number"}
        return {"text": text.upper(), "count": count + 1}


class Rows(MLProcess):
    """``--model iface_models:Rows``: a batching tensor model; each row's answer is the
    number of items in the model call that computed it. A row whose first value is
    negative makes that call work -value steps of IPCSERVE_TEST_STEP seconds first,
    writing a "." per step into the file IPCSERVE_TEST_STEPS names (for cancellation)."""

    tensor_signature = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "batch", "datatype": "INT64", "shape": [-1, 1]}]}

    def __init__(self, **settings: Any) -> None:
        super().__init__(name="rows", **settings)

    def predict_batch(self, xs: list[Any]) -> list[Any]:
        import os
        import time

        rows = [x["x"] if isinstance(x, dict) else x for x in xs]  # native: {"x": row}
        steps = max(0, int(-min(float(row[0]) for row in rows)))
        if "IPCSERVE_TEST_STEPS" not in os.environ:
            steps = 0  # a server that does not test cancellation (a fuzzer's)
        for _ in range(steps):
            with open(os.environ["IPCSERVE_TEST_STEPS"], "a") as f:
                f.write(".")
            time.sleep(float(os.environ["IPCSERVE_TEST_STEP"]))
        return [{"batch": [len(xs)]} for _ in xs]


class Checksum(MLProcess):
    """``--model iface_models:Checksum``: each row of ``x`` (FP32, any length) answers its
    sum (FP64) and its length (INT64): a large tensor's exact round trip in a few bytes."""

    tensor_signature = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "sum", "datatype": "FP64", "shape": [-1]},
                    {"name": "length", "datatype": "INT64", "shape": [-1]}]}

    def __init__(self, **settings: Any) -> None:
        super().__init__(name="checksum", **settings)

    def predict_batch(self, xs: list[Any]) -> list[Any]:
        import numpy as np

        return [{"sum": np.asarray(x, dtype=np.float64).sum(), "length": len(x)} for x in xs]
