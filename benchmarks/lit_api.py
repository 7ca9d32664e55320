"""The LitServe API of the benchmark (module level: LitServe spawns its workers)."""


from typing import Any

import litserve as ls


class BenchAPI(ls.LitAPI):  # type: ignore[misc]
    """``model`` as in servers.py, batched (LitServe hands predict a list of bodies)."""

    def __init__(self, model: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model

    def setup(self, device: Any) -> None:
        import torch

        torch.set_num_threads(1)
        if self.model == "mlp":
            from models import make_mlp

            self.net = make_mlp()
        elif self.model == "minilm":
            from ipcserve.adapters.hf import TransformersModel

            from models import minilm_path

            self.tm = TransformersModel(minilm_path(), task="feature-extraction", normalize=True)
            self.tm.load()

    def decode_request(self, request, **kwargs):  # no annotation: LitServe reads it as the body type
        return request

    def predict(self, batch: list[Any], **kwargs: Any) -> list[Any]:
        if self.model == "echo":
            return batch
        if self.model == "mlp":
            import torch

            with torch.inference_mode():
                x = torch.tensor([body["x"] for body in batch], dtype=torch.float32)
                return list(self.net(x).tolist())
        return list(self.tm.predict_batch([body["text"] for body in batch]))

    def encode_response(self, output: Any, **kwargs: Any) -> Any:
        return output
