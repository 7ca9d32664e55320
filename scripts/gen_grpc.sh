#!/usr/bin/env bash
# Generate the Python modules of ipcserve's V2 gRPC service from
# ipcserve/http/oip/inference.proto. Run from anywhere: `bash scripts/gen_grpc.sh`.
#
# grpcio-tools is pinned: its protoc decides the protobuf version the generated code needs
# at run time (1.81.1 writes code for protobuf >= 6.33.5, the same as tritonclient[grpc]'s
# and KServe's own stubs, which cap protobuf below 7; 1.85's code needs protobuf 7 and could
# not be installed beside them). Its generated service module needs grpcio >= 1.81.1:
# setup.cfg's `grpc` extra says both.
#
# One change is made to protoc's output, by this script (never by hand): the messages are
# built in a descriptor pool of their own instead of protobuf's default pool. The protocol's
# messages are `inference.*` in every implementation (tritonclient's and KServe's stubs
# too), and the default pool refuses a second file that defines the same names, so with
# the default pool ipcserve's server could not be imported in a process that also imports
# tritonclient.grpc or kserve.
set -euo pipefail
cd "$(dirname "$0")/.."
GRPCIO_TOOLS=1.81.1
out=ipcserve/http/oip
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install --quiet --disable-pip-version-check "grpcio-tools==$GRPCIO_TOOLS"
"$tools/venv/bin/python" -m grpc_tools.protoc -I . \
    --python_out=. --pyi_out=. --grpc_python_out=. "$out/inference.proto"
"$tools/venv/bin/python" - "$out/inference_pb2.py" <<'PY'
import sys

path = sys.argv[1]
text = open(path).read()
default = "_descriptor_pool.Default().AddSerializedFile("
assert text.count(default) == 1, "protoc's output changed: review this script"
text = text.replace(default, "_descriptor_pool.DescriptorPool().AddSerializedFile(")
open(path, "w").write(text)
PY
echo "generated $out/inference_pb2.py, inference_pb2.pyi, inference_pb2_grpc.py with grpcio-tools $GRPCIO_TOOLS"
