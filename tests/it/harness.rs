//! Starting rip for a test, and talking HTTP to it.
//!
//! [`Rip`] runs the real binary (`rip serve --port 0 --runtime-dir <private temp dir>`),
//! captures its stderr, learns the address from the `rip started` line, waits for `/healthz`,
//! and on drop kills it (workers die with it) and prints the captured stderr if the test
//! failed. [`Client`] and [`Load`] speak HTTP/1.1 to it on loopback only.
//!
//! Tests are plain `#[test]` functions: processes are driven from the test thread, and the
//! HTTP side runs on a [`runtime`] the test builds, so no blocking wait ever sits on an async
//! worker thread.
//!
//! Every wait here is a loop on a condition with a deadline; none is a bare sleep.

// Helpers for every test module; not each is used by each.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ffi::{OsStr, OsString};
use std::fs::DirBuilder;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Longest wait for rip to log its address and answer `/healthz`: generous because the
/// machine is small and shared with compilers.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a log line or a process state in the common case.
pub const WAIT: Duration = Duration::from_secs(20);
/// Longest a single client request may take before the test fails instead of hanging.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between polls inside a deadline loop.
const POLL: Duration = Duration::from_millis(5);

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The runtime the HTTP side of a test runs on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building the test runtime")
}

// ---------------------------------------------------------------------------------------
// The rip process
// ---------------------------------------------------------------------------------------

/// A private directory (mode 0700) under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "rip-it-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How to run `rip serve`. Get one from [`Rip::builder`].
#[derive(Debug)]
pub struct RipBuilder {
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    current_dir: Option<PathBuf>,
    runtime_dir: Option<PathBuf>,
    program: Option<PathBuf>,
    dir: TempDir,
}

impl RipBuilder {
    /// The test's private directory: the default current dir of rip, and a place for files
    /// such as a rip.toml to write before starting.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<S: AsRef<OsStr>>(mut self, args: &[S]) -> Self {
        self.args.extend(args.iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs.push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs `exe` (a user's binary built on `rip::main_with`) instead of the stock `rip`.
    pub fn program(mut self, exe: impl Into<PathBuf>) -> Self {
        self.program = Some(exe.into());
        self
    }

    /// Where rip runs (it reads ./rip.toml there when present). Default: [`Self::dir`].
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.current_dir = Some(dir.into());
        self
    }

    /// The base given as `--runtime-dir`. Default: `<dir>/run`, created with mode 0700.
    pub fn runtime_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.runtime_dir = Some(dir.into());
        self
    }

    /// Starts rip and returns at once, before it has bound anything; for tests that expect
    /// it to fail, or that wait on their own conditions.
    pub fn spawn(self) -> Rip {
        let has = |flags: &[&str]| {
            self.args.iter().any(|a| {
                let a = a.to_string_lossy();
                flags.iter().any(|f| a == *f || a.starts_with(&format!("{f}=")))
            })
        };
        let runtime_dir = match &self.runtime_dir {
            Some(dir) => dir.clone(),
            None => {
                let dir = self.dir.path().join("run");
                DirBuilder::new()
                    .mode(0o700)
                    .create(&dir)
                    .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
                dir
            }
        };
        let mut args: Vec<OsString> = vec!["serve".into()];
        if !has(&["--port", "-p"]) {
            args.extend(["--port".into(), "0".into()]);
        }
        if !has(&["--runtime-dir"]) {
            args.extend(["--runtime-dir".into(), runtime_dir.clone().into()]);
        }
        args.extend(self.args.iter().cloned());

        let program = self.program.clone().unwrap_or_else(|| env!("CARGO_BIN_EXE_rip").into());
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .current_dir(self.current_dir.as_deref().unwrap_or(self.dir.path()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Only what the test says may configure rip: none of the caller's RIP_* variables.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RIP_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("RUST_LOG", "info");
        for (key, value) in &self.envs {
            cmd.env(key, value);
        }
        let command = format!(
            "{}{} {}",
            self.envs
                .iter()
                .map(|(k, v)| format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()))
                .collect::<String>(),
            program.file_name().unwrap_or_default().to_string_lossy(),
            args.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
        );
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {command}: {e}"));
        let logs = Logs::capture(child.stderr.take().expect("stderr is piped"));
        Rip { child, logs, addr: None, status: None, runtime_dir, command, dir: self.dir }
    }

    /// Starts rip and waits until it logged its address and answers `GET /healthz` with 200
    /// (at least one worker is ready).
    pub fn start(self) -> Rip {
        let mut rip = self.spawn();
        let started = rip
            .wait_for_log(|l| l.contains(" rip started "), START_TIMEOUT)
            .unwrap_or_else(|| panic!("rip did not log `rip started` within {START_TIMEOUT:?}"));
        let addr = log_field(&started, "addr")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no addr in {started:?}"));
        rip.addr = Some(addr);
        rip.wait_healthy(START_TIMEOUT);
        rip
    }
}

/// A running `rip serve`, killed (with its workers) on drop.
#[derive(Debug)]
pub struct Rip {
    child: Child,
    logs: Arc<Logs>,
    addr: Option<SocketAddr>,
    status: Option<ExitStatus>,
    runtime_dir: PathBuf,
    command: String,
    // Dropped after `Drop::drop` killed the process, so rip never sees its directory vanish.
    dir: TempDir,
}

impl Rip {
    /// `rip serve --port 0 <args>` with its own runtime dir, ready to serve.
    pub fn start(args: &[&str]) -> Rip {
        Rip::builder().args(args).start()
    }

