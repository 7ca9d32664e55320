"""The Open Inference Protocol (V2) over gRPC: ``inference.proto`` (ipcserve's own file,
following the protocol's published definition) and the modules ``scripts/gen_grpc.sh``
generates from it with a pinned grpcio-tools. Never edit the generated modules by hand."""
