# A gRPC client for lb's tests: calls the test server's three methods through TARGET
# (h2c, or TLS with CA_FILE and the name to check) and prints what it got, as JSON.
import json
import sys

import grpc

target = sys.argv[1]
if len(sys.argv) > 3:
    creds = grpc.ssl_channel_credentials(open(sys.argv[2], "rb").read())
    channel = grpc.secure_channel(
        target, creds, options=(("grpc.ssl_target_name_override", sys.argv[3]),)
    )
else:
    channel = grpc.insecure_channel(target)
out = {}
say = channel.unary_unary("/lb.Echo/Say")
reply, call = say.with_call(b"hello", timeout=5)
out["say"] = reply.decode()
out["trailer"] = dict(call.trailing_metadata()).get("served-by")
try:
    channel.unary_unary("/lb.Echo/Fail")(b"x", timeout=5)
    out["fail"] = "no error"
except grpc.RpcError as e:
    out["fail"] = [e.code().name, e.details()]
out["count"] = [m.decode() for m in channel.unary_stream("/lb.Echo/Count")(b"", timeout=5)]
print(json.dumps(out))
