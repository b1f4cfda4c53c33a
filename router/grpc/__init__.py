"""The gRPC face: ``ingress`` (the RPCs, translated to the service core) and ``build`` (the code
generated from router/grpc/proto/visionroute.proto)."""
