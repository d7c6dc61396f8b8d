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

def frame(message):
    body = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(body)) + body

balancers = [a.rsplit(":", 1) for a in sys.argv[1].split(",")]  # host:port,host:port
total, dim = int(sys.argv[2]), int(sys.argv[3])
item = {"input": {"dtype": "f32", "shape": [dim], "data": struct.pack(f"<{dim}f", *[0.5] * dim)}}

def connect(turn):  # the first balancer, from `turn` on, that accepts a connection
    for i in range(turn, turn + len(balancers)):
        host, port = balancers[i % len(balancers)]
        try:
            return socket.create_connection((host, int(port)), timeout=10), i
        except OSError:
            pass
    raise ConnectionError("no balancer accepts connections")

sock, turn = connect(0)
pending, answers, errors, resent, next_id = {}, {}, 0, 0, 1  # pending: id -> request not yet answered
while len(answers) < total:
    try:
        while len(pending) < 16 and next_id <= total:  # keep 16 requests in flight
            pending[next_id] = {"type": "infer", "id": next_id, "inputs": item, "deadline_ms": 10000}
            next_id += 1
            sock.sendall(frame(pending[next_id - 1]))
        (length,) = struct.unpack(">I", read_exactly(sock, 4))
        reply = msgpack.unpackb(read_exactly(sock, length), raw=False)
    except OSError:  # the balancer is gone: send its unanswered requests to the next one
        sock, turn = connect(turn + 1)
        for request in pending.values():
            sock.sendall(frame(request))
        resent += len(pending)
        continue
    answers[reply["id"]] = answers.get(reply["id"], 0) + 1
    errors += reply["type"] == "error"
    pending.pop(reply["id"], None)
    if len(answers) % 500 == 0:
        print(f"answered {len(answers)}", flush=True)
twice = sum(1 for n in answers.values() if n > 1)
print(f"{len(answers)} of {total} answered, {twice} more than once, {errors} errors, {resent} re-sent")
