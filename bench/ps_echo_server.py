"""A raw gRPC byte echo: the anchor for the parameter-server throughput benchmark.

One stream-stream method without protobuf: the client streams byte chunks, the server collects
them all and streams them back -- the same upload-then-download pattern (and chunk size) as a
parameter-server PushPull, with none of the work. Prints the port, then serves until killed.
"""

import argparse
import sys
from concurrent import futures

import grpc

METHOD = "/radam_dist.bench.Echo/Stream"


def _echo(request_iterator, context):
    chunks = list(request_iterator)
    yield from chunks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
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
