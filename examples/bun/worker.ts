// The Bun prototype's worker as a rip worker: Bun binds a Unix socket by path, so rip is
// told to let it (`--app-socket path`) and waits for the socket to answer.
//
//   rip serve --workers 2 --app-socket path -- bun examples/bun/worker.ts
//
// rip recycles, restarts and stops it; it only serves.

const socketPath = process.env.RIP_SOCKET;
if (!socketPath) {
  console.error("RIP_SOCKET is not set: start this under `rip serve --app-socket path -- bun worker.ts`");
  process.exit(2);
}
const worker = process.env.RIP_WORKER_ID ?? "-";
const body = `Hello from worker ${worker} (pid ${process.pid})\n`;

const server = Bun.serve({
  unix: socketPath,
  fetch(req: Request): Response {
    if (new URL(req.url).pathname === "/healthz") return new Response("ok\n");
    return new Response(body, { headers: { "content-type": "text/plain; charset=utf-8" } });
  },
});

// rip sends SIGTERM once this worker has no request in flight.
process.on("SIGTERM", () => {
  server.stop(true);
  process.exit(0);
});

console.error(`worker ${worker} (pid ${process.pid}) listening on ${socketPath}`);
