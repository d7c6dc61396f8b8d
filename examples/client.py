import socket, struct, sys
import msgpack  # pip install msgpack

def read_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    return data

def infer(sock, request_id, values, deadline_ms=5000):
    tensor = {"dtype": "f32", "shape": [len(values)], "data": struct.pack(f"<{len(values)}f", *values)}
    body = msgpack.packb({"type": "infer", "id": request_id, "inputs": {"input": tensor},
                          "deadline_ms": deadline_ms}, use_bin_type=True)
    sock.sendall(struct.pack(">I", len(body)) + body)
    (length,) = struct.unpack(">I", read_exactly(sock, 4))
    reply = msgpack.unpackb(read_exactly(sock, length), raw=False)
    if reply["type"] == "error":
        raise RuntimeError(f"{reply['code']}: {reply['message']}")
    out = reply["outputs"]["output"]
    return struct.unpack(f"<{len(out['data']) // 4}f", out["data"]), reply["worker"]

host, port = sys.argv[1].rsplit(":", 1)
sock = socket.create_connection((host, int(port)))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if len(sys.argv) > 3:  # TLS: the CA bundle that signed the balancer's certificate
    import ssl
    sock = ssl.create_default_context(cafile=sys.argv[3]).wrap_socket(sock, server_hostname=host)
for request_id in range(1, 4):
    output, worker = infer(sock, request_id, [0.1 * request_id] * int(sys.argv[2]))
    print(f"request {request_id}: {len(output)} outputs from {worker}, first {output[0]:.4f}")
