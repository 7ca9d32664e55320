"""The Open Inference Protocol V2 over gRPC: ``inference.GRPCInferenceService``.

The same models as the V2 REST surface (:mod:`.v2`: every model with a tensor signature),
answered by the same serving core (:func:`.serving.lifecycle`): a request is refused at
once while the server drains, its deadline is the earlier of the client's gRPC deadline and
the model's ``timeout`` from its arrival, admission sheds it under overload, a client that
cancels the call (or whose deadline passes) cancels the work in the ML process, and it is
counted once in ``/metrics`` and the status page's history. Tensors come as
``raw_input_contents`` (numpy views on the message's bytes: no copy, no Python lists) or as
typed ``contents``; outputs always go back as ``raw_output_contents``, which every client of
the protocol reads.

The API key, when set, is the ``authorization: Bearer <key>`` metadata, on every call but
ServerLive and ServerReady (open like ``/v2/health/*``). Errors are gRPC status codes, from
the HTTP status :func:`.serving.failure_of` gives (:data:`GRPC_CODES`), with the same
message; a shed request carries ``retry-after`` in its trailing metadata.

The gRPC server itself (threads, port, start and stop) is :mod:`ipcserve.server.lifecycle`'s.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from .. import __version__
from ..engine.errors import InputError, IPCServeError, NotFoundError
from . import tensors
from .oip import inference_pb2 as pb
from .oip import inference_pb2_grpc as pb_grpc
from .access import stamp
from .serving import Endpoint, Exchange, Served, failure_of, lifecycle

__all__ = ["GRPC_CODES", "InferenceService", "code_of"]

logger = logging.getLogger(__name__)

#: The HTTP status of a failure -> its gRPC code. 502 (the ML process died with the request
#: in flight) is INTERNAL, not UNAVAILABLE: clients retry UNAVAILABLE, and this request may
#: have been computed, or be what killed the process. 503 (never computed: loading,
#: draining, shed) is UNAVAILABLE, safe to retry; 429 (shed, with ``shed_status=429``) and
#: 413 are RESOURCE_EXHAUSTED, as gRPC says of an over-large message or a rate limit.
GRPC_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED,
    409: grpc.StatusCode.ABORTED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED, 499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL, 502: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# The typed contents field of each datatype (FP16 has none: it travels raw).
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents",
             "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}
# A deadline further away than this is "none" (gRPC reports a huge time remaining).
_NO_DEADLINE = 1e8


def code_of(status: int) -> grpc.StatusCode:
    """The gRPC code of an HTTP status (:data:`GRPC_CODES`; else by its class)."""
    return GRPC_CODES.get(status) or (grpc.StatusCode.INVALID_ARGUMENT if status < 500
                                      else grpc.StatusCode.INTERNAL)


_Handler = TypeVar("_Handler", bound=Callable[..., Any])


def _answered(open: bool = False) -> Callable[[_Handler], _Handler]:
    """Wrap a unary call: the API key (unless ``open``), and any error as its gRPC code."""

    def wrap(handler: _Handler) -> _Handler:
        @functools.wraps(handler)
        def call(self: InferenceService, request: Any, context: Any) -> Any:
            try:
                if not open:
                    self.authorize(context)
                return handler(self, request, context)
            except Exception as error:  # every failure is answered, with its code
                self.abort(context, error)

        return call  # type: ignore[return-value]

    return wrap


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The V2 gRPC service of one app's models.

    Args:
        state: the app's ipcserve state (``serving.served(app)``): its models, API key,
            metrics and shed status.
    """

    def __init__(self, state: Served) -> None:
        self.state = state
        self._key = threading.local()  # the team key of the call this thread serves

    # -- what every call shares ------------------------------------------------------
    def authorize(self, context: Any) -> None:
        """Check the ``authorization: Bearer <key>`` metadata when a key is needed; a team
        key is kept for the call's lifecycle (its quotas, the access log).

        Raises:
            UnauthorizedError: a key is needed and the call did not send one.
            RateLimitedError: its team key is over its quota.
        """
        sent = dict(context.invocation_metadata()).get("authorization", "")
        scheme, _, token = str(sent).partition(" ")
        self._key.value = self.state.authorize(
            token.strip().encode("utf-8", "replace") if scheme.lower() == "bearer" else b"",
            "send the metadata 'authorization: Bearer <key>'")

    def abort(self, context: Any, error: BaseException) -> None:
        """End the call with ``error``'s gRPC code and message (and ``retry-after``)."""
        failure = failure_of(error, self.state.shed_status)
        if not isinstance(error, IPCServeError):
            logger.error("V2 gRPC: unexpected error", exc_info=error)
        if failure.retry_after is not None:
            context.set_trailing_metadata((("retry-after", str(failure.retry_after)),))
        context.abort(code_of(failure.status), failure.message)

    def tensor_model(self, name: str, version: str = "") -> tuple[Endpoint, dict[str, Any]]:
        """The model ``name`` and its tensor signature.

        Raises:
            NotFoundError: no such model, none with a tensor signature, or a version other
                than "1".
        """
        models = self.state.models
        endpoint = models.endpoints.get(name)
        signature = None if endpoint is None else tensors.signature_of(endpoint.ml)
        if endpoint is None or signature is None:
            known = sorted(n for n, e in models.endpoints.items()
                           if tensors.signature_of(e.ml) is not None)
            raise NotFoundError(f"no model named {name!r} with a tensor signature; models: "
                                f"{', '.join(known) or 'none'}")
        if version not in ("", "1"):
            raise NotFoundError(f"model {name!r} has one version, \"1\"; got {version!r}")
        return endpoint, signature

    # -- health and metadata ---------------------------------------------------------
    @_answered(open=True)
    def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    @_answered(open=True)
    def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.state.models.readiness().ready)

    @_answered()
    def ModelReady(self, request: Any, context: Any) -> Any:
        self.tensor_model(request.name, request.version)
        return pb.ModelReadyResponse(ready=self.state.models.readiness().model_ready(request.name))

    @_answered()
    def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(name="ipcserve", version=__version__,
                                         extensions=list(tensors.EXTENSIONS))

    @_answered()
    def ModelMetadata(self, request: Any, context: Any) -> Any:
        endpoint, signature = self.tensor_model(request.name, request.version)
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name, versions=["1"], platform=tensors.platform_of(endpoint.ml),
            inputs=[meta(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                    for t in signature["inputs"]],
            outputs=[meta(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                     for t in signature["outputs"]])

    # -- inference -------------------------------------------------------------------
    @_answered()
    def ModelInfer(self, request: Any, context: Any) -> Any:
        return self.infer(request, context)

    def ModelStreamInfer(self, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        """Each request on the stream answered in order, through the lifecycle like a
        ModelInfer; a failed request is answered with its message and the stream goes on.
        A missing API key ends the stream."""
        try:
            self.authorize(context)
        except IPCServeError as error:  # no key, or over its quota
            self.abort(context, error)
        for request in requests:
            try:
                yield pb.ModelStreamInferResponse(infer_response=self.infer(request, context))
            except Exception as error:  # answered on the stream; the next request goes on
                failure = failure_of(error, self.state.shed_status)
                if not isinstance(error, IPCServeError):
                    logger.error("V2 gRPC stream: unexpected error", exc_info=error)
                yield pb.ModelStreamInferResponse(error_message=failure.message)

    def infer(self, request: Any, context: Any) -> Any:
        """One ModelInferRequest through the serving core.

        Raises:
            the errors of the lifecycle (:func:`.serving.lifecycle`), ``InputError`` for a
            malformed request, ``NotFoundError`` for an unknown model.
        """
        received = time.monotonic()
        endpoint, signature = self.tensor_model(request.model_name, request.model_version)
        remaining = context.time_remaining()
        limit = None if remaining is None or remaining > _NO_DEADLINE else received + remaining
        key = getattr(self._key, "value", None)
        if key is not None:
            key.allow(endpoint.name)
        access = {"time": stamp(received), "method": "gRPC", "route": "ModelInfer",
                  "path": f"/inference.GRPCInferenceService/ModelInfer/{endpoint.name}"}
        with lifecycle(self.state, endpoint, received=received, limit=limit,
                       gone=lambda: not context.is_active(), key=key,
                       access=access if self.state.access_log else None) as ex:
            return _answer(ex, request, signature)


def _answer(ex: Exchange, request: Any, signature: dict[str, Any]) -> Any:
    ex.admit()
    items = tensors.items_of(_inputs(request, signature), signature)
    names = _outputs_wanted(request, signature)
    results = ex.call_batch(items).value
    response = pb.ModelInferResponse(model_name=request.model_name, model_version="1",
                                     id=request.id)
    for name in names:
        array = tensors.output_array(results, name, signature)
        response.outputs.add(name=name, datatype=tensors.FROM_NUMPY[array.dtype.name],
                             shape=array.shape)
        response.raw_output_contents.append(tensors.raw_bytes(array))
    return response


def _inputs(request: Any, signature: dict[str, Any]) -> dict[str, Any]:
    """The input tensors by name, as numpy arrays (views on ``raw_input_contents``)."""
    if not request.inputs:
        raise InputError("'inputs' must be a non-empty list of tensors")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InputError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} "
                         "inputs: send one per input, in the order of inputs, or none")
    declared = {spec["name"]: spec for spec in signature["inputs"]}
    given: dict[str, Any] = {}
    for i, tensor in enumerate(request.inputs):
        where = f"inputs[{i}]"
        name, datatype, shape = tensors.check_input(tensor.name, tensor.datatype,
                                                    list(tensor.shape), where, declared)
        field = _CONTENTS.get(datatype)
        typed = field is not None and len(getattr(tensor.contents, field)) > 0
        if raw:
            if typed:
                raise InputError(f"{where}.contents: this request sends raw_input_contents; "
                                 "send every input raw or every input in contents")
            array = tensors.array_from_bytes(raw[i], datatype, shape, f"raw_input_contents[{i}]")
        elif field is None:
            raise InputError(f"{where}.contents: {datatype} has no typed contents; send it in "
                             "raw_input_contents")
        else:
            array = tensors.array_from_values(getattr(tensor.contents, field), datatype, shape,
                                              f"{where}.contents.{field}")
        if name in given:
            raise InputError(f"{where}.name: input {name!r} is given twice")
        given[name] = array
    return given


def _outputs_wanted(request: Any, signature: dict[str, Any]) -> list[str]:
    names = [spec["name"] for spec in signature["outputs"]]
    if not request.outputs:
        return names
    for i, out in enumerate(request.outputs):
        if out.name not in names:
            raise InputError(f"outputs[{i}].name must be an output of this model: {names}")
        if "classification" in out.parameters:
            raise InputError(f"outputs[{i}].parameters.classification: this server does not "
                             "have the classification extension")
    return [out.name for out in request.outputs]
