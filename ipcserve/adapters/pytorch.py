"""TorchModel: serve a PyTorch ``nn.Module``, a TorchScript or a torch.export file, no glue code.

The module is built inside the ML process (``load()``), switched to ``eval()`` and run
under ``torch.inference_mode()``. Concurrent calls are stacked into one batch tensor, run
once, and the output is split back into one numpy array (or list) per call::

    def make_model():                       # module level: spawn pickles it by reference
        return MyNet.from_checkpoint("net.pt")

    with TorchModel(make_model, device="auto", input_shape=(3, 32, 32)) as ml:
        probs = ml(image_chw)               # one sample, no batch dimension

``torch`` is imported inside the ML process only; importing this module stays cheap.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..engine.errors import ConfigError, InputError
from ..engine.mlprocess import MLProcess

if TYPE_CHECKING:
    import numpy as np
    import torch

# default_name, check_device, resolve_device, set_torch_threads and as_array are shared
# with hf.py and onnxrt.py (importing this module does not import torch).
__all__ = ["TorchModel"]

logger = logging.getLogger(__name__)

_DEVICE_RE = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")
_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
           "uint8", "bool")
# Torch reports shape mismatches as plain RuntimeErrors; these words mark the ones that
# mean "the input has the wrong shape" rather than "the model is broken".
_SHAPE_ERROR_RE = re.compile(
    r"shapes cannot be multiplied|size of tensor|must match the size|expected input|channels"
    r"|Expected \d+D|input size|invalid for input of size|dimension|shape '\[", re.IGNORECASE)


def default_name(source: Any, fallback: str) -> str:
    """A model name (URL segment) derived from a path or a factory's ``__name__``."""
    if isinstance(source, (str, os.PathLike)):
        path = os.path.normpath(os.path.abspath(os.fspath(source)))
        base = os.path.basename(path)
        stem = base if os.path.isdir(path) else os.path.splitext(base)[0]
        if stem.lower() in ("model", "models"):  # e.g. <package>/model: the package says more
            stem = os.path.basename(os.path.dirname(path)) or stem
    else:
        stem = getattr(source, "__name__", "") or type(source).__name__
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.").lower()
    return stem or fallback


def check_device(device: str) -> str:
    """Validate a device string in the caller, without importing torch.

    Raises:
        ConfigError: not one of "cpu", "auto", "mps", "cuda", "cuda:N".
    """
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ConfigError("device must be 'cpu', 'auto', 'cuda', 'cuda:N' or 'mps', "
                          f"got {device!r}")
    return device


def resolve_device(device: str) -> str:
    """Turn ``"auto"`` into ``"cuda"`` or ``"cpu"`` and check that a CUDA device exists.

    Runs in the ML process (imports torch).

    Raises:
        ConfigError: a CUDA device was asked for and torch cannot see it.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise ConfigError(f"device {device!r} is not available: torch sees {count} CUDA "
                              "device(s). Use device='auto' to fall back to the CPU.")
    return device


def set_torch_threads(num_threads: int | None) -> None:
    """Call ``torch.set_num_threads`` in the ML process when a thread count is given."""
    if num_threads is not None:
        import torch

        torch.set_num_threads(num_threads)


def _check_threads(num_threads: int | None) -> int | None:
    if num_threads is not None and (isinstance(num_threads, bool)
                                    or not isinstance(num_threads, int) or num_threads < 1):
        raise ConfigError(f"num_threads must be an integer >= 1 or None, got {num_threads!r}")
    return num_threads


def as_array(x: Any, where: str) -> np.ndarray:
    """One sample as a numeric numpy array, or an InputError that says what is wrong."""
    import numpy as np

    try:
        array = np.asarray(x)
    except (ValueError, TypeError):
        raise InputError(f"{where} is not a rectangular numeric array (ragged nested lists?)"
                         ) from None
    if array.dtype.kind not in "biuf":
        if array.dtype.kind == "O":
            raise InputError(f"{where} is not a rectangular numeric array (ragged nested lists "
                             "or non-numeric values)")
        raise InputError(f"{where} is not numeric: got values of dtype {array.dtype}")
    return array


def _shape_str(shape: Sequence[Any]) -> str:
    dims = ["?" if d is None else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _matches(shape: tuple[int, ...], expected: Sequence[int | None]) -> bool:
    return len(shape) == len(expected) and all(e is None or e == s for s, e in zip(shape, expected))


def _is_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # an nn.Module instance means torch is imported already
    return torch is not None and isinstance(obj, torch.nn.Module)


def _first_layer_hint(model: Any) -> str | None:
    """The per-sample shape the model's first weighted layer implies, e.g. ``(..., 4)``."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or not hasattr(weight, "shape"):
            continue
        kind = getattr(module, "original_name", type(module).__name__)  # TorchScript keeps it
        if kind == "Linear":
            return f"(..., {weight.shape[1]})"
        if kind in ("Conv1d", "Conv2d", "Conv3d"):
            channels = weight.shape[1] * int(getattr(module, "groups", 1))
            spatial = {"Conv1d": "L", "Conv2d": "H, W", "Conv3d": "D, H, W"}[kind]
            return f"({channels}, {spatial})"
        return None
    return None


