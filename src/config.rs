//! Flags > `RIP_*` environment > rip.toml > defaults, merged in `resolve` into one validated
//! `Config`. Every value is parsed in one place, so an error names the key and where the bad
//! value came from (`--workers`, `RIP_WORKERS` or the file), whichever layer supplied it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::cli::ServeArgs;

/// The default config file, read when present and no `--config` is given.
pub const DEFAULT_CONFIG_FILE: &str = "rip.toml";

/// Every setting, declared once: its doc (which is also its `--help` line), its type, its
/// default (as a value and as `--help` shows it), its flag's value name, and how its raw
/// text is parsed. From this one list come [`Config`], its `Default`, [`KEYS`], the
/// `rip serve` flags ([`Flags`]), the `RIP_*` variables and the rip.toml keys. Adding a
/// setting is one entry here and one in `rip.toml.example`; the tests below keep the two in
/// step.
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])+
        $key:ident: $ty:ty = $default:expr, shown $shown:literal,
            flag $value_name:literal $(short $short:literal)?, parse $parse:expr;
    )+) => {
        /// The validated configuration of `rip serve`.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Config {
            $( $(#[doc = $doc])+ pub $key: $ty, )+
            /// The file the settings were read from, if any.
            pub file: Option<PathBuf>,
        }

        impl Default for Config {
            fn default() -> Self {
                Config { $( $key: $default, )+ file: None }
            }
        }

        /// Every key a layer may set: the rip.toml name; the flag is `--` plus dashes, the
        /// variable `RIP_` plus upper case.
        pub const KEYS: &[&str] = &[ $( stringify!($key), )+ ];

        fn apply(config: &mut Config, key: &str, raw: &str) -> Result<()> {
            match key {
                $( stringify!($key) => config.$key = ($parse)(raw)?, )+
                _ => unreachable!("key {key} is not declared"),
            }
            Ok(())
        }

        /// The flags of `rip serve` that rip.toml and `RIP_*` can also set. Each is the raw
        /// text, unset unless given, so that the merge can tell "not given" from "given the
        /// default" and can name the flag when the value is bad.
        #[derive(Debug, Default, Clone, clap::Args)]
        pub struct Flags {
            $(
                $(#[doc = $doc])+
                // clap reads only literal doc lines, so the default goes in through `help`.
                #[arg(
                    long,
                    value_name = $value_name
                    $(, short = $short)?,
                    help = concat!($($doc),+, " [default: ", $shown, "]").trim_ascii_start()
                )]
                pub $key: Option<String>,
            )+
        }

        impl Flags {
            fn layer(&self) -> Layer {
                let mut layer = Layer::new();
                $( if let Some(v) = &self.$key { layer.insert(stringify!($key), v.clone()); } )+
                layer
            }
        }

        /// Key `key` of `config` as rip.toml would set it.
        pub fn raw_value(config: &Config, key: &str) -> String {
            match key {
                $( stringify!($key) => Raw::raw(&config.$key), )+
                _ => String::new(),
            }
        }

        /// Each key's default as `--help` shows it.
        fn shown_default(key: &str) -> &'static str {
            match key {
                $( stringify!($key) => $shown, )+
                _ => "",
            }
        }
    };
}

