"""The generated protobuf modules, generating them first if they are missing or stale."""

from radam_dist._requirements import require_grpc
from radam_dist.ps import protogen

require_grpc()  # missing or too old grpcio / protobuf: one clear error, not the stubs' own
protogen.ensure_stubs()

from radam_dist.ps._generated import ps_pb2 as pb  # noqa: E402
from radam_dist.ps._generated import ps_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["pb", "pb_grpc"]
