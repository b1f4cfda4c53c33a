"""Moved to router/grpc/ingress.py (``router.grpc.ingress``): this name is removed in the next release.

Serve configs name ``router.grpc_ingress.add_VisionRouteServicer_to_server`` in
``grpc_options.grpc_servicer_functions``; it keeps working for one release. Name
``router.grpc.ingress.add_VisionRouteServicer_to_server`` instead (the shipped configs do).
"""

import warnings

from router.grpc.ingress import (  # noqa: F401
    GRPC_ROLES,
    SERVICE_NAME,
    GrpcEndpoints,
    add_VisionRouteServicer_to_server,
    pb,
    visionroute_pb2_grpc,
)

warnings.warn(
    "router.grpc_ingress moved to router.grpc.ingress; the old name is removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
