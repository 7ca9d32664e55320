"""TransformersModel: serve a local Hugging Face transformers model directory.

::

    with TransformersModel("models/all-MiniLM-L6-v2", normalize=True) as ml:
        vector = ml("A sentence to embed")          # list of floats

Tasks (inferred from ``config.json`` when not given):

=====================  ==========================================  ===========================
task                   one input                                   one output
=====================  ==========================================  ===========================
text-classification    ``str``, ``{"text": str}``, ``[str, ...]``  ``{"label", "score"}`` (or
                                                                   a top-k list)
feature-extraction     ``str``, ``{"text": str}``, ``[str, ...]``  ``[float, ...]``
image-classification   image, ``{"image": image}``, ``[image...]``  ``[{"label", "score"}, ...]``
image-text-to-text     image, ``{"image": image, "text": prompt}``  ``{"generated_text": str}``
text-generation        ``prompt=str`` or ``messages=[...]``        a stream of ``{"text"}``
                       (keywords; see :mod:`.generation`)          items, then a final item
=====================  ==========================================  ===========================

``feature-extraction`` also takes ``{"texts": [str, ...], "with_usage": True}`` and then
returns ``{"vectors": [[float, ...], ...], "prompt_tokens": int}`` (tokens without padding).

An image is a numpy ``uint8`` array (H x W, H x W x 1/3/4), a PIL image, or encoded image
bytes. A list input returns a list of outputs. Concurrent calls are batched, except for
text generation: its ``predict`` returns a generator that makes one token per step, and
concurrent streams take turns (see :mod:`ipcserve.streaming`).

Feature extraction tokenises each batch with padding and mean-pools over the attention
mask (sentence-transformers style), so texts of any length can share a batch. The other
tasks run a ``transformers.pipeline``; captioning (transformers 5 dropped
``image-to-text``) calls ``image-text-to-text`` with a text prompt, ``""`` by default.

Everything heavy (torch, transformers, PIL) is imported inside the ML process only.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..engine.errors import ConfigError, InputError
from ..engine.mlprocess import MLProcess
from . import grammar
from .decoding import TextGenerator
from .detection import TASKS, infer_task
from .generation import MAX_CHOICES
from .pytorch import check_device, default_name, resolve_device, set_torch_threads

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["TransformersModel", "infer_task"]

logger = logging.getLogger(__name__)

_ALIASES = {"sentiment-analysis": "text-classification", "image-to-text": "image-text-to-text"}
_IMAGE_TASKS = ("image-classification", "image-text-to-text")


def to_image(x: Any, where: str) -> Image.Image:
    """An RGB PIL image from a uint8 array, a PIL image or encoded bytes.

    Raises:
        InputError: anything else, or an array of the wrong shape or dtype.
    """
    import numpy as np
    from PIL import Image

    if isinstance(x, Image.Image):
        return x if x.mode == "RGB" else x.convert("RGB")
    if isinstance(x, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(x)) as img:
                return img.convert("RGB")
        except Exception as exc:
            raise InputError(f"{where} is bytes that Pillow cannot read as an image: "
                             f"{exc}") from None
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise InputError(f"{where} is an array of dtype {x.dtype}; expected uint8 (H, W, 3)")
        if x.ndim == 3 and x.shape[2] == 1:
            x = x[:, :, 0]
        if not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] in (3, 4))) or 0 in x.shape:
            raise InputError(f"{where} has shape {x.shape}; expected an image array (H, W, 3), "
                             "(H, W, 4) or (H, W)")
        return Image.fromarray(np.ascontiguousarray(x)).convert("RGB")
    raise InputError(f"{where} is {type(x).__name__}; expected an image: a uint8 array "
                     "(H, W, 3), a PIL image or encoded image bytes")


def _read_json(path: str) -> dict[str, Any]:
    """A JSON object from a file; {} where there is none (or it is not one)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _is_ids(value: Any) -> bool:
    """A non-empty list of token ids (integers >= 0)."""
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


