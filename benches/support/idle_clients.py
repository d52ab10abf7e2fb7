#!/usr/bin/env python3
"""Opens N keep-alive connections to 127.0.0.1:PORT, sends one `GET PATH` on each and reads
its whole answer, then prints `ready N` and keeps every connection open and silent until its
standard input closes. For benches/compare.sh's idle-connection case: what an idle
keep-alive client costs the server it holds a connection to. SCHEME https connects with TLS
(the server's certificate is not checked: it is the bench's own, self-signed).

    python3 idle_clients.py PORT N [PATH [SCHEME]]
"""
import asyncio
import resource
import ssl
import sys


async def one(port, path, opened, tls):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer: {head[:80]!r}")
    await reader.readexactly(length)
    opened.append(writer)


async def main():
    port, count = int(sys.argv[1]), int(sys.argv[2])
    path = sys.argv[3] if len(sys.argv) > 3 else "/"
    tls = None
    if len(sys.argv) > 4 and sys.argv[4] == "https":
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        # HTTP/1.1 over TLS, as the plain case: the idle cost of a keep-alive connection.
        tls.set_alpn_protocols(["http/1.1"])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 64)), hard))
    opened = []
    # In waves, so that a listen backlog of 511 is never what is measured.
    for start in range(0, count, 200):
        await asyncio.wait_for(
            asyncio.gather(*(one(port, path, opened, tls) for _ in range(min(200, count - start)))), 60
        )
    print(f"ready {len(opened)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in opened:
        writer.close()


asyncio.run(main())