settings! {
    /// Address to listen on
    host: IpAddr = IpAddr::from([127, 0, 0, 1]), shown "127.0.0.1",
        flag "ADDR", parse parse_host;
    /// Port to listen on; 0 picks a free one
    port: u16 = 3000, shown "3000",
        flag "PORT" short 'p', parse |raw: &str| raw.parse().map_err(|_| anyhow!("expected a port number"));
    /// Number of worker processes
    workers: usize = std::thread::available_parallelism().map_or(1, |n| n.get()), shown "CPU count",
        flag "N" short 'w', parse parse_count;
    /// Recycle a worker after it was sent N requests; 0 = never
    max_requests: u64 = 0, shown "0",
        flag "N", parse parse_number;
    /// Add up to J requests to each worker's --max-requests, at random, so that workers
    /// started together do not recycle together
    max_requests_jitter: u64 = 0, shown "0",
        flag "J", parse parse_number;
    /// Recycle a worker whose resident memory exceeds SIZE, e.g. 512m; 0 = never
    max_memory: u64 = 0, shown "0",
        flag "SIZE", parse parse_size;
    /// Recycle a worker older than DURATION, e.g. 6h; 0 = never
    max_age: Duration = Duration::ZERO, shown "0",
        flag "DURATION", parse parse_duration;
    /// Workers replaced at once by recycles and reloads
    max_surge: usize = 1, shown "1",
        flag "N", parse parse_count;
    /// How a worker that replaces another starts: fork (from a fork server started with the
    /// first replacement, which has paid the exec's costs once) or exec (each executes the
    /// binary afresh, with a memory layout of its own)
    spawn: Spawn = Spawn::Fork, shown "fork",
        flag "HOW", parse str::parse;
    /// How requests are spread over workers: least-pending or round-robin
    balance: Strategy = Strategy::LeastPending, shown "least-pending",
        flag "STRATEGY", parse str::parse;
    /// How requests reach workers: http2 (one multiplexed connection each), http1, or
    /// handoff (client connections passed whole to workers: faster, no per-request failover);
    /// http1 with --command unless given
    upstream: Upstream = Upstream::Http2, shown "http2",
        flag "PROTOCOL", parse str::parse;
    /// Time in-flight requests get to finish at shutdown, e.g. 30s
    graceful_timeout: Duration = Duration::from_secs(30), shown "30s",
        flag "DURATION", parse parse_duration;
    /// A worker whose event loop has been silent this long (its heartbeat stopped: a handler
    /// blocking its thread) is killed and replaced; it left the rotation after 100 ms. A
    /// command's worker, which has no heartbeat, is killed when a probe gets no answer this long
    timeout: Duration = Duration::from_secs(30), shown "30s",
        flag "DURATION", parse parse_positive_duration;
    /// Longest a request may wait for its response headers once its worker has the whole
    /// request; past it, that request gets 504 and is cancelled on its worker, which lives on
    /// (nginx's proxy_read_timeout, and its default); 0 = off
    request_timeout: Duration = Duration::from_secs(60), shown "60s",
        flag "DURATION", parse parse_duration;
    /// Longest wait for a ready worker before 503
    queue_timeout: Duration = Duration::from_secs(5), shown "5s",
        flag "DURATION", parse parse_duration;
    /// Time a client gets to send request headers, and longest idle keep-alive
    header_timeout: Duration = Duration::from_secs(15), shown "15s",
        flag "DURATION", parse parse_positive_duration;
    /// Longest a worker may take to answer its first health probe
    start_timeout: Duration = Duration::from_secs(30), shown "30s",
        flag "DURATION", parse parse_positive_duration;
    /// Largest request body accepted, e.g. 10m; 0 = unlimited
    max_body: u64 = 0, shown "0",
        flag "SIZE", parse parse_size;
    /// Most client connections open at once
    max_connections: usize = 10_000, shown "10000",
        flag "N", parse parse_count;
    /// Requests in flight per worker before new ones wait (up to --queue-timeout); 0 = no limit
    max_in_flight: usize = 0, shown "0",
        flag "N", parse |raw: &str| raw.parse().map_err(|_| anyhow!("expected a whole number"));
    /// Serve static files from DIR: the front-end answers what names a file, workers the rest
    root: Option<PathBuf> = None, shown "none",
        flag "DIR", parse |raw: &str| Ok::<_, anyhow::Error>(Some(PathBuf::from(raw)));
    /// Cache-Control sent with each static file, e.g. "public, max-age=3600"; none = no header
    cache_control: Option<String> = None, shown "none",
        flag "VALUE", parse parse_cache_control;
    /// Run each worker as this command instead of rip's own app, e.g. "node server.js" (or
    /// `rip serve -- node server.js`); it gets its socket as --app-socket says
    command: Vec<String> = Vec::new(), shown "none",
        flag "CMD", parse parse_command;
    /// How a command's worker gets its socket: fd (rip listens and passes it as fd 3, with
    /// LISTEN_FDS as systemd does), path (the app binds $RIP_SOCKET itself) or port (the app
    /// listens on 127.0.0.1:$PORT)
    app_socket: AppSocket = AppSocket::Fd, shown "fd",
        flag "HOW", parse str::parse;
    /// Path the readiness and liveness probes ask for; any answer below 500 counts as ready
    health_path: String = "/healthz".to_string(), shown "/healthz",
        flag "PATH", parse parse_health_path;
    /// Signal that tells a command's worker to finish and exit, e.g. SIGQUIT; SIGKILL follows
    /// after --graceful-timeout
    stop_signal: StopSignal = StopSignal(nix::sys::signal::Signal::SIGTERM), shown "SIGTERM",
        flag "SIGNAL", parse str::parse;
    /// PEM certificate chain for HTTPS on the listener; several, comma-separated, are chosen by
    /// the name the client asks for (SNI), the first by default; re-read on reload
    tls_cert: Vec<PathBuf> = Vec::new(), shown "none",
        flag "FILES", parse parse_paths;
    /// PEM private key of each --tls-cert, in the same order
    tls_key: Vec<PathBuf> = Vec::new(), shown "none",
        flag "FILES", parse parse_paths;
    /// With TLS: also listen on ADDR for plain HTTP and answer every request with a redirect
    /// to https on --port, e.g. 0.0.0.0:80
    http_redirect: Option<std::net::SocketAddr> = None, shown "off",
        flag "ADDR", parse parse_admin;
    /// Threads per worker process
    worker_threads: usize = 1, shown "1",
        flag "N", parse parse_count;
    /// Threads of the front-end process
    frontend_threads: usize = 1, shown "1",
        flag "N", parse parse_count;
    /// Front-end shards: threads that each accept clients and keep their own worker connections
    shards: usize = std::thread::available_parallelism().map_or(1, |n| n.get()), shown "CPU count",
        flag "N", parse parse_count;
    /// Directory for the workers' sockets
    runtime_dir: Option<PathBuf> = None, shown "$XDG_RUNTIME_DIR/rip or /tmp/rip-$UID",
        flag "DIR", parse |raw: &str| Ok::<_, anyhow::Error>(Some(PathBuf::from(raw)));
    /// Log format: text or json
    log_format: LogFormat = LogFormat::Text, shown "text",
        flag "FORMAT", parse str::parse;
    /// Access log: - (stderr), off, or a file reopened on SIGUSR1
    access_log: AccessLogTarget = AccessLogTarget::Stderr, shown "-",
        flag "TARGET", parse str::parse;
    /// Serve /metrics, /live and /ready on this address, e.g. 127.0.0.1:9090
    admin: Option<std::net::SocketAddr> = None, shown "off",
        flag "ADDR", parse parse_admin;
    /// Proxies in front of rip whose forwarding headers are believed, comma-separated
    /// addresses or CIDRs, e.g. 10.0.0.0/8,::1; from any other peer they are removed
    trusted_proxies: Vec<Cidr> = Vec::new(), shown "none",
        flag "CIDRS", parse parse_cidrs;
}

