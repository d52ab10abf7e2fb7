"""A standard-library Python app as a rip worker:

    rip serve --workers 2 -- python3 examples/python/app.py

rip starts one of these per worker and hands it its socket, under the systemd
socket-activation protocol: fd 3, with LISTEN_FDS=1 and LISTEN_PID set to this process.
With `--app-socket path` it binds $RIP_SOCKET itself; with `--app-socket port`, it listens
on 127.0.0.1:$PORT. Run alone (`python3 app.py`), it listens on port 8080.
"""

import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

GREETING = "Hello from Python"
WORKER = os.environ.get("RIP_WORKER_ID", "-")
SERVED = 0
SERVED_LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    # Keep-alive, as rip's pooled connections expect.
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        global SERVED
        with SERVED_LOCK:
            SERVED += 1
            served = SERVED
        url = urlsplit(self.path)
        if url.path == "/healthz":
            return self.send(200, b"ok\n")
        if url.path == "/slow":
            ms = min(int(parse_qs(url.query).get("ms", ["500"])[0]), 60_000)
            time.sleep(ms / 1000)
            return self.send(200, f"slept {ms} ms in worker {WORKER}\n".encode())
        if url.path == "/whoami":
            body = json.dumps({"worker": int(WORKER), "pid": os.getpid(), "served": served})
            return self.send(200, body.encode())
        if url.path == "/":
            return self.send(200, f"{GREETING}: worker {WORKER}, pid {os.getpid()}\n".encode())
        self.send(404, b"not found\n")

    def do_POST(self):
        if urlsplit(self.path).path != "/echo":
            return self.send(404, b"not found\n")
        length = int(self.headers.get("content-length", "0"))
        self.send(200, self.rfile.read(length))

    def send(self, status, body):
        self.send_response(status)
        self.send_header("content-type", "text/plain; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        # rip's access log has every request already; a Unix socket has no client address.
        pass


def listening_server():
    if os.environ.get("LISTEN_FDS") == "1" and os.environ.get("LISTEN_PID") == str(os.getpid()):
        server = ThreadingHTTPServer(("", 0), Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = socket.socket(fileno=3)
        return server
    path = os.environ.get("RIP_SOCKET")
    if path and "PORT" not in os.environ:
        server = ThreadingHTTPServer(("", 0), Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.socket.bind(path)
        server.socket.listen(1024)
        return server
    return ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "8080"))), Handler)


def main():
    server = listening_server()
    server.daemon_threads = True
    # rip sends SIGTERM once this worker has no request in flight.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"worker {WORKER} (pid {os.getpid()}) listening", flush=True)
    server.serve_forever()
    server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
