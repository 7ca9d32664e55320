"""OnnxModel: real ML processes serving small ONNX graphs written into tmp_path.

The graphs are built with ``onnx.helper`` rather than exported from torch: torch 2.13's
legacy exporter (``dynamo=False``) raises several DeprecationWarnings, and the new one
needs onnxscript. A hand-built graph also pins exactly the shapes each test needs.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ipcserve import ConfigError, InputError  # noqa: E402
from ipcserve.adapters.onnxrt import OnnxModel  # noqa: E402

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((4, 8)).astype(np.float32)
B1 = RNG.standard_normal(8).astype(np.float32)
W2 = RNG.standard_normal((8, 3)).astype(np.float32)
B2 = RNG.standard_normal(3).astype(np.float32)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def mlp_file(path: Path, batch: str | int = "batch") -> Path:
    """y = tanh(x @ W1 + B1) @ W2 + B2, with x: float[batch, 4]."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "B1"], ["h1"]),
        helper.make_node("Tanh", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"]),
        helper.make_node("Add", ["h3", "B2"], ["y"]),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((W1, "W1"), (B1, "B1"), (W2, "W2"),
                                                         (B2, "B2"))]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])], inits)
    return _save(graph, path)


def two_input_file(path: Path) -> Path:
    """tokens: int64[batch, seq], scale: float[batch]; mean = mean(tokens) * scale,
    total = sum(tokens)."""
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [
        helper.make_node("Cast", ["tokens"], ["tokens_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["tokens_f"], ["avg"], axes=[1], keepdims=0),
        helper.make_node("Mul", ["avg", "scale"], ["mean"]),
        helper.make_node("ReduceSum", ["tokens", "axes"], ["total"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "two_inputs",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("total", TensorProto.INT64, ["batch"])], [axes])
    return _save(graph, path)


def _reference(x: np.ndarray) -> np.ndarray:
    return (np.tanh(np.asarray(x, np.float32) @ W1 + B1) @ W2 + B2).astype(np.float32)


@pytest.mark.timeout(60)
def test_single_input_single_and_batched(tmp_path: Path) -> None:
    path = mlp_file(tmp_path / "mlp.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xs = [RNG.standard_normal(4).astype(np.float32) for _ in range(24)]
    with OnnxModel(path, intra_op_num_threads=1, max_batch_size=8, timeout=20) as ml:
        assert ml.name == "mlp"
        pid = ml.pids
        single = ml(xs[0])
        direct = session.run(None, {"x": xs[0][None]})[0][0]
        assert single.shape == (3,) and single.dtype == np.float32
        assert np.allclose(single, direct, atol=1e-5)
        assert np.allclose(single, _reference(xs[0]), atol=1e-5)
        # float64 nested lists are cast to the declared float32
        assert np.allclose(ml(xs[1].astype(np.float64).tolist()), _reference(xs[1]), atol=1e-5)

        with ThreadPoolExecutor(8) as pool:
            served = list(pool.map(ml, xs))
        batch_direct = session.run(None, {"x": np.stack(xs)})[0]
        for i, y in enumerate(served):
            assert np.allclose(y, batch_direct[i], atol=1e-5)

        with pytest.raises(InputError, match=r"input 'x' has shape \(3,\) but the model "
                                             r"expects \(4,\)"):
            ml(np.zeros(3, np.float32))
        with pytest.raises(InputError, match="not numeric"):
            ml(["a", "b", "c", "d"])
        with pytest.raises(InputError, match="rectangular"):
            ml([[1.0, 2.0], [3.0]])

        # One poison input in a concurrent batch fails only itself.
        mixed: list[object] = list(xs[:7]) + [np.zeros((2, 4), np.float32)]
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ml, x) for x in mixed]
        with pytest.raises(InputError, match="expects"):
            futures[-1].result()
        for x, future in zip(xs[:7], futures):
            assert np.allclose(future.result(), _reference(x), atol=1e-5)
        assert ml.pids == pid
    assert multiprocessing.active_children() == []


@pytest.mark.timeout(60)
def test_multi_input_dict_outputs_and_ragged_lengths(tmp_path: Path) -> None:
    path = two_input_file(tmp_path / "pool.onnx")
    samples = [{"tokens": list(range(1, n + 1)), "scale": 0.5 * n} for n in (3, 5, 3, 7, 5, 1)]
    with OnnxModel(path, output="list", timeout=20) as ml:
        pid = ml.pids
        with ThreadPoolExecutor(6) as pool:
            served = list(pool.map(lambda s: ml(**s), samples))
        for s, out in zip(samples, served):
            tokens = np.array(s["tokens"])
            assert set(out) == {"mean", "total"}
            assert out["total"] == int(tokens.sum())
            assert np.isclose(out["mean"], tokens.mean() * s["scale"], atol=1e-5)
        assert ml({"tokens": [2, 4], "scale": 1.0}) == {"mean": 3.0, "total": 6}
        with pytest.raises(InputError, match=r"missing \['scale'\]"):
            ml(tokens=[1, 2])
        with pytest.raises(InputError, match=r"unknown \['bogus'\]"):
            ml(tokens=[1, 2], scale=1.0, bogus=3)
        with pytest.raises(InputError, match="send them by name"):
            ml([1, 2])
        with pytest.raises(InputError, match=r"input 'tokens' has shape \(2, 2\) but the model "
                                             r"expects \(seq,\)"):
            ml(tokens=[[1, 2], [3, 4]], scale=1.0)
        assert ml(tokens=[5], scale=2.0) == {"mean": 10.0, "total": 5}
        assert ml.pids == pid


@pytest.mark.timeout(60)
def test_fixed_batch_of_one_runs_samples_one_by_one(tmp_path: Path) -> None:
    path = mlp_file(tmp_path / "fixed.onnx", batch=1)
    xs = [RNG.standard_normal(4).astype(np.float32) for _ in range(5)]
    with OnnxModel(path, providers=["CPUExecutionProvider"], timeout=20) as ml:
        with ThreadPoolExecutor(5) as pool:
            served = list(pool.map(ml, xs))
        for x, y in zip(xs, served):
            assert y.shape == (3,)
            assert np.allclose(y, _reference(x), atol=1e-5)
        with pytest.raises(InputError, match=r"expects \(4,\)"):
            ml(np.zeros(5))


def test_config_errors_need_no_process(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        OnnxModel(tmp_path / "missing.onnx")
    path = mlp_file(tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="device"):
        OnnxModel(path, device="tpu")
    with pytest.raises(ConfigError, match="intra_op_num_threads"):
        OnnxModel(path, intra_op_num_threads=-1)
    model = OnnxModel(path, device="cpu", output_names=["nope"])
    with pytest.raises(ConfigError, match="unknown output"):
        model.load()  # in this process: the same check the ML process makes at start
