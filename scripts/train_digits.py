"""Train the built-in handwritten-digit demo model and export it to ONNX.

Run from the repository root::

    python scripts/train_digits.py

The model is a small multilayer perceptron (64 -> 64 ReLU -> 10) trained with
scikit-learn on its bundled ``load_digits`` data set (8x8 images, pixel values
0..16, ink = high). The ONNX graph is written by hand with ``onnx.helper`` to
``ipcserve/adapters/digits.onnx``:

* input ``pixels``: float32 ``[N, 64]``, row-major 8x8 image in the data set's
  own scale 0..16 (ink = high); the graph divides by 16 itself;
* output ``probabilities``: float32 ``[N, 10]`` (softmax over digits 0..9).

The script is deterministic (fixed split and seeds) and prints the held-out
accuracy of the exported model evaluated with onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

OUT_PATH = Path(__file__).resolve().parent.parent / "ipcserve" / "adapters" / "digits.onnx"
PIXEL_SCALE = 16.0  # data set pixels are 0..16; the network sees 0..1


def train() -> tuple[MLPClassifier, np.ndarray, np.ndarray]:
    """Train the MLP; return it with the held-out features (0..16) and labels."""
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.25, random_state=0, stratify=y
    )
    clf = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=1000, random_state=0)
    clf.fit(X_train / PIXEL_SCALE, y_train)
    return clf, X_test.astype(np.float32), y_test


def to_onnx(clf: MLPClassifier) -> onnx.ModelProto:
    """Build the ONNX graph: Mul(1/16) -> Gemm -> Relu -> Gemm -> Softmax."""
    (w1, w2), (b1, b2) = clf.coefs_, clf.intercepts_
    inits = [
        numpy_helper.from_array(np.array([1.0 / PIXEL_SCALE], np.float32), "scale"),
        numpy_helper.from_array(w1.astype(np.float32), "w1"),
        numpy_helper.from_array(b1.astype(np.float32), "b1"),
        numpy_helper.from_array(w2.astype(np.float32), "w2"),
        numpy_helper.from_array(b2.astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Mul", ["pixels", "scale"], ["x"]),
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h_pre"]),
        helper.make_node("Relu", ["h_pre"], ["h"]),
        helper.make_node("Gemm", ["h", "w2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="ipcserve/scripts/train_digits.py",
        doc_string="8x8 digit classifier; input pixels float32 [N,64] in 0..16 (ink high).",
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main() -> None:
    """Train, export, and report held-out accuracy via onnxruntime."""
    clf, X_test, y_test = train()
    model = to_onnx(clf)
    OUT_PATH.write_bytes(model.SerializeToString())
    sess = ort.InferenceSession(str(OUT_PATH), providers=["CPUExecutionProvider"])
    (probs,) = sess.run(["probabilities"], {"pixels": X_test})
    acc = float(np.mean(probs.argmax(axis=1) == y_test))
    print(f"wrote {OUT_PATH} ({OUT_PATH.stat().st_size} bytes)")
    print(f"held-out accuracy (onnxruntime, {len(y_test)} images): {acc:.4f}")


if __name__ == "__main__":
    main()