class TransformersModel(MLProcess):
    """Serve a local transformers model directory for one task.

    Args:
        path: a directory written by ``save_pretrained`` (model, config, tokenizer or
            image processor). Nothing is downloaded: ``HF_HUB_OFFLINE=1`` in the ML process.
        task: one of "text-classification", "feature-extraction", "image-classification",
            "image-text-to-text" (captioning), "text-generation" (a causal LM, streamed);
            default: inferred from config.json.
        device: "cpu", "cuda", "cuda:N", "mps" or "auto" (cuda if available, else cpu).
        batch_size: items per forward pass (default: ``max_batch_size``).
        dtype: torch dtype for the weights, e.g. "float16" on a GPU (default: as saved).
        num_threads: ``torch.set_num_threads`` in the ML process.
        normalize: feature-extraction: L2-normalise the embeddings.
        pooling: feature-extraction: "mean" over the attention mask, or "cls".
        max_length: text tasks: truncate to this many tokens (default: the model's limit,
            and an embedding input over it is refused with an ``InputError`` naming it);
            text-generation: the most tokens of prompt plus completion.
        top_k: classification: how many labels to return. Default: text-classification
            returns the best ``{"label", "score"}``; image-classification the best 5 as a
            list. Any ``top_k`` returns a list.
        prompt: image-text-to-text: the text prompt when an input brings none ("").
        max_new_tokens: image-text-to-text: generation length limit.
        max_new_tokens_limit: text-generation: the largest ``max_tokens`` a request gets
            (a larger one is lowered to it).
        batched_decoding: text-generation: run the streams of one ML process as one batch,
            one forward pass per token for all of them (continuous batching; see
            :mod:`.decoding`); at most ``max_batch_size`` sequences per step. False: each
            stream makes its own forward pass per token.
        prefill_chunk: text-generation: most prompt tokens per forward pass and per step,
            so a long prompt delays the other streams by one chunk at a time.
        pipeline_kwargs: extra keyword arguments for ``transformers.pipeline(...)``.
        warmup: run one dummy input before the process reports ready.
        name: the model's name; defaults to the directory's name.
        **settings: any :class:`~ipcserve.Config` field (``timeout``, ``max_batch_size``...).

    Raises:
        ConfigError: the directory or an argument is invalid.
    """

    def __init__(self, path: str | os.PathLike[str], task: str | None = None, *,
                 device: str = "cpu", batch_size: int | None = None, dtype: str | None = None,
                 num_threads: int | None = None, normalize: bool = False, pooling: str = "mean",
                 max_length: int | None = None, top_k: int | None = None, prompt: str = "",
                 max_new_tokens: int = 30, max_new_tokens_limit: int = 512,
                 batched_decoding: bool = True, prefill_chunk: int = 256,
                 pipeline_kwargs: Mapping[str, Any] | None = None,
                 warmup: bool = True, name: str | None = None, **settings: Any) -> None:
        super().__init__(name=name or default_name(path, "transformersmodel"), **settings)
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.path):
            raise ConfigError(f"TransformersModel serves a local model directory; {self.path} "
                              "is not one (save the model there with save_pretrained first)")
        task = _ALIASES.get(task, task) if task else infer_task(self.path)
        if task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        self.task = task
        self.device = check_device(device)
        for label, value in (("batch_size", batch_size), ("num_threads", num_threads),
                             ("max_length", max_length), ("top_k", top_k),
                             ("max_new_tokens", max_new_tokens),
                             ("max_new_tokens_limit", max_new_tokens_limit),
                             ("prefill_chunk", prefill_chunk)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ConfigError(f"{label} must be an integer >= 1, got {value!r}")
        if pooling not in ("mean", "cls"):
            raise ConfigError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.batch_size = batch_size or self.config.max_batch_size
        self.dtype = dtype
        self.num_threads = num_threads
        self.normalize = bool(normalize)
        self.pooling = pooling
        self.max_length = max_length
        # Embeddings: an input over the model's context is a 400 unless max_length= was
        # given (then it is cut to that many tokens, as asked).
        self.truncate = max_length is not None
        self.top_k = top_k
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.max_new_tokens_limit = max_new_tokens_limit
        self.batched_decoding = bool(batched_decoding)
        self.prefill_chunk = prefill_chunk
        self.pipeline_kwargs = dict(pipeline_kwargs or {})
        self.run_warmup = warmup
        self.pipe: Any = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.generator: TextGenerator | None = None
        self._device = "cpu"

    @property
    def batching(self) -> bool:
        """False for text-generation: its requests stream (stepped together, see
        :attr:`stepping`), they are not collected for ``predict_batch``."""
        return self.task != "text-generation"

    @property
    def max_choices(self) -> int:
        """The most completions (``n``) one text-generation request may ask for (the
        OpenAI routes read it); 1 for the other tasks."""
        return MAX_CHOICES if self.task == "text-generation" else 1

    @property
    def stepping(self) -> bool:
        """True (after ``load``) for text-generation with ``batched_decoding`` on a model
        whose key/value cache can batch: the ML process runs every stream through
        :meth:`begin` / :meth:`step` / :meth:`finish`, one forward pass per token for all."""
        return (self.batched_decoding and self.generator is not None
                and self.generator.batchable)

    def begin(self, *args: Any, **kwargs: Any) -> Any:
        """text-generation: check a request (as :meth:`predict`) and return its state for
        :meth:`step`.

        Raises:
            InputError: see :func:`ipcserve.adapters.generation.read_request`.
        """
        if self.generator is None:
            raise InputError("begin() is for text generation, after load()")
        return self.generator.start(self._fields(args, kwargs))

    def step(self, states: list[Any]) -> list[Any]:
        """One token for every sequence of ``states``, in one forward pass."""
        assert self.generator is not None
        return list(self.generator.step(states))

    def finish(self, state: Any) -> None:
        """``state`` ended: its sequences leave the batch."""
        if self.generator is not None:
            self.generator.finish(state)

    # -- ML process ------------------------------------------------------------------
    def load(self) -> None:
        """Load the tokenizer/processor and model from the directory, offline."""
        # Read by huggingface_hub when it is first imported, so set before transformers is
        # (setdefault: a deployment may opt out). Loading a local directory never needs the
        # hub anyway; this keeps any stray lookup from stalling the ML process on a network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        set_torch_threads(self.num_threads)
        self._device = resolve_device(self.device)
        import transformers

        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        extra = {"dtype": self.dtype} if self.dtype else {}
        if self.task in ("feature-extraction", "text-generation"):
            auto: Any = (transformers.AutoModel if self.task == "feature-extraction"
                         else transformers.AutoModelForCausalLM)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                self.path, local_files_only=True)
            self.model = auto.from_pretrained(
                self.path, local_files_only=True, **extra).to(self._device).eval()
        else:
            self.pipe = transformers.pipeline(  # type: ignore[call-overload]
                self.task, model=self.path, device=self._device, batch_size=self.batch_size,
                **extra, **self.pipeline_kwargs)
            self.model, self.tokenizer = self.pipe.model, self.pipe.tokenizer
        tokenizer = self.tokenizer
        if tokenizer is not None and getattr(tokenizer, "pad_token", 1) is None and getattr(
                tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-style tokenizers cannot pad a batch
        if self.max_length is None and self.tokenizer is not None:
            limit = getattr(self.tokenizer, "model_max_length", None) or 10**9
            positions = getattr(self.model.config, "max_position_embeddings", None)
            if self.task != "image-text-to-text":
                self.max_length = min(limit, positions or limit, 10**6)
        if self.task == "text-generation":
            self.generator = TextGenerator(self.model, self.tokenizer, self._device,
                                           self.max_length or 2048, self.max_new_tokens_limit,
                                           self.prefill_chunk)
        logger.info("transformers model %s (%s) loaded on %s", self.name, self.task, self._device)

    @property
    def structured_output(self) -> bool:
        """Whether this model serves ``response_format`` and ``tools`` (JSON-schema
        constrained decoding): a text-generation model, with llguidance installed."""
        return self.task == "text-generation" and grammar.available()

    def tokenizer_info(self) -> dict[str, Any]:
        """``max_model_len`` (the context, in tokens) and ``special_tokens`` (bos, eos, pad,
        unk), read from the model directory's ``config.json`` and ``tokenizer_config.json``:
        cheap, and nothing is loaded (``GET /v1/models`` asks in the web process)."""
        config, tokens = (_read_json(os.path.join(self.path, name))
                          for name in ("config.json", "tokenizer_config.json"))
        limits = [v for v in (config.get("max_position_embeddings"), config.get("n_positions"),
                              tokens.get("model_max_length"), self.max_length)
                  if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 10**7]
        specials = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = tokens.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                specials[name] = value
        return {"max_model_len": min(limits) if limits else None, "special_tokens": specials}

    def warmup(self) -> None:
        """Run one dummy input so the first request does not pay for lazy initialisation."""
        if self.run_warmup and self.task == "text-generation":
            for _ in self.predict(prompt="hello", max_tokens=2, temperature=0):
                pass
        elif self.run_warmup:
            import numpy as np

            dummy = np.zeros((32, 32, 3), np.uint8) if self.task in _IMAGE_TASKS else "warm up"
            self.predict_batch([dummy])

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """text-generation: check the request, return the generator of its items (a
        positional string is the prompt); other tasks: :meth:`predict_batch` of one.

        Raises:
            InputError: see :func:`ipcserve.adapters.generation.read_request`.
        """
        if self.task != "text-generation" or self.generator is None:
            return super().predict(*args, **kwargs)
        if len(args) == 1 and not kwargs and isinstance(args[0], Mapping) and (
                set(args[0]) in ({"tokenize"}, {"detokenize"})):
            return self.tokens(args[0])
        return self.generator.stream(self._fields(args, kwargs))

    def tokens(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The tokenizer routes' answer (``/tokenize``, ``/detokenize``), in the ML process:
        ``{"tokenize": {"prompt": str, "add_special_tokens": bool}}`` (or ``"messages"`` and
        ``"add_generation_prompt"``: through the chat template) -> ``{"tokens": [int, ...],
        "max_model_len": int}``; ``{"detokenize": [int, ...]}`` -> ``{"prompt": str}``.

        Raises:
            InputError: a token id outside the vocabulary, messages the template refuses.
        """
        tokenizer = self.tokenizer
        if "detokenize" in request:
            ids = request["detokenize"]
            size = len(tokenizer)
            bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int)
                        or not 0 <= t < size), None) if isinstance(ids, list) else ids
            if bad is not None or not isinstance(ids, list):
                raise InputError(f"'tokens' must be a list of token ids from 0 to {size - 1}, "
                                 f"got {bad!r}")
            return {"prompt": tokenizer.decode(ids)}
        fields = request["tokenize"]
        if "messages" in fields:
            from .generation import prompt_ids

            ids = prompt_ids(tokenizer, fields["messages"],
                             opened=bool(fields.get("add_generation_prompt", True)))
        else:
            ids = list(tokenizer(fields["prompt"], add_special_tokens=fields.get(
                "add_special_tokens", True))["input_ids"])
        return {"tokens": [int(t) for t in ids], "max_model_len": int(self.max_length or 0)}

    @staticmethod
    def _fields(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if len(args) == 1 and isinstance(args[0], str) and "prompt" not in kwargs:
            return {"prompt": args[0], **kwargs}
        if args:
            raise InputError("text generation takes keyword fields: prompt= or messages=, "
                             "and max_tokens, temperature, top_p, stop, seed, n")
        return kwargs

    def predict_batch(self, xs: list[Any]) -> list[Any]:
        """Answer a batch; list inputs are flattened into it and regrouped afterwards.

        Raises:
            InputError: an input is not a string / image of the right kind, or an empty list.
        """
        if self.task == "text-generation":
            raise InputError("text generation streams one request at a time (predict(), "
                             "after load())")
        items: list[Any] = []
        spans: list[tuple[int, int, str]] = []
        for i, x in enumerate(xs):
            where = f"input {i}" if len(xs) > 1 else "the input"
            parts, form = self._items(x, where)
            spans.append((len(items), len(items) + len(parts), form))
            items.extend(parts)
        outputs: list[Any]
        counts: list[int] = []
        if self.task == "feature-extraction":
            outputs, counts = self._embed(items)
        elif self.task == "text-classification":
            outputs = self._classify_text(items)
        elif self.task == "image-classification":
            outputs = self._classify_images(items)
        else:
            outputs = self._generate(items)
        return [{"vectors": outputs[a:b], "prompt_tokens": sum(counts[a:b])} if form == "usage"
                else outputs[a:b] if form == "list" else outputs[a] for a, b, form in spans]

    # -- inputs ----------------------------------------------------------------------
    def _items(self, x: Any, where: str) -> tuple[list[Any], str]:
        """The texts/images of one input and its form: "one", "list" or "usage"."""
        if isinstance(x, Mapping) and "texts" in x and self.task == "feature-extraction":
            # {"texts": [...], "with_usage": true}: the OpenAI embeddings endpoint's call.
            if set(x) - {"texts", "with_usage"}:
                raise InputError(f"{where}: unknown field(s) "
                                 f"{sorted(map(str, set(x) - {'texts', 'with_usage'}))}; send "
                                 "{'texts': [...], 'with_usage': true}")
            texts, usage = x["texts"], x.get("with_usage", False)
            if not isinstance(usage, bool):
                raise InputError(f"'with_usage' of {where} must be true or false")
            if not isinstance(texts, (list, tuple)) or not texts:
                raise InputError(f"'texts' of {where} must be a non-empty list of strings")
            parts = [list(v) if _is_ids(v) else self._item(v, f"item {j} of 'texts'")
                     for j, v in enumerate(texts)]  # text, or token ids
            return parts, "usage" if usage else "list"
        if isinstance(x, Mapping) and isinstance(x.get("text"), (list, tuple)) and (
                self.task not in _IMAGE_TASKS):
            if set(x) != {"text"}:
                raise InputError(f"{where}: send a list of texts alone, as {{'text': [...]}}")
            x = x["text"]  # a JSON body {"text": ["...", "..."]}
        if isinstance(x, (list, tuple)):
            if not x:
                raise InputError(f"{where} is an empty list; send at least one "
                                 + ("image" if self.task in _IMAGE_TASKS else "text"))
            return [self._item(v, f"item {j} of {where}") for j, v in enumerate(x)], "list"
        return [self._item(x, where)], "one"

    def _item(self, x: Any, where: str) -> Any:
        if self.task in _IMAGE_TASKS:
            prompt = self.prompt
            if isinstance(x, Mapping):
                if "image" not in x:
                    raise InputError(f"{where} has no 'image' field (got {sorted(map(str, x))})")
                prompt = x.get("text", prompt)
                if not isinstance(prompt, str):
                    raise InputError(f"the 'text' of {where} must be a string")
                x = x["image"]
            image = to_image(x, where)
            return (image, prompt) if self.task == "image-text-to-text" else image
        if isinstance(x, Mapping):
            if "text" not in x:
                raise InputError(f"{where} has no 'text' field (got {sorted(map(str, x))})")
            if not isinstance(x["text"], str):
                raise InputError(f"the 'text' of {where} must be a string or a list of strings, "
                                 f"got {type(x['text']).__name__}")
            pair = x.get("text_pair")
            if pair is not None and self.task == "text-classification":
                if not isinstance(pair, str):
                    raise InputError(f"the 'text_pair' of {where} must be a string")
                return {"text": x["text"], "text_pair": pair}
            x = x["text"]
        if not isinstance(x, str):
            raise InputError(f"{where} is {type(x).__name__}; expected a string, a list of "
                             "strings or {'text': string}")
        return x

    # -- tasks -----------------------------------------------------------------------
    def _embed(self, texts: list[str | list[int]]) -> tuple[list[list[float]], list[int]]:
        """The vectors and, per input (a text, or token ids of this model's vocabulary), its
        token count (without padding)."""
        limit = self.max_length
        if any(not isinstance(t, str) for t in texts):
            return self._embed_ids([self._ids(t, i, limit) for i, t in enumerate(texts)])
        if not self.truncate and limit is not None and limit < 1_000_000:
            # Over the model's context is refused, not silently cut (max_length= asks for
            # truncation). Counting first costs a tokenizer pass, far less than the model's.
            for i, ids in enumerate(self.tokenizer(texts)["input_ids"]):
                self._check_length(i, len(ids), limit)
        # Texts of similar length share a forward pass, so less compute goes to padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        result: list[list[float]] = [[] for _ in texts]
        counts = [0] * len(texts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            encoded = self.tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
            self._pool(encoded, chunk, result, counts)
        return result, counts

    def _check_length(self, i: int, length: int, limit: int) -> None:
        if length > limit:
            raise InputError(f"input {i} is {length} tokens long; this model takes at most "
                             f"{limit} (shorten it, or serve the model with max_length= to "
                             "truncate)")

    def _ids(self, text: str | list[int], i: int, limit: int | None) -> list[int]:
        """One input's token ids: a text's from the tokenizer, ids checked against the
        vocabulary; over ``limit`` refused (or cut, with ``truncate``)."""
        if isinstance(text, str):
            ids = list(self.tokenizer(text)["input_ids"])
        else:
            size = len(self.tokenizer)
            bad = next((t for t in text if not 0 <= t < size), None)
            if bad is not None:
                raise InputError(f"input {i}: token id {bad} is outside this model's "
                                 f"vocabulary (0 to {size - 1})")
            ids = list(text)
        if limit is not None and limit < 1_000_000:
            if self.truncate:
                ids = ids[:limit]
            else:
                self._check_length(i, len(ids), limit)
        return ids

    def _embed_ids(self, inputs: list[list[int]]) -> tuple[list[list[float]], list[int]]:
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        result: list[list[float]] = [[] for _ in inputs]
        counts = [0] * len(inputs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            encoded = self.tokenizer.pad({"input_ids": [inputs[i] for i in chunk]},
                                         padding=True, return_tensors="pt")
            self._pool(encoded, chunk, result, counts)
        return result, counts

    def _pool(self, encoded: Any, chunk: list[int], result: list[list[float]],
              counts: list[int]) -> None:
        """The vectors of one padded batch (rows ``chunk`` of the request) into ``result``."""
        import torch

        encoded = encoded.to(self._device)
        with torch.inference_mode():
            hidden = self.model(**encoded)[0]
            if self.pooling == "cls":
                vectors = hidden[:, 0]
            else:
                mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if self.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        for i, row, n in zip(chunk, vectors.float().cpu().tolist(),
                             encoded["attention_mask"].sum(1).tolist()):
            result[i], counts[i] = row, int(n)

    @staticmethod
    def _labels(result: Any) -> list[dict[str, Any]]:
        rows = [result] if isinstance(result, Mapping) else list(result)
        return [{"label": str(r["label"]), "score": float(r["score"])} for r in rows]

    def _classify_text(self, texts: list[Any]) -> list[Any]:
        results = self.pipe(texts, batch_size=self.batch_size, top_k=self.top_k or 1,
                            truncation=True, max_length=self.max_length)
        labelled = [self._labels(r) for r in results]
        return [rows[0] for rows in labelled] if self.top_k is None else labelled

    def _classify_images(self, images: list[Any]) -> list[Any]:
        results = self.pipe(images, batch_size=self.batch_size, top_k=self.top_k or 5)
        if len(images) == 1 and results and isinstance(results[0], Mapping):
            results = [results]  # one image: the pipeline answers without the outer list
        return [self._labels(r) for r in results]

    def _generate(self, items: list[tuple[Any, str]]) -> list[dict[str, str]]:
        # Prompts of different lengths would be padded, which changes what a
        # decoder generates: run each prompt as its own batch.
        by_prompt: dict[str, list[int]] = {}
        for i, (_, prompt) in enumerate(items):
            by_prompt.setdefault(prompt, []).append(i)
        result: list[dict[str, str]] = [{} for _ in items]
        for prompt, members in by_prompt.items():
            outs = self.pipe([items[i][0] for i in members], text=[prompt] * len(members),
                             batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
                             return_full_text=False)
            for i, out in zip(members, outs):
                first = out[0] if isinstance(out, list) else out
                result[i] = {"generated_text": str(first["generated_text"]).strip()}
        return result
