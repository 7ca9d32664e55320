"""OnnxModel: serve an ``.onnx`` file with onnxruntime, batching concurrent calls.

Input and output names, shapes and dtypes are read from the model::

    with OnnxModel("mlp.onnx", intra_op_num_threads=1) as ml:
        ml(np.zeros(4, np.float32))                  # single-input model: one sample
        ml(input_ids=ids, attention_mask=mask)       # multi-input model: {name: array}

How samples are batched depends on the first dimension the model declares for its inputs:

* dynamic (``"batch"``, ``None``) on every input: samples are stacked and run at once;
  samples whose other dynamic dimensions differ (e.g. sequence length) run in separate
  groups, never padded behind your back;
* fixed to 1: samples run one at a time, each with a batch axis of 1 added;
* anything else: each sample is the whole input and runs on its own.

``onnxruntime`` is imported inside the ML process only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..engine.errors import ConfigError, InputError
from ..engine.mlprocess import MLProcess
from .pytorch import check_device, default_name

if TYPE_CHECKING:
    import numpy as np

__all__ = ["OnnxModel"]

logger = logging.getLogger(__name__)

# onnxruntime type strings -> numpy dtype names
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16",
    "tensor(int8)": "int8", "tensor(uint64)": "uint64", "tensor(uint32)": "uint32",
    "tensor(uint16)": "uint16", "tensor(uint8)": "uint8", "tensor(bool)": "bool",
    "tensor(string)": "object",
}


def _dims_str(dims: Sequence[Any]) -> str:
    parts = [str(d) if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) and d else "?")
             for d in dims]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _is_free(dim: Any) -> bool:
    return not isinstance(dim, int) or dim < 0


class _Input:
    """One model input as declared in the graph."""

    def __init__(self, name: str, dims: Sequence[Any], ort_type: str) -> None:
        self.name = name
        self.dims = list(dims)
        self.dtype = _ORT_TYPES.get(ort_type)
        if self.dtype is None:
            raise ConfigError(f"input {name!r} has type {ort_type}, which OnnxModel cannot feed")


class OnnxModel(MLProcess):
    """Serve an ONNX model with onnxruntime.

    Args:
        path: the ``.onnx`` file.
        providers: onnxruntime execution providers, in order of preference. Default:
            ``CUDAExecutionProvider`` first when onnxruntime has it and ``device`` allows,
            then ``CPUExecutionProvider``.
        device: "cpu", "cuda", "cuda:N" or "auto" (CUDA if onnxruntime has it, else CPU);
            used only when ``providers`` is not given.
        intra_op_num_threads: threads per operator (default: onnxruntime's choice, one per
            core). Set 1 or 2 when several ML processes share a small machine.
        output_names: outputs to compute (default: all).
        output: "numpy" (per-sample arrays) or "list" (nested lists, JSON-friendly).
        warmup_input: an example sample run before the process reports ready (default:
            zeros, when every per-sample dimension is fixed).
        name: the model's name; defaults to the file's stem.
        **settings: any :class:`~ipcserve.Config` field (``timeout``, ``max_batch_size``...).

    Raises:
        ConfigError: the file does not exist or an argument is invalid.
    """

    #: V2 metadata: the platform name Triton gives ONNX Runtime models.
    tensor_platform = "onnxruntime_onnx"

    def __init__(self, path: str | os.PathLike[str], *, providers: Sequence[Any] | None = None,
                 device: str = "auto", intra_op_num_threads: int | None = None,
                 output_names: Sequence[str] | None = None, output: str = "numpy",
                 warmup_input: Any = None, name: str | None = None, **settings: Any) -> None:
        super().__init__(name=name or default_name(path, "onnxmodel"), **settings)
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isfile(self.path):
            raise ConfigError(f"ONNX file not found: {self.path}")
        if device == "mps":
            raise ConfigError("OnnxModel does not support device 'mps'; pass providers instead")
        self.device = check_device(device)
        self.providers = None if providers is None else list(providers)
        if intra_op_num_threads is not None and (
                isinstance(intra_op_num_threads, bool) or not isinstance(intra_op_num_threads, int)
                or intra_op_num_threads < 0):
            raise ConfigError("intra_op_num_threads must be an integer >= 0 (0: onnxruntime's "
                              f"default) or None, got {intra_op_num_threads!r}")
        self.intra_op_num_threads = intra_op_num_threads
        self.output_names = None if output_names is None else list(output_names)
        if output not in ("numpy", "list"):
            raise ConfigError(f"output must be 'numpy' or 'list', got {output!r}")
        self.output = output
        self.warmup_input = warmup_input
        self.session: Any = None
        self._inputs: list[_Input] = []
        self._mode = "stack"

    # -- ML process ------------------------------------------------------------------
    def _resolve_providers(self) -> list[Any]:
        import onnxruntime as ort

        if self.providers is not None:
            return self.providers
        available = ort.get_available_providers()
        has_cuda = "CUDAExecutionProvider" in available
        if self.device.startswith("cuda") and not has_cuda:
            raise ConfigError(f"device={self.device!r} but this onnxruntime has no "
                              "CUDAExecutionProvider (install onnxruntime-gpu), "
                              f"only {', '.join(available)}")
        if has_cuda and self.device != "cpu":
            device_id = int(self.device.partition(":")[2] or 0)
            return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def load(self) -> None:
        """Create the inference session and read the model's inputs and outputs."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.intra_op_num_threads is not None:
            options.intra_op_num_threads = self.intra_op_num_threads
        # Spinning threads burn a core between requests; a server mostly waits.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(self.path, options,
                                            providers=self._resolve_providers())
        self._inputs = [_Input(i.name, i.shape, i.type) for i in self.session.get_inputs()]
        declared = [o.name for o in self.session.get_outputs()]
        if self.output_names is None:
            self.output_names = declared
        unknown = sorted(set(self.output_names) - set(declared))
        if unknown:
            raise ConfigError(f"unknown output name(s) {unknown}; the model has {declared}")
        first = [i.dims[0] if i.dims else None for i in self._inputs]
        if all(i.dims for i in self._inputs) and all(_is_free(d) for d in first):
            self._mode = "stack"
        elif all(i.dims for i in self._inputs) and all(_is_free(d) or d == 1 for d in first):
            self._mode = "one"
        else:
            self._mode = "whole"
        logger.info("onnx model %s loaded (providers %s, inputs %s, batching: %s)", self.name,
                    self.session.get_providers(),
                    ", ".join(f"{i.name}{_dims_str(i.dims)}" for i in self._inputs), self._mode)

    def _sample_dims(self, spec: _Input) -> list[Any]:
        return spec.dims if self._mode == "whole" else spec.dims[1:]

    def warmup(self) -> None:
        """Run ``warmup_input``, or zeros when every per-sample dimension is fixed."""
        sample = self.warmup_input
        if sample is None:
            import numpy as np

            dims = [self._sample_dims(i) for i in self._inputs]
            if any(_is_free(d) for ds in dims for d in ds) or any(
                    i.dtype == "object" for i in self._inputs):
                return
            zeros = {i.name: np.zeros(d, dtype=i.dtype) for i, d in zip(self._inputs, dims)}
            sample = zeros if len(zeros) > 1 else next(iter(zeros.values()))
        self.predict_batch([sample])

    def _feeds(self, x: Any, where: str) -> dict[str, np.ndarray]:
        """One sample as {input name: array of the declared dtype and per-sample shape}."""
        import numpy as np

        names = [i.name for i in self._inputs]
        if isinstance(x, Mapping):
            missing = [n for n in names if n not in x]
            extra = sorted(str(k) for k in x if k not in names)
            if missing or extra:
                raise InputError(f"{where} must have the fields {names}"
                                 + (f"; missing {missing}" if missing else "")
                                 + (f"; unknown {extra}" if extra else ""))
        elif len(names) == 1:
            x = {names[0]: x}
        else:
            raise InputError(f"this model has several inputs {names}: send them by name "
                             f"(a dict or keyword arguments), not one {type(x).__name__}")
        feeds = {}
        for spec in self._inputs:
            label = f"input {spec.name!r}" + (f" of {where}" if where != "the input" else "")
            try:
                raw = np.asarray(x[spec.name])
            except (ValueError, TypeError):
                raise InputError(f"{label} is not a rectangular array (ragged nested lists?)"
                                 ) from None
            if spec.dtype != "object" and raw.dtype.kind not in "biuf":
                raise InputError(f"{label} is not numeric: got values of dtype {raw.dtype}"
                                 if raw.dtype.kind != "O" else f"{label} is not a rectangular "
                                 "numeric array (ragged nested lists or non-numeric values)")
            array = raw.astype(spec.dtype, copy=False)
            dims = self._sample_dims(spec)
            if array.ndim != len(dims) or any(
                    not _is_free(d) and d != s for d, s in zip(dims, array.shape)):
                raise InputError(f"{label} has shape {_dims_str(array.shape)} but the model "
                                 f"expects {_dims_str(dims)}")
            feeds[spec.name] = array
        return feeds

    def predict_batch(self, xs: list[Any]) -> list[Any]:
        """Validate and cast every sample, run the session, split outputs per sample.

        Raises:
            InputError: a sample has a missing or unknown field, a wrong shape, or values
                that do not convert to the input's declared dtype.
        """
        import numpy as np

        feeds = [self._feeds(x, f"input {i}" if len(xs) > 1 else "the input")
                 for i, x in enumerate(xs)]
        results: list[Any] = [None] * len(xs)
        if self._mode != "stack":
            for i, feed in enumerate(feeds):
                if self._mode == "one":
                    feed = {k: v[np.newaxis] for k, v in feed.items()}
                outs = self.session.run(self.output_names, feed)
                if self._mode == "one":
                    outs = [o[0] if (isinstance(o, list) or getattr(o, "ndim", 0) > 0)
                            and len(o) == 1 else o for o in outs]
                results[i] = self._pack(outs)
            return results
        # Samples whose free dimensions differ (e.g. sequence length) go in separate runs.
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, feed in enumerate(feeds):
            groups.setdefault(tuple(v.shape for v in feed.values()), []).append(i)
        for members in groups.values():
            batch = {name: np.stack([feeds[i][name] for i in members]) for name in feeds[0]}
            outs = self.session.run(self.output_names, batch)
            for j, i in enumerate(members):
                results[i] = self._pack([_row(o, j, len(members), name)
                                         for o, name in zip(outs, self.output_names or [])])
        return results

    def _pack(self, outs: list[Any]) -> Any:
        if self.output == "list":
            outs = [o.tolist() if hasattr(o, "tolist") else o for o in outs]
        if len(outs) == 1:
            return outs[0]
        return dict(zip(self.output_names or [], outs))


def _row(value: Any, index: int, n: int, name: str) -> Any:
    """Sample ``index`` of a batched output (an array, or a list such as sklearn's ZipMap)."""
    if len(value) != n:
        raise ValueError(f"output {name!r} has {len(value)} rows for a batch of {n}; "
                         "its first dimension must be the batch")
    return value[index]
