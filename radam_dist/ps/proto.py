"""The generated protobuf modules, generating them first if they are missing or stale."""

from radam_dist.ps import protogen

protogen.generate()

from radam_dist.ps._generated import ps_pb2 as pb  # noqa: E402
from radam_dist.ps._generated import ps_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["pb", "pb_grpc"]
