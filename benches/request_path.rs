//! `cargo bench --bench request_path`: one client's sequential round trips through rip's real
//! front-end (`rip::frontend::serve` + `rip::proxy::Proxy`) to a worker on a Unix socket, all
//! in one process, against the same client talking to the worker directly.
//!
//! The layout mirrors a deployment on one machine: the front-end on a current-thread runtime
//! of its own thread (as `rip serve` builds it by default), the worker on another (as
//! `rip worker` does), and the client on a third. What is left out: the
//! supervisor (the pool is fed its `Change::Ready` by hand) and the process boundary.
//!
//! Groups, each measured per request over one keep-alive connection:
//! - `get`: `GET /` through the proxy; straight to the worker on TCP (the ceiling, the same
//!   hop wrk takes to `benches/direct.rs`); straight to the worker's Unix socket.
//! - `echo_64k`: `POST /echo` with a 64 KiB body, through the proxy and straight on TCP.

#[path = "support/worker_like.rs"]
mod worker_like;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rip::config::Config;
use rip::discovery::{Change, WorkerId};
use rip::frontend::{self, Limits};
use rip::proxy::{self, Proxy};
use rip::telemetry::metrics::Metrics;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use worker_like::WorkerLike;

const ECHO_BYTES: usize = 64 * 1024;
/// Front-end grace at the end of the run; the client has gone by then.
const GRACE: Duration = Duration::from_millis(100);

fn main() {
    let dir = PrivateDir::create();
    let socket = dir.0.join("w0.sock");
    let stop = CancellationToken::new();

    let worker = Server::start({
        let (socket, stop) = (socket.clone(), stop.clone());
        move |addr| serve_worker(socket, stop, addr)
    });
    let frontend = Server::start({
        let (socket, stop) = (socket.clone(), stop.clone());
        move |addr| serve_frontend(socket, stop, addr)
    });

    let client_rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut through_proxy = client_rt.block_on(Client::tcp(frontend.addr));
    let mut direct_tcp = client_rt.block_on(Client::tcp(worker.addr));
    let mut direct_unix = client_rt.block_on(Client::unix(&socket));

    let mut c = Criterion::default().configure_from_args();
    {
        let mut get = c.benchmark_group("get");
        get.throughput(Throughput::Elements(1));
        get.bench_function("proxy", |b| b.iter(|| client_rt.block_on(through_proxy.get("/"))));
        get.bench_function("direct_tcp", |b| b.iter(|| client_rt.block_on(direct_tcp.get("/"))));
        get.bench_function("direct_unix", |b| b.iter(|| client_rt.block_on(direct_unix.get("/"))));
        get.finish();
    }
    {
        let body = Bytes::from(vec![b'x'; ECHO_BYTES]);
        let mut echo = c.benchmark_group("echo_64k");
        echo.throughput(Throughput::Bytes(ECHO_BYTES as u64));
        echo.bench_function("proxy", |b| b.iter(|| client_rt.block_on(through_proxy.echo(body.clone()))));
        echo.bench_function("direct_tcp", |b| b.iter(|| client_rt.block_on(direct_tcp.echo(body.clone()))));
        echo.finish();
    }
    c.final_summary();

    drop((through_proxy, direct_tcp, direct_unix));
    stop.cancel();
    let _ = frontend.thread.join();
    let _ = worker.thread.join();
}

/// A server on a thread and current-thread runtime of its own, as `rip serve` and
/// `rip worker` each run; `addr` is the TCP address it reported once listening.
struct Server {
    addr: SocketAddr,
    thread: std::thread::JoinHandle<()>,
}

impl Server {
    /// Runs `serve` on a new thread; it reports its TCP address through the sender it gets.
    fn start<F, Fut>(serve: F) -> Server
    where
        F: FnOnce(std::sync::mpsc::Sender<SocketAddr>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(serve(addr_tx));
        });
        let addr = addr_rx.recv().expect("the server thread started");
        Server { addr, thread }
    }
}

/// The worker-equivalent, serving the same service on the Unix socket (for the proxy) and on
/// TCP (for the ceiling).
async fn serve_worker(socket: PathBuf, stop: CancellationToken, addr: std::sync::mpsc::Sender<SocketAddr>) {
    let unix = UnixListener::bind(&socket).expect("binding the worker socket");
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("binding the worker's TCP port");
    addr.send(tcp.local_addr().unwrap()).unwrap();
    let service = WorkerLike::demo();
    let connections = worker_like::connections(stop.clone());
    loop {
        tokio::select! {
            Ok((stream, _)) = unix.accept() => service.serve(TokioIo::new(stream), &connections),
            Ok((stream, _)) = tcp.accept() => {
                let _ = stream.set_nodelay(true);
                service.serve(TokioIo::new(stream), &connections);
            }
            () = stop.cancelled() => break,
        }
    }
    connections.drain(GRACE).await;
}

