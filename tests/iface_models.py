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


class Echo(MLProcess):
    """Answers ``{"text": text, "count": count}``; text "break" answers a count that is no
    integer (to test response schemas)."""

    def predict(self, text: str = "", count: int = 0) -> Any:
        if text == "break":
            return {"text": text, "count": "not a number"}
        return {"text": text.upper(), "count": count + 1}