/// A value as rip.toml would set it, so that `rip config` prints a file rip can read back.
trait Raw {
    fn raw(&self) -> String;
}

macro_rules! raw_by_display {
    ($($ty:ty),+) => { $( impl Raw for $ty { fn raw(&self) -> String { self.to_string() } } )+ };
}
raw_by_display!(IpAddr, u16, usize, u64, std::net::SocketAddr, Cidr);

impl Raw for Duration {
    fn raw(&self) -> String {
        let ms = self.as_millis();
        if ms % 1000 == 0 {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        }
    }
}

macro_rules! raw_by_name {
    ($($ty:ty),+) => { $( impl Raw for $ty { fn raw(&self) -> String { self.as_str().to_string() } } )+ };
}
raw_by_name!(Strategy, Upstream, LogFormat, AppSocket, StopSignal, Spawn);

impl Raw for String {
    fn raw(&self) -> String {
        self.clone()
    }
}

impl Raw for Vec<PathBuf> {
    fn raw(&self) -> String {
        if self.is_empty() {
            return "none".into();
        }
        self.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(",")
    }
}

impl Raw for Vec<String> {
    fn raw(&self) -> String {
        quote_words(self)
    }
}

impl Raw for AccessLogTarget {
    fn raw(&self) -> String {
        match self {
            AccessLogTarget::Off => "off".into(),
            AccessLogTarget::Stderr => "-".into(),
            AccessLogTarget::File(path) => path.display().to_string(),
        }
    }
}

impl Raw for Option<PathBuf> {
    fn raw(&self) -> String {
        self.as_ref().map_or_else(String::new, |p| p.display().to_string())
    }
}

impl Raw for Option<String> {
    fn raw(&self) -> String {
        self.clone().unwrap_or_default()
    }
}

impl Raw for Option<std::net::SocketAddr> {
    fn raw(&self) -> String {
        self.map_or_else(|| "off".into(), |a| a.to_string())
    }
}

impl Raw for Vec<Cidr> {
    fn raw(&self) -> String {
        if self.is_empty() {
            return "none".into();
        }
        self.iter().map(Raw::raw).collect::<Vec<_>>().join(",")
    }
}

/// The effective configuration as a rip.toml, each key with where its value came from.
pub fn render(config: &Config, sources: &[Source]) -> String {
    let mut out = String::from(
        "# The configuration rip serve would run with; each line says where its value came from.\n",
    );
    if let Some(file) = &config.file {
        out.push_str(&format!("# file: {}\n", file.display()));
    }
    for source in sources {
        let value = raw_value(config, source.key).replace('\\', "\\\\").replace('"', "\\\"");
        let line = if value.is_empty() {
            format!("# {} is not set", source.key)
        } else {
            format!("{} = \"{value}\"", source.key)
        };
        out.push_str(&format!("{line:<40} # {}\n", source.origin.describe(source.key)));
    }
    out
}

/// How requests are spread over workers (see `proxy::strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Each request to the next worker in turn.
    RoundRobin,
    /// The worker with the fewest requests in flight; ties go round-robin. A stuck worker
    /// piles up in-flight requests and so stops receiving new ones.
    LeastPending,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastPending => "least-pending",
        }
    }
}

impl std::str::FromStr for Strategy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "round-robin" => Ok(Strategy::RoundRobin),
            "least-pending" => Ok(Strategy::LeastPending),
            _ => bail!("expected least-pending or round-robin"),
        }
    }
}

/// How the front-end talks to workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// One pooled connection per request in flight.
    Http1,
    /// One connection per worker carrying every request in flight without a body: one write
    /// and one wake-up can carry several requests, where HTTP/1 needs a system call pair for
    /// each. Requests with a body, and upgrades, still get an HTTP/1 connection of their own:
    /// on a shared connection, flow control ties streams together, and a client that
    /// abandons an upload while its response streams back was seen to stall the whole
    /// connection.
    Http2,
    /// No proxying: each client connection is passed to a worker whole (see
    /// `crate::handoff`), which serves it directly. Faster, at the price of every per-request
    /// guarantee the front-end gives: retries, a 504 per request, queueing, the access log.
    Handoff,
}

impl Upstream {
    pub fn as_str(self) -> &'static str {
        match self {
            Upstream::Http1 => "http1",
            Upstream::Http2 => "http2",
            Upstream::Handoff => "handoff",
        }
    }
}

impl std::str::FromStr for Upstream {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "http1" => Ok(Upstream::Http1),
            "http2" => Ok(Upstream::Http2),
            "handoff" => Ok(Upstream::Handoff),
            _ => anyhow::bail!("expected http2, http1 or handoff"),
        }
    }
}

/// How a worker that replaces another is started (a command's workers are always executed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spawn {
    /// Forked from `rip forkserver` (see `crate::forkserver`).
    Fork,
    /// `rip worker` executed afresh.
    Exec,
}

impl Spawn {
    pub fn as_str(self) -> &'static str {
        match self {
            Spawn::Fork => "fork",
            Spawn::Exec => "exec",
        }
    }
}

impl std::str::FromStr for Spawn {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "fork" => Ok(Spawn::Fork),
            "exec" => Ok(Spawn::Exec),
            _ => bail!("expected fork or exec"),
        }
    }
}

/// How a command's worker (`--command`) gets the socket the front-end reaches it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppSocket {
    /// rip binds and listens on the worker's Unix socket and passes it as fd 3, under the
    /// systemd socket-activation protocol (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`).
    Fd,
    /// The app binds the Unix socket at `$RIP_SOCKET` itself; rip waits for it.
    Path,
    /// The app listens on `127.0.0.1:$PORT`, a free port rip picks for each worker.
    Port,
}