/// The real front-end and proxy with rip's default settings, with the worker announced the
/// way the supervisor announces it.
async fn serve_frontend(socket: PathBuf, stop: CancellationToken, addr: std::sync::mpsc::Sender<SocketAddr>) {
    let config = Config::default();
    let (reports, _unread) = tokio::sync::mpsc::unbounded_channel();
    // Metrics are always on in `rip serve`; the access log is off here as in compare.sh.
    let proxy = Proxy::new(proxy::Settings::from(&config), reports, Arc::new(Metrics::default()), None);
    let (changes_tx, changes_rx) = tokio::sync::mpsc::unbounded_channel();
    changes_tx
        .send(Change::Ready {
            id: WorkerId { slot: 0, generation: 0 },
            socket: socket.into(),
            heartbeat: None,
        })
        .unwrap();
    tokio::spawn({
        let proxy = proxy.clone();
        async move {
            // Keeps the channel open for the whole run, as the supervisor does.
            let _changes_tx = changes_tx;
            proxy.follow(changes_rx).await
        }
    });
    let limits = Limits { header_timeout: config.header_timeout, max_connections: config.max_connections };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding the front-end");
    addr.send(listener.local_addr().unwrap()).unwrap();
    let door = frontend::Door::new(&proxy, None);
    let serving = frontend::Serving { proxy, door, limits, tls: None, stop, grace: GRACE };
    frontend::serve_shards(listener, 1, serving).await;
}

/// Where a [`Client`] connects.
#[derive(Clone)]
enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// One keep-alive HTTP/1.1 connection, used for sequential requests. The front-end closes
/// connections idle for `--header-timeout`, as happens to this one while other benchmarks
/// run, so a closed connection is replaced before the next request.
struct Client {
    target: Target,
    sender: SendRequest<Full<Bytes>>,
}

impl Client {
    async fn tcp(addr: SocketAddr) -> Client {
        Client::start(Target::Tcp(addr)).await
    }

    async fn unix(socket: &Path) -> Client {
        Client::start(Target::Unix(socket.to_owned())).await
    }

    async fn start(target: Target) -> Client {
        let sender = connect(&target).await;
        let mut client = Client { target, sender };
        // Fail before measuring anything if the path is broken.
        assert!(!client.get("/").await.is_empty());
        client
    }

    async fn get(&mut self, path: &str) -> Bytes {
        self.send(Method::GET, path, Bytes::new()).await
    }

    async fn echo(&mut self, body: Bytes) -> Bytes {
        let len = body.len();
        let echoed = self.send(Method::POST, "/echo", body).await;
        assert_eq!(echoed.len(), len);
        echoed
    }

    async fn send(&mut self, method: Method, path: &str, body: Bytes) -> Bytes {
        if self.sender.ready().await.is_err() {
            self.sender = connect(&self.target).await;
            self.sender.ready().await.expect("a new connection is ready");
        }
        let host = match &self.target {
            Target::Tcp(addr) => addr.to_string(),
            Target::Unix(_) => "localhost".to_owned(),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, host)
            .body(Full::new(body))
            .unwrap();
        let response = self.sender.send_request(req).await.expect("request failed");
        assert_eq!(response.status(), StatusCode::OK);
        response.into_body().collect().await.expect("reading the body").to_bytes()
    }
}

async fn connect(target: &Target) -> SendRequest<Full<Bytes>> {
    match target {
        Target::Tcp(addr) => {
            let stream = TcpStream::connect(addr).await.expect("connecting");
            stream.set_nodelay(true).unwrap();
            handshake(TokioIo::new(stream)).await
        }
        Target::Unix(socket) => {
            let stream = UnixStream::connect(socket).await.expect("connecting to the worker socket");
            handshake(TokioIo::new(stream)).await
        }
    }
}

async fn handshake<I>(io: I) -> SendRequest<Full<Bytes>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(io).await.expect("HTTP/1 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// A private temporary directory for the worker's socket, removed at the end.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create() -> PrivateDir {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!("rip-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new().mode(0o700).create(&path).expect("creating the socket directory");
        PrivateDir(path)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