class TorchModel(MLProcess):
    """Serve a PyTorch model: a factory returning an ``nn.Module``, or a TorchScript file.

    Each call passes one sample without its batch dimension (a numpy array or nested
    lists), or keyword arguments (``ml(input_ids=..., attention_mask=...)``) for a model
    whose ``forward`` takes several tensors. Concurrent calls are stacked into one batch.

    Args:
        model: a picklable callable returning an ``nn.Module`` (a module-level function or
            class); a path to a TorchScript file (``torch.jit.save``) or to a ``.pt2`` file
            (``torch.export.save``, with a dynamic batch dimension); or an ``nn.Module``
            instance (pickled into the ML process with its weights; fine for small models).
        device: "cpu", "cuda", "cuda:N", "mps", or "auto" (cuda if available, else cpu).
        num_threads: ``torch.set_num_threads`` in the ML process (default: torch's own).
        dtype: the tensor dtype inputs are cast to ("float32"; None keeps numpy's dtype,
            e.g. int64 token ids).
        output: "numpy" (per-sample arrays) or "list" (nested lists, JSON-friendly).
        input_shape: the per-sample shape, ``None`` for a free dimension, e.g.
            ``(3, None, None)``; inputs are checked against it before the model runs.
        warmup_input: an example sample run once before the process reports ready.
        name: the model's name; defaults to the factory's name or the file's stem.
        **settings: any :class:`~ipcserve.Config` field (``timeout``, ``max_batch_size``...).

    Raises:
        ConfigError: an argument is invalid or the factory cannot be pickled.
    """

    #: V2 metadata: the platform name Triton gives torch models.
    tensor_platform = "pytorch_libtorch"

    def __init__(self, model: Callable[[], Any] | str | os.PathLike[str], *,
                 device: str = "cpu", num_threads: int | None = None,
                 dtype: str | Any | None = "float32", output: str = "numpy",
                 input_shape: Sequence[int | None] | None = None, warmup_input: Any = None,
                 name: str | None = None, **settings: Any) -> None:
        super().__init__(name=name or default_name(model, "torchmodel"), **settings)
        self.path: str | None = None
        self.factory: Any = None
        if isinstance(model, (str, os.PathLike)):
            self.path = os.path.abspath(os.fspath(model))
            if not os.path.isfile(self.path):
                raise ConfigError(f"model file not found: {self.path}")
        elif _is_module(model):
            self.factory = model  # pickled into the ML process, weights and all
        elif callable(model):
            try:
                pickle.dumps(model)
            except Exception as exc:
                raise ConfigError(
                    f"the model factory cannot be pickled into the ML process ({exc}); define it "
                    "at module level (not a lambda or a nested function)") from None
            self.factory = model
        else:
            raise ConfigError("model must be a factory returning an nn.Module or a TorchScript "
                              f"path, got {type(model).__name__}")
        self.device = check_device(device)
        self.num_threads = _check_threads(num_threads)
        if dtype is not None and not isinstance(dtype, str):
            dtype = str(dtype).removeprefix("torch.")  # a torch.dtype, without importing torch
        if dtype is not None and dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)} or None, got {dtype!r}")
        self.dtype: str | None = dtype
        if output not in ("numpy", "list"):
            raise ConfigError(f"output must be 'numpy' or 'list', got {output!r}")
        self.output = output
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.warmup_input = warmup_input
        self.module: Any = None
        self._device: str | None = None

    # -- ML process ------------------------------------------------------------------
    def load(self) -> None:
        """Build or load the module on the device, in eval mode."""
        import torch

        set_torch_threads(self.num_threads)
        self._device = resolve_device(self.device)
        if self.path is not None and self.path.endswith(".pt2"):
            # torch.export.save() output; the program is already captured in eval mode
            # (GraphModule.eval() raises), so it is moved to the device and used as is.
            self.module = torch.export.load(self.path).module().to(self._device)
            logger.info("torch model %s loaded from %s on %s", self.name, self.path, self._device)
            return
        if self.path is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DeprecationWarning)
                module = torch.jit.load(self.path, map_location=self._device)  # type: ignore[no-untyped-call]
            for warning in caught:  # once at load, in the log, instead of on stderr
                logger.warning("torch model %s: %s (a torch.export .pt2 file also works)",
                               self.name, warning.message)
        elif isinstance(self.factory, torch.nn.Module):
            module = self.factory
        else:
            module = self.factory()
            if not isinstance(module, torch.nn.Module):
                raise ConfigError(f"the model factory returned {type(module).__name__}, "
                                  "not a torch.nn.Module")
        self.module = module.to(self._device).eval()
        logger.info("torch model %s loaded on %s", self.name, self._device)

    def warmup(self) -> None:
        """Run ``warmup_input`` (or zeros of a fully known ``input_shape``) once."""
        sample = self.warmup_input
        if sample is None and self.input_shape and None not in self.input_shape:
            import numpy as np

            sample = np.zeros(self.input_shape, dtype=self.dtype or "float32")
        if sample is not None:
            self.predict_batch([sample])

    def predict_batch(self, xs: list[Any]) -> list[Any]:
        """Stack the samples, run the module once, split the output per sample.

        Raises:
            InputError: a sample is not numeric, ragged, or has the wrong shape.
        """
        import torch

        if not xs:
            return []
        if all(isinstance(x, Mapping) for x in xs):
            keys = list(xs[0])
            for i, x in enumerate(xs):
                if list(x) != keys:
                    raise InputError(f"input {i} has fields {sorted(x)} but the batch has "
                                     f"{sorted(keys)}")
            batch = {k: self._stack([x[k] for x in xs], f"field {k!r} of input") for k in keys}
            args: tuple[Any, ...] = ()
            kwargs: dict[str, Any] = batch
            shapes = {k: tuple(v.shape[1:]) for k, v in batch.items()}
        elif any(isinstance(x, Mapping) for x in xs):
            raise InputError("this batch mixes keyword and positional inputs; send one kind")
        else:
            tensor = self._stack(xs, "input", self.input_shape)
            args, kwargs, shapes = (tensor,), {}, {"": tuple(tensor.shape[1:])}
        try:
            with torch.inference_mode():
                out = self.module(*args, **kwargs)
        except (RuntimeError, AssertionError) as exc:
            lines = str(exc).strip().splitlines() or [""]
            message = lines[-1].removeprefix("RuntimeError: ")
            if isinstance(exc, AssertionError):  # a torch.export program's shape guard
                message = lines[0]
                if not message.startswith("Guard failed"):
                    raise
            elif "out of memory" in message or not _SHAPE_ERROR_RE.search(message):
                raise
            raise InputError(f"{self._describe(shapes)}: {message}") from None
        return _split(out, len(xs), self.output)

    def _describe(self, shapes: dict[str, tuple[int, ...]]) -> str:
        """What was wrong with the shapes the model rejected, and what it expects if known."""
        if "" not in shapes:
            got = ", ".join(f"{k} {_shape_str(s)}" for k, s in shapes.items())
            return f"inputs have shapes {got}, which the model rejects"
        expected = (_shape_str(self.input_shape) if self.input_shape
                    else _first_layer_hint(self.module))
        got = f"input has shape {_shape_str(shapes[''])}"
        return f"{got} but the model expects {expected}" if expected else (
            f"{got}, which the model rejects")

    def _stack(self, xs: list[Any], what: str,
               expected: Sequence[int | None] | None = None) -> torch.Tensor:
        import numpy as np
        import torch

        labels = [f"{what} {i}" if len(xs) > 1 else what for i in range(len(xs))]
        arrays = [as_array(x, label) for x, label in zip(xs, labels)]
        for array, label in zip(arrays, labels):
            if expected is not None and not _matches(array.shape, expected):
                raise InputError(f"{label} has shape {_shape_str(array.shape)} but the model "
                                 f"expects {_shape_str(expected)}")
        shapes = [a.shape for a in arrays]
        common = max(set(shapes), key=shapes.count)  # the majority names the odd one out
        for i, shape in enumerate(shapes):
            if shape != common:
                raise InputError(f"{what} {i} has shape {_shape_str(shape)} but the batch "
                                 f"expects {_shape_str(common)}")
        dtype = getattr(np, self.dtype) if self.dtype and self.dtype != "bfloat16" else None
        stacked = np.stack(arrays).astype(dtype, copy=False) if dtype else np.stack(arrays)
        tensor = torch.from_numpy(np.ascontiguousarray(stacked))
        if self.dtype == "bfloat16":
            tensor = tensor.to(torch.bfloat16)
        return tensor.to(self._device or "cpu")


def _split(out: Any, n: int, output: str) -> list[Any]:
    """Split a batched model output into ``n`` per-sample values."""
    import torch

    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.shape[0] != n:
            raise ValueError(f"the model returned shape {tuple(out.shape)} for a batch of {n}; "
                             "its first dimension must be the batch")
        if out.dtype == torch.bfloat16:
            out = out.float()  # numpy has no bfloat16
        array = out.detach().cpu().numpy()
        return [array[i].tolist() if output == "list" else array[i] for i in range(n)]
    if isinstance(out, Mapping):
        parts = {k: _split(v, n, output) for k, v in out.items() if v is not None}
        return [{k: v[i] for k, v in parts.items()} for i in range(n)]
    if isinstance(out, (tuple, list)):
        columns = [_split(v, n, output) for v in out]
        return [[c[i] for c in columns] for i in range(n)]
    raise TypeError(f"the model returned {type(out).__name__}; expected a tensor, a tuple or "
                    "a dict of tensors")
