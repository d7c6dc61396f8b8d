import socket, struct, sys
import msgpack  # pip install msgpack

FORMATS = {"f32": "f", "f64": "d", "i32": "i", "i64": "q", "u8": "B", "bool": "?"}

def read_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    return data

def call(sock, message):
    body = msgpack.packb(message, use_bin_type=True)
    sock.sendall(struct.pack(">I", len(body)) + body)
    (length,) = struct.unpack(">I", read_exactly(sock, 4))
    reply = msgpack.unpackb(read_exactly(sock, length), raw=False)
    if reply["type"] == "error":
        raise RuntimeError(f"{reply['code']}: {reply['message']}")
    return reply

def tensor(spec, length, value):
    # Free dimensions (-1, like a sentence's length) take `length`; masks are all ones.
    shape = [length if d < 0 else d for d in spec["shape"]]
    count = 1
    for d in shape:
        count *= d
    fmt = FORMATS[spec["dtype"]]
    fill = 1 if "mask" in spec["name"] else value
    fill = float(fill) if fmt in "fd" else int(fill)
    return {"dtype": spec["dtype"], "shape": shape, "data": struct.pack(f"<{count}{fmt}", *[fill] * count)}

host, port = sys.argv[1].rsplit(":", 1)
sock = socket.create_connection((host, int(port)))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if len(sys.argv) > 2:  # TLS: the CA bundle that signed the balancer's certificate
    import ssl
    sock = ssl.create_default_context(cafile=sys.argv[2]).wrap_socket(sock, server_hostname=host)
model = call(sock, {"type": "metadata", "id": 1})["model"]
print(f"model {model['name']}: " + ", ".join(f"{i['name']} {i['dtype']} {i['shape']}" for i in model["inputs"]))
for request_id in range(2, 5):
    inputs = {spec["name"]: tensor(spec, 4 * request_id, request_id) for spec in model["inputs"]}
    reply = call(sock, {"type": "infer", "id": request_id, "inputs": inputs, "deadline_ms": 5000})
    name, out = next(iter(reply["outputs"].items()))
    print(f"request {request_id}: {name} {out['dtype']} {out['shape']} from {reply['worker']}")