    pub fn builder() -> RipBuilder {
        RipBuilder {
            args: Vec::new(),
            envs: Vec::new(),
            current_dir: None,
            runtime_dir: None,
            program: None,
            dir: TempDir::new(),
        }
    }

    /// The front-end's address, as logged at start.
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("the address is known once started with start()")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The test's private directory (see [`RipBuilder::dir`]), removed after rip is killed.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The base passed as `--runtime-dir`; rip keeps `<it>/<pid>/` with the sockets inside.
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    pub fn signal(&self, signal: Signal) {
        send_signal(self.pid(), signal);
    }

    /// Waits for rip to exit, then for its stderr to close so that [`Self::logs`] is whole.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for rip") {
                break status;
            }
            assert!(Instant::now() < deadline, "rip did not exit within {timeout:?}");
            std::thread::sleep(POLL);
        };
        self.status = Some(status);
        self.logs.wait_closed(WAIT);
        status
    }

    /// Every stderr line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lines()
    }

    /// How many lines were logged so far; pass it to [`Self::wait_for_log_from`] to wait for a
    /// line logged after this point.
    pub fn log_mark(&self) -> usize {
        self.logs.len()
    }

    /// The first line (ever logged) matching `pred`, waiting up to `timeout`. `None` on timeout
    /// or when rip closed its stderr without such a line.
    pub fn wait_for_log(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        self.wait_for_log_from(0, pred, timeout)
    }

    /// Like [`Self::wait_for_log`], among the lines logged from index `mark` on.
    pub fn wait_for_log_from(
        &self,
        mark: usize,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        self.logs.wait_for(mark, &pred, timeout)
    }

    /// Waits for the `all workers ready` line.
    pub fn wait_all_ready(&self) {
        self.wait_for_log(|l| l.contains(" all workers ready "), START_TIMEOUT)
            .unwrap_or_else(|| panic!("not all workers ready within {START_TIMEOUT:?}"));
    }

    /// Pids of every worker rip logged as spawned, in order.
    pub fn worker_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for line in self.logs() {
            if let Some(event) = WorkerEvent::parse(&line) {
                if event.event == "worker spawned" && !pids.contains(&event.pid) {
                    pids.push(event.pid);
                }
            }
        }
        pids
    }

    /// Polls `GET /healthz` until it answers 200.
    fn wait_healthy(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("checking on rip") {
                panic!("rip exited with {status} before it was healthy");
            }
            match blocking_get_status(self.addr(), "/healthz") {
                Ok(200) => return,
                Ok(status) => last = format!("status {status}"),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(POLL);
        }
        panic!("GET /healthz not 200 within {timeout:?}; last: {last}");
    }
}

impl Drop for Rip {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            // Let the reader catch up with what rip wrote before it was killed.
            self.logs.wait_closed(Duration::from_secs(2));
            eprintln!("---- stderr of `{}` ----", self.command);
            for line in self.logs() {
                eprintln!("{line}");
            }
            eprintln!("---- end of rip's stderr ----");
        }
    }
}