impl AppSocket {
    pub fn as_str(self) -> &'static str {
        match self {
            AppSocket::Fd => "fd",
            AppSocket::Path => "path",
            AppSocket::Port => "port",
        }
    }
}

impl std::str::FromStr for AppSocket {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "fd" => Ok(AppSocket::Fd),
            "path" => Ok(AppSocket::Path),
            "port" => Ok(AppSocket::Port),
            _ => bail!("expected fd, path or port"),
        }
    }
}

/// The signal that asks a command's worker to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopSignal(pub nix::sys::signal::Signal);

impl StopSignal {
    pub fn as_str(self) -> &'static str {
        self.0.as_str()
    }
}

impl std::str::FromStr for StopSignal {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        use nix::sys::signal::Signal::*;
        let upper = s.trim().to_ascii_uppercase();
        let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
        match name.parse() {
            // A stop that cannot be caught or that only pauses the process asks nothing.
            Ok(SIGKILL | SIGSTOP) => bail!("expected a signal the app can catch, such as SIGTERM or SIGQUIT"),
            Ok(signal @ (SIGTERM | SIGINT | SIGQUIT | SIGHUP | SIGUSR1 | SIGUSR2 | SIGWINCH)) => {
                Ok(StopSignal(signal))
            }
            _ => bail!("expected SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2 or SIGWINCH"),
        }
    }
}

/// Splits a command line into words as a POSIX shell would, without expanding anything:
/// blanks separate words, single quotes keep everything, double quotes keep all but `\"`,
/// `\\`, and a backslash outside quotes keeps the next character.
pub fn split_words(raw: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => words.extend(word.take()),
            '\'' => {
                let current = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => current.push(c),
                        None => bail!("unmatched single quote"),
                    }
                }
            }
            '"' => {
                let current = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => current.push(c),
                            Some(c) => {
                                current.push('\\');
                                current.push(c);
                            }
                            None => bail!("unmatched double quote"),
                        },
                        Some(c) => current.push(c),
                        None => bail!("unmatched double quote"),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => bail!("a backslash ends the command"),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

/// Joins words into a command line that [`split_words`] splits back into the same words.
pub fn quote_words(words: &[String]) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c);
    words
        .iter()
        .map(|w| {
            if !w.is_empty() && w.chars().all(safe) {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_command(raw: &str) -> Result<Vec<String>> {
    if raw.trim() == "none" {
        return Ok(Vec::new());
    }
    split_words(raw)
}

/// A comma-separated list of paths; empty or `none` is none.
fn parse_paths(raw: &str) -> Result<Vec<PathBuf>> {
    if raw.trim().is_empty() || raw.trim() == "none" {
        return Ok(Vec::new());
    }
    Ok(raw.split(',').map(|p| PathBuf::from(p.trim())).collect())
}

fn parse_health_path(raw: &str) -> Result<String> {
    let ok = raw.starts_with('/') && raw.parse::<http::uri::PathAndQuery>().is_ok() && !raw.contains(' ');
    if !ok {
        bail!("expected a path such as /healthz");
    }
    Ok(raw.to_string())
}

/// An address block, `10.0.0.0/8` or `::1/128`; a bare address is a block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // A dual-stack listener sees IPv4 clients as mapped IPv6 addresses.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u32::from(net).into(), u32::from(ip).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => masked(u128::from(net), u128::from(ip), self.prefix, 128),
            _ => false,
        }
    }
}

fn masked(net: u128, ip: u128, prefix: u8, bits: u8) -> bool {
    let host_bits = u32::from(bits - prefix);
    let mask = if host_bits >= 128 { 0 } else { !0u128 << host_bits };
    (net & mask) == (ip & mask)
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Cidr {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr =
            addr.trim().parse().map_err(|_| anyhow!("expected an address or CIDR such as 10.0.0.0/8"))?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= bits => p,
                _ => bail!("expected a prefix length from 0 to {bits} in '{s}'"),
            },
        };
        Ok(Cidr { addr, prefix })
    }
}

/// A comma-separated list of [`Cidr`]s; empty or `none` is none.
pub fn parse_cidrs(raw: &str) -> Result<Vec<Cidr>> {
    if raw.trim().is_empty() || raw.trim() == "none" {
        return Ok(Vec::new());
    }
    raw.split(',').map(|part| part.trim().parse()).collect()
}

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Off,
    Stderr,
    File(PathBuf),
}

impl std::str::FromStr for AccessLogTarget {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "off" | "false" | "" => AccessLogTarget::Off,
            "-" | "stderr" | "on" | "true" => AccessLogTarget::Stderr,
            path => AccessLogTarget::File(PathBuf::from(path)),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl std::str::FromStr for LogFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => bail!("expected text or json"),
        }
    }
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    Default,
    Flag,
    Env,
    /// A line of the config file.
    File(PathBuf, usize),
}

impl Origin {
    /// How an operator finds the value: `--max-requests`, `RIP_MAX_REQUESTS`, `rip.toml:3`.
    pub fn describe(&self, key: &str) -> String {
        match self {
            Origin::Default => "default".to_string(),
            Origin::Flag => format!("--{}", key.replace('_', "-")),
            Origin::Env => format!("RIP_{}", key.to_uppercase()),
            Origin::File(path, line) => format!("{}:{line}", path.display()),
        }
    }
}

/// One key of the effective configuration: its raw value and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub key: &'static str,
    /// As given (or, for a default, as `--help` shows it).
    pub value: String,
    pub origin: Origin,
}

