"""A raw gRPC byte echo: the anchor for the parameter-server throughput benchmark.

One stream-stream method without protobuf: the client streams byte chunks, the server collects
them all and streams them back -- the same upload-then-download pattern (and chunk size) as a
parameter-server PushPull, with none of the work. Prints the port, then serves until killed.

Like the parameter server, it lets malloc reuse freed chunk buffers (tensors.reuse_freed_memory)
unless --default-allocator: the anchor gets every advantage the server has.
"""

import argparse
import sys
from pathlib import Path
from concurrent import futures

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHOD = "/radam_dist.bench.Echo/Stream"


def _echo(request_iterator, context):
    chunks = list(request_iterator)
    yield from chunks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc thresholds alone (the server tunes them)")
    args = parser.parse_args()
    if not args.default_allocator:
        from radam_dist.ps.tensors import reuse_freed_memory

        reuse_freed_memory()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[
        ("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)])
    handler = grpc.method_handlers_generic_handler("radam_dist.bench.Echo", {
        "Stream": grpc.stream_stream_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