/// rip's stderr, line by line, filled by a thread of its own.
#[derive(Debug, Default)]
struct Logs {
    state: Mutex<LogState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct LogState {
    lines: Vec<String>,
    closed: bool,
}

impl Logs {
    fn capture(stderr: impl Read + Send + 'static) -> Arc<Logs> {
        let logs = Arc::new(Logs::default());
        let writer = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                writer.lock().lines.push(line);
                writer.changed.notify_all();
            }
            writer.lock().closed = true;
            writer.changed.notify_all();
        });
        logs
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lines(&self) -> Vec<String> {
        self.lock().lines.clone()
    }

    fn len(&self) -> usize {
        self.lock().lines.len()
    }

    fn wait_for(&self, mut from: usize, pred: &dyn Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(line) = state.lines.iter().skip(from).find(|l| pred(l)) {
                return Some(line.clone());
            }
            from = from.max(state.lines.len());
            let now = Instant::now();
            if state.closed || now >= deadline {
                return None;
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn wait_closed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while !state.closed {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// The value of `key=value` in a text log line, without quotes.
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!(" {key}=");
    let start = line.find(&needle)? + needle.len();
    let rest = &line[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        quoted.split('"').next()
    } else {
        rest.split(' ').next()
    }
}

/// A supervisor line about one worker: `worker spawned`, `worker ready`, `worker exited`,
/// `worker exited unexpectedly`, `worker recycled`, ...
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEvent {
    /// The message, e.g. "worker ready".
    pub event: String,
    /// `slot/generation`.
    pub worker: String,
    pub pid: i32,
}

impl WorkerEvent {
    pub fn parse(line: &str) -> Option<WorkerEvent> {
        // "<time>  INFO worker ready worker=1/0 pid=4127 startup_ms=3"
        let after_level = line
            .split_once(" INFO ")
            .or_else(|| line.split_once(" WARN "))
            .or_else(|| line.split_once(" ERROR "))?
            .1;
        let event = after_level.split(" worker=").next()?.trim();
        if !event.starts_with("worker") {
            return None;
        }
        Some(WorkerEvent {
            event: event.to_string(),
            worker: log_field(line, "worker")?.to_string(),
            pid: log_field(line, "pid")?.parse().ok()?,
        })
    }

    /// This line is `event` (exactly), e.g. `is("worker ready")`.
    pub fn is(&self, event: &str) -> bool {
        self.event == event
    }

    /// The slot of `slot/generation`.
    pub fn slot(&self) -> usize {
        self.worker.split('/').next().and_then(|s| s.parse().ok()).expect("worker=<slot>/<generation>")
    }
}

/// One blocking `GET` with `Connection: close`, for the readiness poll.
fn blocking_get_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    // Longer than rip's default queue timeout, which a /healthz may wait out for a worker.
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let head = String::from_utf8_lossy(&response);
    head.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))
}

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

/// Sends `signal` to one process (a worker, say), not to its group.
pub fn send_signal(pid: i32, signal: Signal) {
    kill(Pid::from_raw(pid), signal).unwrap_or_else(|e| panic!("sending {signal} to {pid}: {e}"));
}

/// True while `pid` names a process that has not exited. A zombie (exited, not yet reaped)
/// counts as gone.
pub fn is_running(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": comm may hold spaces and parentheses; the state follows the last ')'.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z') | Some('X') | Some('x'))
}

/// Waits until none of `pids` is running; returns those still running at the deadline.
pub fn wait_gone(pids: &[i32], timeout: Duration) -> Vec<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<i32> = pids.iter().copied().filter(|p| is_running(*p)).collect();
        if alive.is_empty() || Instant::now() >= deadline {
            return alive;
        }
        std::thread::sleep(POLL);
    }
}

/// Waits until `cond` holds; false at the deadline.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// A process's memory, from /proc/<pid>/status, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Peak resident set size (VmHWM).
    pub peak: u64,
    /// Resident set size now (VmRSS).
    pub resident: u64,
}

pub fn memory(pid: i32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let value = line[key.len()..].trim().trim_end_matches("kB").trim();
        value.parse::<u64>().ok().map(|k| k * 1024)
    };
    Some(Memory { peak: kib("VmHWM:")?, resident: kib("VmRSS:")? })
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

/// The body type the client sends.
pub type ReqBody = BoxBody<Bytes, Error>;

pub fn empty() -> ReqBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> ReqBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// A whole response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
}

/// What `GET /whoami` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WhoAmI {
    pub worker: u64,
    pub pid: i32,
    pub served: u64,
}

impl WhoAmI {
    pub fn parse(body: &[u8]) -> Option<WhoAmI> {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        Some(WhoAmI {
            worker: v["worker"].as_u64()?,
            pid: i32::try_from(v["pid"].as_u64()?).ok()?,
            served: v["served"].as_u64()?,
        })
    }
}

