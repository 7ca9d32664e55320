"""Which task a transformers model directory is for, from transformers' own auto-model tables.

transformers knows which architectures are causal LMs, classifiers, encoders and
sequence-to-sequence models: its auto classes map each ``model_type`` to the class names
of every head (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` maps ``gpt2`` to ``GPT2LMHeadModel``,
a name no suffix rule recognises). Those tables are read from the installed
``transformers/models/auto/modeling_auto.py`` as data (its source parsed, never imported:
importing it imports torch, and the task is decided in the web process, which never needs
torch). Where transformers is missing or its tables cannot be read, the architecture's
suffix decides, as before.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

from ..engine.errors import ConfigError

__all__ = ["TASKS", "infer_task"]

logger = logging.getLogger(__name__)

TASKS = ("text-classification", "feature-extraction", "image-classification",
         "image-text-to-text", "text-generation")

# transformers' table -> our task, in the order they are asked: a vision-language model's
# class is also in the causal-LM table, and every head's base model is in MODEL_MAPPING.
_TABLES = (
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "image-text-to-text"),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text-classification"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image-classification"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "seq2seq"),
    ("MODEL_MAPPING_NAMES", "feature-extraction"),
)


def _class_names(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _class_names(v)


@functools.lru_cache(maxsize=1)
def auto_tables() -> dict[str, str]:
    """Class name -> task, from the installed transformers' auto-model tables ({} if they
    cannot be read). The first table that names a class decides (see ``_TABLES``)."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        return {}
    source = os.path.join(os.path.dirname(spec.origin), "models", "auto", "modeling_auto.py")
    try:
        with open(source, encoding="utf-8") as f:
            tree = ast.parse(f.read(), source)
    except (OSError, SyntaxError, ValueError) as exc:
        logger.warning("cannot read transformers' auto-model tables (%s); the architecture's "
                       "suffix decides a model's task", exc)
        return {}
    tables: dict[str, list[tuple[str, Any]]] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Call) and node.value.args):
            continue
        try:
            tables[node.targets[0].id] = list(ast.literal_eval(node.value.args[0]))
        except (ValueError, TypeError, SyntaxError):
            continue
    by_class: dict[str, str] = {}
    for table, task in _TABLES:
        for _model_type, names in tables.get(table, []):
            for name in _class_names(names):
                by_class.setdefault(name, task)
    return by_class


def _by_suffix(arch: str, config: dict[str, Any]) -> str | None:
    if arch.endswith("ForSequenceClassification"):
        return "text-classification"
    if arch.endswith("ForImageClassification"):
        return "image-classification"
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "text-generation"
    if arch.endswith("ForConditionalGeneration") and "vision_config" in config:
        return "image-text-to-text"
    if arch.endswith("Model") and not arch.endswith("PreTrainedModel"):
        return "feature-extraction"
    return None


def infer_task(path: str) -> str:
    """The task a model directory is for, from the ``architectures`` in its config.json:
    transformers' auto-model tables first, the class name's suffix where they do not say.

    Raises:
        ConfigError: the config does not say, or names a kind of model ipcserve does not
            serve (pass ``task=`` explicitly).
    """
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}/config.json: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}/config.json is not a JSON object")
    tables = auto_tables()
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    for arch in architectures:
        task = tables.get(arch) or _by_suffix(arch, config)
        if task == "seq2seq":
            raise ConfigError(f"{path} holds a sequence-to-sequence model ({arch}); ipcserve "
                              f"serves these tasks: {', '.join(TASKS)} (pass task= to use it "
                              "as one of them)")
        if task is not None:
            return task
    raise ConfigError(f"cannot tell the task of {path} from its config (architectures="
                      f"{config.get('architectures')}); pass task= one of {', '.join(TASKS)}")
