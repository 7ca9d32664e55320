"""TorchModel: real ML processes serving small torch modules built in the test."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ipcserve import ConfigError, InputError  # noqa: E402
from ipcserve.adapters.pytorch import TorchModel  # noqa: E402


def make_mlp() -> torch.nn.Module:
    """Module level, so spawn pickles it by reference; seeded, so every build is equal."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


class TwoHeads(torch.nn.Module):
    """Takes two named tensors and returns a dict, like many real models."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = torch.nn.Linear(6, 5)
        self.head = torch.nn.Linear(5, 2)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.body(torch.cat([image.flatten(1), extra], dim=1)))
        return {"logits": self.head(h), "hidden": h}


def _reference(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(x, np.float32)[None]))[0].numpy()


def _samples(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(4).astype(np.float32) for _ in range(n)]


@pytest.mark.timeout(120)
def test_factory_single_batched_and_bad_inputs() -> None:
    reference = make_mlp().eval()
    xs = _samples(24)
    with TorchModel(make_mlp, num_threads=1, max_batch_size=8, timeout=20) as ml:
        assert ml.name == "make_mlp"
        pid = ml.pids
        single = ml(xs[0])
        assert isinstance(single, np.ndarray) and single.shape == (3,)
        assert np.allclose(single, _reference(reference, xs[0]), atol=1e-5)
        assert np.allclose(ml(xs[1].tolist()), _reference(reference, xs[1]), atol=1e-5)

        with ThreadPoolExecutor(8) as pool:
            served = list(pool.map(ml, xs))
        for x, y in zip(xs, served):
            assert np.allclose(y, _reference(reference, x), atol=1e-5)

        with pytest.raises(InputError, match=r"\(3,\).*expects \(\.\.\., 4\)"):
            ml(np.zeros(3, np.float32))
        with pytest.raises(InputError, match="rectangular"):
            ml([[1.0, 2.0], [3.0]])
        with pytest.raises(InputError, match="not numeric"):
            ml(["a", "b", "c", "d"])
        with pytest.raises(InputError, match="one positional argument"):
            ml(xs[0], xs[1])

        # One poison input in a concurrent batch fails only itself.
        mixed: list[object] = list(xs[:7]) + [np.zeros(5, np.float32)]
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ml, x) for x in mixed]
        with pytest.raises(InputError):
            futures[-1].result()
        for x, future in zip(xs[:7], futures):
            assert np.allclose(future.result(), _reference(reference, x), atol=1e-5)

        assert np.allclose(ml(xs[2]), _reference(reference, xs[2]), atol=1e-5)
        assert ml.pids == pid
    assert multiprocessing.active_children() == []


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_file_with_list_output(tmp_path) -> None:
    path = tmp_path / "mlp.pt"
    torch.jit.script(make_mlp().eval()).save(str(path))
    reference = make_mlp().eval()
    xs = _samples(6)
    with TorchModel(path, output="list", input_shape=(4,), device="auto", timeout=20) as ml:
        assert ml.name == "mlp"
        pid = ml.pids
        with ThreadPoolExecutor(6) as pool:
            served = list(pool.map(ml, xs))
        for x, y in zip(xs, served):
            assert isinstance(y, list) and len(y) == 3
            assert np.allclose(y, _reference(reference, x), atol=1e-5)
        with pytest.raises(InputError, match=r"has shape \(2, 2\) but the model expects \(4,\)"):
            ml(np.zeros((2, 2)))
        assert np.allclose(ml(xs[0]), _reference(reference, xs[0]), atol=1e-5)
        assert ml.pids == pid


@pytest.mark.timeout(120)
def test_exported_program_file(tmp_path) -> None:
    path = tmp_path / "mlp.pt2"
    reference = make_mlp().eval()
    batch = torch.export.Dim.DYNAMIC
    program = torch.export.export(reference, (torch.zeros(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    xs = _samples(5)
    with TorchModel(path, timeout=20) as ml:
        pid = ml.pids
        with ThreadPoolExecutor(5) as pool:
            served = list(pool.map(ml, xs))
        for x, y in zip(xs, served):
            assert np.allclose(y, _reference(reference, x), atol=1e-5)
        with pytest.raises(InputError, match=r"input has shape \(3,\)(,| but) .*Guard failed"):
            ml(np.zeros(3))
        assert np.allclose(ml(xs[0]), _reference(reference, xs[0]), atol=1e-5)
        assert ml.pids == pid


@pytest.mark.timeout(120)
def test_keyword_inputs_and_dict_outputs() -> None:
    reference = TwoHeads().eval()
    rng = np.random.default_rng(1)
    samples = [{"image": rng.random((2, 2)), "extra": rng.random(2)} for _ in range(5)]
    with TorchModel(TwoHeads, warmup_input=samples[0], timeout=20) as ml:
        with ThreadPoolExecutor(5) as pool:
            served = list(pool.map(lambda s: ml(**s), samples))
        for s, out in zip(samples, served):
            with torch.no_grad():
                expected = reference(torch.tensor(s["image"][None], dtype=torch.float32),
                                     torch.tensor(s["extra"][None], dtype=torch.float32))
            assert set(out) == {"logits", "hidden"}
            assert np.allclose(out["logits"], expected["logits"][0].numpy(), atol=1e-5)
            assert np.allclose(out["hidden"], expected["hidden"][0].numpy(), atol=1e-5)
        with pytest.raises(InputError, match=r"image \(3, 3\), extra \(2,\), which the model "
                                             "rejects"):
            ml(image=np.zeros((3, 3)), extra=np.zeros(2))
        assert set(ml(**samples[0])) == {"logits", "hidden"}


def test_batch_validation_in_process() -> None:
    """predict_batch's own checks, on an instance loaded in this process (never started)."""
    model = TorchModel(make_mlp)
    model.load()
    good = np.ones(4, np.float32)
    with pytest.raises(InputError, match=r"input 2 has shape \(3,\) but the batch expects \(4,\)"):
        model.predict_batch([good, good, np.ones(3)])
    with pytest.raises(InputError, match="input 1 is not a rectangular"):
        model.predict_batch([good, [[1, 2], [3]]])
    with pytest.raises(InputError, match="mixes keyword and positional"):
        model.predict_batch([good, {"x": good}])
    out = model.predict_batch([good, good * 2])
    assert len(out) == 2 and out[0].shape == (3,)
    instance = TorchModel(make_mlp(), name="mlp")  # an nn.Module instance travels pickled
    instance.load()
    assert np.allclose(instance.predict_batch([good])[0], out[0], atol=1e-6)
    scalar = TorchModel(_scalar_model)
    scalar.load()
    with pytest.raises(ValueError, match="first dimension must be the batch"):
        scalar.predict_batch([good, good])


def _scalar_model() -> torch.nn.Module:
    return _Sum()


class _Sum(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


def test_config_errors_need_no_process(tmp_path) -> None:
    with pytest.raises(ConfigError, match="module level"):
        TorchModel(lambda: make_mlp())
    with pytest.raises(ConfigError, match="not found"):
        TorchModel(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="device"):
        TorchModel(make_mlp, device="gpu")
    with pytest.raises(ConfigError, match="dtype"):
        TorchModel(make_mlp, dtype="float8")
    with pytest.raises(ConfigError, match="num_threads"):
        TorchModel(make_mlp, num_threads=0)
    assert TorchModel(make_mlp, dtype=torch.float64).dtype == "float64"


def test_importing_adapters_stays_light() -> None:
    code = ("import ipcserve, ipcserve.adapters.pytorch, ipcserve.adapters.hf, "
            "ipcserve.adapters.onnxrt; import sys; assert 'torch' not in sys.modules and "
            "'transformers' not in sys.modules and 'onnxruntime' not in sys.modules, "
            "sorted(m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=25, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