/// One layer's raw values, by key.
type Layer = HashMap<&'static str, String>;
/// The file's raw values, by key, with the line each is on.
type FileLayer = HashMap<&'static str, (String, usize)>;

/// Builds the config for `rip serve` from its flags, the process environment and the file.
pub fn load(args: &ServeArgs) -> Result<Config> {
    resolve(args, |name| std::env::var(name).ok())
}

/// The merge, with the environment passed in so that tests can fake it.
pub fn resolve(args: &ServeArgs, env: impl Fn(&str) -> Option<String>) -> Result<Config> {
    resolve_sourced(args, env).map(|(config, _)| config)
}

/// The merge, and where each key's value came from (for `rip config`). Every value of every
/// layer is checked, the ones a higher layer overrides included: a file that would stop rip
/// once someone removes a flag stops it now.
pub fn resolve_sourced(
    args: &ServeArgs,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(Config, Vec<Source>)> {
    let mut flags = args.settings.layer();
    if !args.argv.is_empty() {
        if flags.contains_key("command") {
            bail!("the command is given twice: after -- and with --command; give it once");
        }
        flags.insert("command", quote_words(&args.argv));
    }
    let env_layer = env_layer(&env);
    let file = match file_to_read(args, &env) {
        Some(path) => Some((file_layer(&path)?, path)),
        None => None,
    };
    let mut given: Vec<(&'static str, &String, Origin)> = Vec::new();
    for key in KEYS {
        if let Some(v) = flags.get(key) {
            given.push((key, v, Origin::Flag));
        }
        if let Some(v) = env_layer.get(key) {
            given.push((key, v, Origin::Env));
        }
        if let Some((layer, path)) = &file {
            if let Some((v, line)) = layer.get(key) {
                given.push((key, v, Origin::File(path.clone(), *line)));
            }
        }
    }
    for (key, raw, origin) in &given {
        apply(&mut Config::default(), key, raw).with_context(|| describe(key, raw, origin))?;
    }

    let mut config = Config::default();
    let mut sources = Vec::new();
    for key in KEYS {
        // `given` lists each key's layers highest first.
        match given.iter().find(|(k, _, _)| k == key) {
            Some((_, raw, origin)) => {
                apply(&mut config, key, raw)?;
                sources.push(Source { key, value: (*raw).clone(), origin: origin.clone() });
            }
            None => {
                sources.push(Source { key, value: shown_default(key).to_string(), origin: Origin::Default })
            }
        }
    }
    config.file = file.map(|(_, path)| path);
    if !config.command.is_empty() {
        for_command(&mut config, &mut sources);
    }
    validate(&config)?;
    Ok((config, sources))
}

fn describe(key: &str, raw: &str, origin: &Origin) -> String {
    match origin {
        Origin::File(path, line) => format!("invalid value '{raw}' for {key} at {}:{line}", path.display()),
        origin => format!("invalid value '{raw}' for {}", origin.describe(key)),
    }
}

/// The defaults that differ for a command's workers: an app that is not rip speaks HTTP/1.1
/// on its socket unless told it speaks HTTP/2.
fn for_command(config: &mut Config, sources: &mut [Source]) {
    if let Some(source) = sources.iter_mut().find(|s| s.key == "upstream" && s.origin == Origin::Default) {
        config.upstream = Upstream::Http1;
        source.value = Upstream::Http1.as_str().to_string();
    }
}

impl Config {
    /// The certificate and key files for HTTPS, pair by pair; empty for plain HTTP.
    pub fn tls_pairs(&self) -> Vec<crate::frontend::tls::Pair> {
        self.tls_cert
            .iter()
            .zip(&self.tls_key)
            .map(|(cert, key)| crate::frontend::tls::Pair { cert: cert.clone(), key: key.clone() })
            .collect()
    }
}

fn validate(config: &Config) -> Result<()> {
    if config.tls_cert.len() != config.tls_key.len() {
        bail!(
            "tls_cert names {} file(s) and tls_key {}: give one key for each certificate, in the same order",
            config.tls_cert.len(),
            config.tls_key.len()
        );
    }
    if config.http_redirect.is_some() && config.tls_cert.is_empty() {
        bail!("http_redirect sends clients to https, which needs tls_cert and tls_key");
    }
    if !config.tls_cert.is_empty() && config.upstream == Upstream::Handoff {
        bail!("TLS is ended by the front-end: it cannot be used with upstream handoff");
    }
    if !config.command.is_empty() && config.upstream == Upstream::Handoff {
        bail!("upstream handoff needs rip's own workers: it cannot be used with a command");
    }
    if config.workers > crate::telemetry::metrics::MAX_SLOTS {
        bail!(
            "invalid value '{}' for workers: at most {}",
            config.workers,
            crate::telemetry::metrics::MAX_SLOTS
        );
    }
    Ok(())
}

fn env_layer(env: &impl Fn(&str) -> Option<String>) -> Layer {
    KEYS.iter().filter_map(|key| env(&format!("RIP_{}", key.to_uppercase())).map(|v| (*key, v))).collect()
}

/// `--config`, else `RIP_CONFIG`, else ./rip.toml if it exists. A named file must exist.
fn file_to_read(args: &ServeArgs, env: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(path) = &args.config {
        return Some(path.clone());
    }
    if let Some(path) = env("RIP_CONFIG") {
        return Some(PathBuf::from(path));
    }
    let default = Path::new(DEFAULT_CONFIG_FILE);
    default.exists().then(|| default.to_path_buf())
}

fn file_layer(path: &Path) -> Result<FileLayer> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    parse_file(&text).map_err(|e| anyhow!("{}:{e:#}", path.display()))
}

/// The file's keys with their raw values and lines. Errors start with `line[:column]: `, for
/// the caller to put the file name in front.
fn parse_file(text: &str) -> Result<FileLayer> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let message = e.message().lines().next().unwrap_or("invalid TOML").to_string();
        match e.span() {
            Some(span) => {
                let (line, column) = line_and_column(text, span.start);
                anyhow!("{line}:{column}: {message}")
            }
            None => anyhow!("{message}"),
        }
    })?;
    let mut layer = FileLayer::new();
    for (name, value) in table {
        let line = key_line(text, &name);
        let Some(key) = KEYS.iter().find(|k| **k == name) else {
            bail!("{line}: unknown key '{name}'");
        };
        let raw = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) if name == "command" => {
                let words: Option<Vec<String>> =
                    items.iter().map(|item| item.as_str().map(str::to_string)).collect();
                match words {
                    Some(words) => quote_words(&words),
                    None => bail!("{line}: invalid value for command: expected an array of strings"),
                }
            }
            other => {
                bail!(
                    "{line}: invalid value for {name}: expected a string or a number, got {}",
                    other.type_str()
                )
            }
        };
        layer.insert(*key, (raw, line));
    }
    Ok(layer)
}

