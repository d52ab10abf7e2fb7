// A plain node:http app, no dependencies, as a rip worker:
//
//   rip serve --workers 2 -- node examples/node/server.js
//
// rip starts one of these per worker and hands it its socket, under the systemd
// socket-activation protocol: fd 3, with LISTEN_FDS=1 and LISTEN_PID set to this process.
// With `--app-socket path` it binds $RIP_SOCKET itself; with `--app-socket port`, it
// listens on 127.0.0.1:$PORT. Run alone (`node server.js`), it listens on port 8080.
"use strict";

const http = require("node:http");

const GREETING = "Hello from Node";
const worker = process.env.RIP_WORKER_ID ?? "-";
let served = 0;

const server = http.createServer((req, res) => {
  served += 1;
  const url = new URL(req.url, "http://localhost");
  if (url.pathname === "/healthz") {
    return send(res, 200, "ok\n");
  }
  if (url.pathname === "/slow") {
    // A request that takes a while: what a graceful stop must let finish.
    const ms = Math.min(Number(url.searchParams.get("ms") ?? 500), 60_000);
    return setTimeout(() => send(res, 200, `slept ${ms} ms in worker ${worker}\n`), ms);
  }
  if (url.pathname === "/echo" && req.method === "POST") {
    const chunks = [];
    req.on("data", (chunk) => chunks.push(chunk));
    req.on("end", () => send(res, 200, Buffer.concat(chunks)));
    return;
  }
  if (url.pathname === "/whoami") {
    return send(res, 200, JSON.stringify({ worker: Number(worker), pid: process.pid, served }));
  }
  if (url.pathname === "/") {
    return send(res, 200, `${GREETING}: worker ${worker}, pid ${process.pid}\n`);
  }
  send(res, 404, "not found\n");
});

function send(res, status, body) {
  res.writeHead(status, { "content-type": "text/plain; charset=utf-8", "content-length": Buffer.byteLength(body) });
  res.end(body);
}

// Longer than rip keeps an idle connection to a worker (1 s), so rip always closes first.
server.keepAliveTimeout = 5_000;

if (process.env.LISTEN_FDS === "1" && process.env.LISTEN_PID === String(process.pid)) {
  server.listen({ fd: 3 });
} else if (process.env.RIP_SOCKET && !process.env.PORT) {
  server.listen(process.env.RIP_SOCKET);
} else {
  server.listen(Number(process.env.PORT ?? 8080), "127.0.0.1");
}
server.on("listening", () => console.log(`worker ${worker} (pid ${process.pid}) listening`));

// rip sends SIGTERM once this worker has no request in flight; close what is idle and go.
process.on("SIGTERM", () => {
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