/// One HTTP/1.1 keep-alive connection to rip, reopened when the server closed it. Requests
/// without a `Host` get `Host: <addr>`.
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    sender: Option<SendRequest<ReqBody>>,
    pub timeout: Duration,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        assert!(addr.ip().is_loopback(), "tests talk to loopback only");
        Client { addr, sender: None, timeout: REQUEST_TIMEOUT }
    }

    pub async fn get(&mut self, path: &str) -> Result<Reply, Error> {
        self.request(request(Method::GET, path, empty())).await
    }

    pub async fn post(&mut self, path: &str, body: impl Into<Bytes>) -> Result<Reply, Error> {
        let body = body.into();
        let mut req = request(Method::POST, path, full(body.clone()));
        req.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        self.request(req).await
    }

    /// Sends a streamed body (e.g. a [`PatternBody`]); the response comes back as soon as its
    /// headers do, with the body still streaming both ways.
    pub async fn post_stream<B>(&mut self, path: &str, body: B) -> Result<Response<Incoming>, Error>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<Error>,
    {
        let length = body.size_hint().exact();
        let mut req = request(Method::POST, path, body.map_err(Into::into).boxed());
        if let Some(length) = length {
            req.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(length));
        }
        self.send(req).await
    }

    /// Sends a request and reads the whole response.
    pub async fn request(&mut self, req: Request<ReqBody>) -> Result<Reply, Error> {
        let timeout = self.timeout;
        let exchange = async {
            let response = self.send(req).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok(Reply { status: parts.status, headers: parts.headers, body })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no whole response within {timeout:?}"))?
    }

    /// Sends a request and returns once the response headers arrived.
    pub async fn send(&mut self, mut req: Request<ReqBody>) -> Result<Response<Incoming>, Error> {
        if !req.headers().contains_key(HOST) {
            let host = HeaderValue::from_str(&self.addr.to_string()).expect("an address");
            req.headers_mut().insert(HOST, host);
        }
        let timeout = self.timeout;
        let exchange = async {
            let sender = self.ready_sender().await?;
            Ok(sender.send_request(req).await?)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no response headers within {timeout:?}"))?
    }

    async fn ready_sender(&mut self) -> Result<&mut SendRequest<ReqBody>, Error> {
        if let Some(sender) = &mut self.sender {
            if sender.ready().await.is_err() {
                self.sender = None;
            }
        }
        if self.sender.is_none() {
            let stream = tokio::net::TcpStream::connect(self.addr).await?;
            stream.set_nodelay(true)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                // Ends when either side closes; a request on it sees the error.
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("connected above");
        sender.ready().await?;
        Ok(sender)
    }
}

pub fn request(method: Method, path: &str, body: ReqBody) -> Request<ReqBody> {
    Request::builder().method(method).uri(path).body(body).expect("a valid request")
}

/// A deterministic pseudo-random byte stream: byte `i` depends only on the seed and `i`, so a
/// sender and a checker can each produce it without sharing state.
#[derive(Debug, Clone)]
pub struct Pattern {
    seed: u64,
    offset: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern { seed, offset: 0 }
    }

    /// Bytes produced so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Fills `buf` with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() {
            let word = splitmix64(self.seed ^ (self.offset >> 3)).to_le_bytes();
            let skip = (self.offset & 7) as usize;
            let n = (8 - skip).min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&word[skip..skip + n]);
            i += n;
            self.offset += n as u64;
        }
    }

    /// True when `data` is exactly the next `data.len()` bytes.
    pub fn check(&mut self, data: &[u8]) -> bool {
        let mut expected = vec![0; data.len()];
        self.fill(&mut expected);
        expected == data
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A request body of `len` [`Pattern`] bytes, made chunk by chunk as it is sent.
#[derive(Debug)]
pub struct PatternBody {
    pattern: Pattern,
    remaining: u64,
}

/// Size of each chunk a [`PatternBody`] yields.
const PATTERN_CHUNK: u64 = 256 * 1024;

impl PatternBody {
    pub fn new(seed: u64, len: u64) -> PatternBody {
        PatternBody { pattern: Pattern::new(seed), remaining: len }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = this.remaining.min(PATTERN_CHUNK);
        let mut chunk = vec![0; n as usize];
        this.pattern.fill(&mut chunk);
        this.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// A bounded load: `clients` keep-alive connections sending `GET path` until `total` requests
/// were sent, the deadline passed, or [`LoadHandle::stop`] was called.
#[derive(Debug, Clone)]
pub struct Load {
    path: String,
    clients: usize,
    total: usize,
    deadline: Duration,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    tickets: AtomicUsize,
    done: AtomicUsize,
    failed: AtomicUsize,
    stop: AtomicBool,
}

/// Watches and stops a running [`Load`] from another thread.
#[derive(Debug, Clone)]
pub struct LoadHandle(Arc<Counters>);

impl LoadHandle {
    /// Requests answered or failed so far.
    pub fn done(&self) -> usize {
        self.0.done.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> usize {
        self.0.failed.load(Ordering::Relaxed)
    }

    /// Asks every client to stop after its current request.
    pub fn stop(&self) {
        self.0.stop.store(true, Ordering::Relaxed);
    }
}

/// What a [`Load`] saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Requests sent.
    pub sent: usize,
    /// Answered with a 2xx status.
    pub ok: usize,
    /// Answered with another status, or not answered.
    pub failed: usize,
    /// Answers by status code.
    pub statuses: BTreeMap<u16, usize>,
    /// Transport errors, the first few only.
    pub errors: Vec<String>,
    /// The bodies of 2xx answers.
    pub bodies: Vec<Bytes>,
    /// The deadline passed before `total` requests were sent.
    pub timed_out: bool,
}

/// Transport errors kept in a report; the count is in `failed`.
const KEPT_ERRORS: usize = 20;

impl LoadReport {
    /// The workers that answered, from `/whoami` bodies.
    pub fn whoami(&self) -> Vec<WhoAmI> {
        self.bodies.iter().filter_map(|b| WhoAmI::parse(b)).collect()
    }

    /// Distinct worker pids among `/whoami` answers.
    pub fn pids(&self) -> std::collections::BTreeSet<i32> {
        self.whoami().iter().map(|w| w.pid).collect()
    }

    fn merge(&mut self, other: LoadReport) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.failed += other.failed;
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        let room = KEPT_ERRORS.saturating_sub(self.errors.len());
        self.errors.extend(other.errors.into_iter().take(room));
        self.bodies.extend(other.bodies);
        self.timed_out |= other.timed_out;
    }
}

impl Load {
    pub fn get(path: &str) -> Load {
        Load {
            path: path.to_string(),
            clients: 4,
            total: 100,
            deadline: Duration::from_secs(30),
            counters: Arc::default(),
        }
    }

    pub fn clients(mut self, clients: usize) -> Load {
        self.clients = clients;
        self
    }

    pub fn total(mut self, total: usize) -> Load {
        self.total = total;
        self
    }

    pub fn deadline(mut self, deadline: Duration) -> Load {
        self.deadline = deadline;
        self
    }

    pub fn handle(&self) -> LoadHandle {
        LoadHandle(self.counters.clone())
    }

    pub async fn run(self, addr: SocketAddr) -> LoadReport {
        let deadline = tokio::time::Instant::now() + self.deadline;
        let tasks: Vec<_> =
            (0..self.clients).map(|_| tokio::spawn(self.clone().client(addr, deadline))).collect();
        let mut report = LoadReport::default();
        for task in tasks {
            report.merge(task.await.expect("a load client panicked"));
        }
        report
    }

    async fn client(self, addr: SocketAddr, deadline: tokio::time::Instant) -> LoadReport {
        let mut client = Client::new(addr);
        let mut report = LoadReport::default();
        let c = &self.counters;
        while !c.stop.load(Ordering::Relaxed) {
            if c.tickets.fetch_add(1, Ordering::Relaxed) >= self.total {
                break;
            }
            report.sent += 1;
            let result = tokio::time::timeout_at(deadline, client.get(&self.path)).await;
            match result {
                Ok(Ok(reply)) => {
                    *report.statuses.entry(reply.status.as_u16()).or_default() += 1;
                    if reply.status.is_success() {
                        report.ok += 1;
                        report.bodies.push(reply.body);
                    } else {
                        report.failed += 1;
                        c.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Err(e)) => {
                    report.failed += 1;
                    c.failed.fetch_add(1, Ordering::Relaxed);
                    if report.errors.len() < KEPT_ERRORS {
                        report.errors.push(error_chain(&*e));
                    }
                    // The connection may be broken; start the next request on a new one.
                    client = Client::new(addr);
                }
                Err(_) => {
                    report.failed += 1;
                    report.timed_out = true;
                    c.failed.fetch_add(1, Ordering::Relaxed);
                    c.done.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            c.done.fetch_add(1, Ordering::Relaxed);
        }
        report
    }
}

/// An error and its causes on one line.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        line.push_str(": ");
        line.push_str(&e.to_string());
        cause = e.source();
    }
    line
}