/// 1-based line and column of byte `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The line that sets top-level `key` (bare or quoted), 0 if none is found.
fn key_line(text: &str, key: &str) -> usize {
    text.lines()
        .position(|line| {
            let line = line.trim_start();
            let rest = line
                .strip_prefix(key)
                .or_else(|| line.strip_prefix(&format!("\"{key}\"")))
                .or_else(|| line.strip_prefix(&format!("'{key}'")));
            rest.is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map_or(0, |i| i + 1)
}

fn parse_host(raw: &str) -> Result<IpAddr> {
    if raw == "localhost" {
        return Ok(IpAddr::from([127, 0, 0, 1]));
    }
    raw.trim_start_matches('[').trim_end_matches(']').parse().map_err(|_| anyhow!("expected an IP address"))
}

fn parse_cache_control(raw: &str) -> Result<Option<String>> {
    match raw.trim() {
        "" | "none" => Ok(None),
        value => {
            http::HeaderValue::from_str(value)
                .map_err(|_| anyhow!("expected a header value such as \"public, max-age=3600\""))?;
            Ok(Some(value.to_string()))
        }
    }
}

fn parse_number(raw: &str) -> Result<u64> {
    raw.parse().map_err(|_| anyhow!("expected a whole number"))
}

fn parse_admin(raw: &str) -> Result<Option<std::net::SocketAddr>> {
    match raw {
        "" | "off" => Ok(None),
        addr => Ok(Some(addr.parse().map_err(|_| anyhow!("expected an address such as 127.0.0.1:9090"))?)),
    }
}

fn parse_count(raw: &str) -> Result<usize> {
    match raw.parse::<usize>() {
        Ok(0) => bail!("must be at least 1"),
        Ok(n) => Ok(n),
        Err(_) => bail!("expected a whole number"),
    }
}

/// Parses `30s`, `500ms`, `2m`, `1h`, or a bare number of seconds (`1.5`).
pub fn parse_duration(raw: &str) -> Result<Duration> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let value: f64 = number.parse().map_err(|_| anyhow!("expected a duration such as 30s or 500ms"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => bail!("expected a duration such as 30s or 500ms"),
    };
    if !seconds.is_finite() || seconds > 365.0 * 86_400.0 {
        bail!("duration out of range");
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_positive_duration(raw: &str) -> Result<Duration> {
    let d = parse_duration(raw)?;
    if d.is_zero() {
        bail!("must be longer than zero");
    }
    Ok(d)
}

/// Parses `1048576`, `512k`, `10m`, `1g` (binary multiples, optional trailing `b`/`ib`).
pub fn parse_size(raw: &str) -> Result<u64> {
    let lower = raw.trim().to_ascii_lowercase();
    let unitless = lower.trim_end_matches("ib").trim_end_matches('b');
    let split = unitless.find(|c: char| !c.is_ascii_digit()).unwrap_or(unitless.len());
    let (number, unit) = unitless.split_at(split);
    let value: u64 = number.parse().map_err(|_| anyhow!("expected a size such as 10m or 512k"))?;
    let multiplier: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => bail!("expected a size such as 10m or 512k"),
    };
    value.checked_mul(multiplier).ok_or_else(|| anyhow!("size out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn with_file(text: &str) -> (tempdir::Dir, ServeArgs) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("rip.toml");
        std::fs::write(&path, text).unwrap();
        let args = ServeArgs { config: Some(path), ..Default::default() };
        (dir, args)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static N: AtomicUsize = AtomicUsize::new(0);
                let p = std::env::temp_dir().join(format!(
                    "rip-config-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn layers_take_precedence_flag_env_file_default() {
        // (flag, env, file, expected workers)
        type Row = (Option<usize>, Option<&'static str>, Option<&'static str>, usize);
        let table: &[Row] = &[
            (Some(2), Some("3"), Some("4"), 2),
            (None, Some("3"), Some("4"), 3),
            (None, None, Some("4"), 4),
            (None, None, None, Config::default().workers),
        ];
        for (flag, env, file, expected) in table {
            let (_dir, mut args) = with_file(&file.map(|f| format!("workers = {f}")).unwrap_or_default());
            args.settings.workers = flag.map(|n| n.to_string());
            let env_value = env.map(str::to_string);
            let config =
                resolve(&args, |k| (k == "RIP_WORKERS").then(|| env_value.clone()).flatten()).unwrap();
            assert_eq!(config.workers, *expected, "flag={flag:?} env={env:?} file={file:?}");
        }
    }

    fn is_setting(line: &str) -> bool {
        line.split_once(" = ").is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
    }

    #[test]
    fn file_sets_every_documented_key() {
        let example = include_str!("../rip.toml.example");
        let uncommented: String = example
            .lines()
            .map(|l| l.strip_prefix("# ").filter(|l| l.contains(" = ")).unwrap_or(l))
            .map(|l| format!("{l}\n"))
            .collect();
        let layer = parse_file(&uncommented).unwrap();
        let mut missing: Vec<_> = KEYS.iter().filter(|k| !layer.contains_key(*k)).collect();
        missing.sort();
        assert!(missing.is_empty(), "rip.toml.example lacks {missing:?}");
    }

    #[test]
    fn example_defaults_match_default_impl() {
        let example = include_str!("../rip.toml.example");
        let uncommented: String = example
            .lines()
            .filter(|l| l.strip_prefix("# ").is_some_and(is_setting))
            .filter(|l| !l.starts_with("# workers") && !l.contains("root") && !l.contains("runtime_dir"))
            // Examples of a command and of certificates, not the defaults (none).
            .filter(|l| !l.starts_with("# command") && !l.starts_with("# tls_"))
            .filter(|l| !l.starts_with("# admin"))
            .map(|l| format!("{}\n", &l[2..]))
            .collect();
        let (_dir, args) = with_file(&uncommented);
        let mut config = resolve(&args, no_env).unwrap();
        config.file = None;
        assert_eq!(config, Config::default());
    }

    #[test]
    fn command_lines_split_as_a_shell_splits_words_and_join_back() {
        let table: &[(&str, &[&str])] = &[
            ("node server.js", &["node", "server.js"]),
            ("  gunicorn   -w 1  app:app ", &["gunicorn", "-w", "1", "app:app"]),
            ("sh -c 'sleep 1 & exec node s.js'", &["sh", "-c", "sleep 1 & exec node s.js"]),
            (r#"echo "a \"quoted\" word" b\ c"#, &["echo", r#"a "quoted" word"#, "b c"]),
            ("python3 ''", &["python3", ""]),
            (r"a\ b", &["a b"]),
        ];
        for (line, words) in table {
            let split = split_words(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(split, *words, "{line}");
            assert_eq!(split_words(&quote_words(&split)).unwrap(), split, "round trip of {line}");
        }
        for bad in ["node 'unclosed", "node \"unclosed", "node \\"] {
            assert!(split_words(bad).is_err(), "{bad}");
        }
        assert_eq!(quote_words(&["node".into(), "a b".into(), "it's".into()]), r"node 'a b' 'it'\''s'");
    }

    #[test]
    fn a_command_comes_from_after_dashes_or_any_layer_and_defaults_to_http1() {
        let args = ServeArgs { argv: vec!["node".into(), "my app.js".into()], ..Default::default() };
        let config = resolve(&args, no_env).unwrap();
        assert_eq!(config.command, ["node", "my app.js"]);
        assert_eq!(config.upstream, Upstream::Http1, "an app speaks HTTP/1.1 unless told otherwise");

        let env = |k: &str| (k == "RIP_COMMAND").then(|| "python3 app.py".to_string());
        assert_eq!(resolve(&ServeArgs::default(), env).unwrap().command, ["python3", "app.py"]);

        let (_dir, args) = with_file("command = [\"bun\", \"worker.ts\"]\nupstream = \"http2\"\n");
        let config = resolve(&args, no_env).unwrap();
        assert_eq!(config.command, ["bun", "worker.ts"]);
        assert_eq!(config.upstream, Upstream::Http2, "a chosen upstream is kept");

        let (_dir, args) = with_file("command = [\"bun\", 3]\n");
        let err = format!("{:#}", resolve(&args, no_env).unwrap_err());
        assert!(err.contains(":1: invalid value for command: expected an array of strings"), "{err}");

        let twice = ServeArgs {
            argv: vec!["node".into()],
            settings: Flags { command: Some("python3".into()), ..Default::default() },
            ..Default::default()
        };
        assert!(format!("{:#}", resolve(&twice, no_env).unwrap_err()).contains("given twice"));

        let flags = Flags { upstream: Some("handoff".into()), ..Default::default() };
        let args = ServeArgs { argv: vec!["node".into()], settings: flags, ..Default::default() };
        let err = format!("{:#}", resolve(&args, no_env).unwrap_err());
        assert!(err.contains("upstream handoff needs rip's own"), "{err}");
        // The front-end serves a root itself, in front of any app.
        let flags = Flags { root: Some("/srv".into()), ..Default::default() };
        let args = ServeArgs { argv: vec!["node".into()], settings: flags, ..Default::default() };
        assert!(resolve(&args, no_env).is_ok());
    }

    #[test]
    fn stop_signals_health_paths_and_app_sockets_are_checked() {
        for (raw, parsed) in [("SIGQUIT", "SIGQUIT"), ("int", "SIGINT"), (" term ", "SIGTERM")] {
            assert_eq!(raw.parse::<StopSignal>().unwrap().as_str(), parsed);
        }
        for bad in ["SIGKILL", "KILL", "SIGSTOP", "9", "SIGNOPE"] {
            assert!(bad.parse::<StopSignal>().is_err(), "{bad}");
        }
        assert_eq!(parse_health_path("/ready?deep=1").unwrap(), "/ready?deep=1");
        for bad in ["healthz", "/a b", "", "http://x/healthz"] {
            assert!(parse_health_path(bad).is_err(), "{bad}");
        }
        assert!("socket".parse::<AppSocket>().is_err());
        assert_eq!("port".parse::<AppSocket>().unwrap(), AppSocket::Port);
    }

    #[test]
    fn unknown_file_key_is_named() {
        let (_dir, args) = with_file("wrokers = 2");
        let err = format!("{:#}", resolve(&args, no_env).unwrap_err());
        assert!(err.contains("unknown key 'wrokers'"), "{err}");
        assert!(err.contains("rip.toml"), "{err}");
    }

    #[test]
    fn bad_values_name_their_origin() {
        let settings = Flags { workers: Some("0".into()), ..Default::default() };
        let args = ServeArgs { settings, ..Default::default() };
        let err = format!("{:#}", resolve(&args, no_env).unwrap_err());
        assert!(err.contains("--workers") && err.contains("at least 1"), "{err}");

        let err = format!(
            "{:#}",
            resolve(&ServeArgs::default(), |k| (k == "RIP_TIMEOUT").then(|| "soon".into())).unwrap_err()
        );
        assert!(err.contains("RIP_TIMEOUT"), "{err}");

        let (_dir, args) = with_file("workers = 2\n\nbalance = \"random\"");
        let err = format!("{:#}", resolve(&args, no_env).unwrap_err());
        assert!(err.contains("for balance at") && err.contains("rip.toml:3"), "{err}");
    }

    #[test]
    fn a_bad_value_is_refused_even_where_a_higher_layer_overrides_it() {
        let (_dir, mut args) = with_file("port = \"not-a-number\"");
        args.settings.port = Some("0".into());
        let err = format!("{:#}", resolve(&args, no_env).unwrap_err());
        assert!(err.contains("'not-a-number' for port at") && err.contains("rip.toml:1"), "{err}");
        let env = |k: &str| (k == "RIP_WORKERS").then(|| "many".into());
        let args = ServeArgs {
            settings: Flags { workers: Some("2".into()), ..Default::default() },
            ..Default::default()
        };
        let err = format!("{:#}", resolve(&args, env).unwrap_err());
        assert!(err.contains("RIP_WORKERS"), "{err}");
    }

    #[test]
    fn cache_control_must_be_a_header_value() {
        let flags = |v: &str| ServeArgs {
            settings: Flags { cache_control: Some(v.into()), ..Default::default() },
            ..Default::default()
        };
        assert_eq!(
            resolve(&flags("public, max-age=60"), no_env).unwrap().cache_control.as_deref(),
            Some("public, max-age=60")
        );
        assert_eq!(resolve(&flags("none"), no_env).unwrap().cache_control, None);
        let err = format!("{:#}", resolve(&flags("a\u{1}b"), no_env).unwrap_err());
        assert!(err.contains("--cache-control"), "{err}");
    }

    #[test]
    fn a_toml_syntax_error_names_the_file_line_and_column() {
        let (_dir, args) = with_file("workers = 2\nmax_requests = 10 20\n");
        let err = format!("{:#}", resolve(&args, no_env).unwrap_err());
        assert!(err.contains("rip.toml:2:19:"), "{err}");
    }

    #[test]
    fn every_key_has_a_source_the_highest_layer_that_sets_it() {
        let (_dir, mut args) = with_file("# settings\nworkers = 3\nmax_requests = 100\n");
        args.settings.max_requests = Some("200".into());
        let env = |k: &str| (k == "RIP_PORT").then(|| "0".into());
        let (config, sources) = resolve_sourced(&args, env).unwrap();
        assert_eq!((config.workers, config.max_requests, config.port), (3, 200, 0));
        let source = |key: &str| sources.iter().find(|s| s.key == key).unwrap().clone();
        assert_eq!(source("max_requests").origin, Origin::Flag);
        assert_eq!(source("port").origin, Origin::Env);
        assert!(matches!(source("workers").origin, Origin::File(_, 2)));
        assert_eq!(
            source("timeout"),
            Source { key: "timeout", value: "30s".into(), origin: Origin::Default }
        );
        assert_eq!(sources.len(), KEYS.len());
    }

    #[test]
    fn missing_named_file_is_an_error() {
        let args = ServeArgs { config: Some("/nonexistent/rip.toml".into()), ..Default::default() };
        let err = format!("{:#}", resolve(&args, no_env).unwrap_err());
        assert!(err.starts_with("reading config /nonexistent/rip.toml"), "{err}");
    }

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_size("10m").unwrap(), 10 << 20);
        assert_eq!(parse_size("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("42").unwrap(), 42);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999g").is_err());
    }

    #[test]
    fn trusted_proxies_parse_as_blocks_and_match_addresses() {
        let cidrs = parse_cidrs("10.0.0.0/8, 127.0.0.1,::1/128").unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let trusted = |s: &str| cidrs.iter().any(|c| c.contains(ip(s)));
        assert!(trusted("10.200.3.4") && trusted("127.0.0.1") && trusted("::1"));
        assert!(trusted("::ffff:10.1.1.1"), "a mapped IPv4 client is the IPv4 address");
        assert!(!trusted("11.0.0.1") && !trusted("127.0.0.2") && !trusted("::2"));
        assert!(parse_cidrs("none").unwrap().is_empty());
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "not-an-ip", "::1/129"] {
            assert!(parse_cidrs(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn bad_toml_is_one_line() {
        let (_dir, args) = with_file("workers = ");
        let err = format!("{:#}", resolve(&args, no_env).unwrap_err());
        assert!(!err.contains('\n'), "{err}");
    }
}
