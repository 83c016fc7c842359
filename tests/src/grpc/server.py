# A gRPC server for lb's tests (python3-grpcio, no generated code: methods take and give
# raw bytes). /lb.Echo/Say answers "NAME:" + the request, with trailing metadata;
# /lb.Echo/Fail ends with NOT_FOUND; /lb.Echo/Count streams three messages.
import sys
from concurrent import futures

import grpc

addr, name = sys.argv[1], sys.argv[2]


def say(request, context):
    context.set_trailing_metadata((("served-by", name),))
    return name.encode() + b":" + request


def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())


def count(request, context):
    for i in range(3):
        yield b"%d" % i


handlers = {
    "Say": grpc.unary_unary_rpc_method_handler(say),
    "Fail": grpc.unary_unary_rpc_method_handler(fail),
    "Count": grpc.unary_stream_rpc_method_handler(count),
}
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("lb.Echo", handlers),))
server.add_insecure_port(addr)
server.start()
print("ready", flush=True)
server.wait_for_termination()
