// What a Node user would run instead of rip: Node's own `cluster` module, the primary
// accepting connections and handing them to $WORKERS workers in turn, each running the same
// app as examples/node/server.js. Used by benches/compare.sh (setup node-cluster).
//
//   PORT=3000 WORKERS=2 node benches/apps/node-cluster.js
"use strict";

const cluster = require("node:cluster");
const path = require("node:path");

if (cluster.isPrimary) {
  const workers = Number(process.env.WORKERS ?? 2);
  for (let i = 0; i < workers; i++) cluster.fork({ RIP_WORKER_ID: String(i) });
  // A worker that dies is replaced, as a cluster user would write it.
  cluster.on("exit", (worker, code, signal) => {
    if (!process.exitCode) cluster.fork({ RIP_WORKER_ID: worker.process.env?.RIP_WORKER_ID ?? "0" });
  });
  process.on("SIGTERM", () => {
    process.exitCode = 0;
    for (const worker of Object.values(cluster.workers)) worker.process.kill("SIGTERM");
    setTimeout(() => process.exit(0), 2000).unref();
  });
} else {
  // The example listens on 127.0.0.1:$PORT; in a cluster worker that port is the primary's.
  delete process.env.RIP_SOCKET;
  require(path.join(__dirname, "..", "..", "examples", "node", "server.js"));
}
