"""Which task a model directory is served as: transformers' auto-model tables decide.

Every causal-LM family that transformers can build offline is written as a model directory
writes it (``config.json`` with the ``architectures`` the model class sets) and must be
detected as text generation; a tiny GPT-2 (``GPT2LMHeadModel``, which no suffix rule
recognised: it was served as feature extraction) answers on the OpenAI completion routes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ipcserve.adapters.detection import auto_tables, infer_task  # noqa: E402
from ipcserve.engine.errors import ConfigError  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import tiny_lm  # noqa: E402
from server import Server  # noqa: E402


def _directory_of(model: Any, directory: Path) -> Path:
    """The config.json a model's ``save_pretrained`` writes (its class as architectures),
    without the weights (the model may live on the meta device)."""
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    return directory


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_causal_lm_family_transformers_builds_is_text_generation(tmp_path: Path) -> None:
    from transformers.models.auto import modeling_auto

    transformers.utils.logging.set_verbosity_error()
    vision = {name for names in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values()
              for name in ([names] if isinstance(names, str) else names)}
    built, refused, wrong = [], {}, []
    for model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        try:  # the family's default config, built on the meta device: no memory, no download
            config = transformers.AutoConfig.for_model(model_type)
            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(config)
            path = _directory_of(model, tmp_path / model_type)
        except Exception as exc:  # a family whose defaults do not build offline
            refused[model_type] = type(exc).__name__
            continue
        built.append(model_type)
        name = type(model).__name__
        # Vision-language models are in transformers' causal-LM table too (they generate
        # text); they take images, so they are served as image-text-to-text.
        expected = "image-text-to-text" if name in vision else "text-generation"
        if infer_task(str(path)) != expected:
            wrong.append((model_type, name, infer_task(str(path)), expected))
    assert not wrong, wrong
    # transformers 5.25 builds 185 of its 200 causal-LM families this way; the others need
    # settings their defaults lack (listed in the message if too many fail).
    assert len(built) >= 150, refused
    assert "gpt2" in built and "llama" in built


@pytest.mark.timeout(120)
def test_gpt2_and_other_heads_by_their_class_names(tmp_path: Path) -> None:
    def saved(config: Any, cls: Any, name: str) -> Path:
        with torch.device("meta"):
            return _directory_of(cls(config), tmp_path / name)

    gpt2 = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300)
    cases = {
        "text-generation": [saved(gpt2, transformers.GPT2LMHeadModel, "gpt2"),
                            saved(transformers.OPTConfig(), transformers.OPTForCausalLM, "opt")],
        "feature-extraction": [saved(gpt2, transformers.GPT2Model, "gpt2-base"),
                               saved(transformers.BertConfig(), transformers.BertModel, "bert")],
        "text-classification": [saved(gpt2, transformers.GPT2ForSequenceClassification,
                                      "gpt2-cls")],
        "image-classification": [saved(transformers.ViTConfig(),
                                       transformers.ViTForImageClassification, "vit")],
    }
    for task, paths in cases.items():
        for path in paths:
            assert infer_task(str(path)) == task, path.name
    # A sequence-to-sequence model is named as such, not served as something it is not.
    t5 = saved(transformers.T5Config(), transformers.T5ForConditionalGeneration, "t5")
    with pytest.raises(ConfigError, match="sequence-to-sequence"):
        infer_task(str(t5))
    # Where transformers' tables do not know a class, its suffix still decides.
    own = tmp_path / "own"
    own.mkdir()
    (own / "config.json").write_text(json.dumps({"architectures": ["MyOwnForCausalLM"]}))
    assert "MyOwnForCausalLM" not in auto_tables()
    assert infer_task(str(own)) == "text-generation"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_gpt2_directory_answers_the_completion_routes(tmp_path: Path) -> None:
    import requests

    tokenizer = tiny_lm.byte_level_tokenizer()
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64,
                                     vocab_size=len(tokenizer),
                                     eos_token_id=tokenizer.eos_token_id,
                                     bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path / "gpt2"
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]

    server = Server("--model", str(path), "--timeout", "60", start_timeout=150)
    try:
        assert server.url, server.output
        body = {"model": "gpt2", "prompt": "the cat", "max_tokens": 4, "temperature": 0}
        answer = requests.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 4
        ids = tokenizer("the cat")["input_ids"]
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                                      pad_token_id=tokenizer.eos_token_id)
        assert answer.json()["choices"][0]["text"] == tokenizer.decode(expected[0][len(ids):])
    finally:
        assert server.stop() == 0, server.output
