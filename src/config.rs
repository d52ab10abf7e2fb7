//! Flags > `RIP_*` environment > rip.toml > defaults, merged in `resolve` into one validated
//! `Config`. Every value is parsed in one place, so an error names the key and where the bad
//! value came from (`--workers`, `RIP_WORKERS` or the file), whichever layer supplied it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::cli::ServeArgs;
use crate::proxy::{Strategy, Upstream};

/// The default config file, read when present and no `--config` is given.
pub const DEFAULT_CONFIG_FILE: &str = "rip.toml";

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub host: IpAddr,
    pub port: u16,
    pub workers: usize,
    pub max_requests: u64,
    /// Up to this many extra requests, drawn per worker, so workers do not recycle together.
    pub max_requests_jitter: u64,
    /// Recycle a worker whose resident memory exceeds this many bytes; 0 = never.
    pub max_memory: u64,
    /// Recycle a worker older than this; zero = never.
    pub max_age: Duration,
    /// Workers replaced at once (recycles and reloads share this budget).
    pub max_surge: usize,
    pub balance: Strategy,
    pub upstream: Upstream,
    pub graceful_timeout: Duration,
    pub timeout: Duration,
    pub queue_timeout: Duration,
    pub header_timeout: Duration,
    pub start_timeout: Duration,
    /// 0 means unlimited.
    pub max_body: u64,
    pub max_connections: usize,
    /// Requests in flight per worker before new ones wait; 0 = no limit.
    pub max_in_flight: usize,
    pub root: Option<PathBuf>,
    pub worker_threads: usize,
    /// Threads of the front-end (`rip serve`) runtime.
    pub frontend_threads: usize,
    pub runtime_dir: Option<PathBuf>,
    pub log_format: LogFormat,
    /// Where the access log goes.
    pub access_log: AccessLogTarget,
    /// Address of the admin listener (/metrics, /live, /ready); off when `None`.
    pub admin: Option<std::net::SocketAddr>,
    /// The file the settings were read from, if any.
    pub file: Option<PathBuf>,
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

impl Default for Config {
    fn default() -> Self {
        Config {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 3000,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_requests: 0,
            max_requests_jitter: 0,
            max_memory: 0,
            max_age: Duration::ZERO,
            max_surge: 1,
            balance: Strategy::LeastPending,
            upstream: Upstream::Http2,
            graceful_timeout: Duration::from_secs(30),
            timeout: Duration::from_secs(30),
            queue_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(15),
            start_timeout: Duration::from_secs(30),
            max_body: 0,
            max_connections: 10_000,
            max_in_flight: 0,
            root: None,
            worker_threads: 1,
            frontend_threads: 1,
            runtime_dir: None,
            log_format: LogFormat::Text,
            access_log: AccessLogTarget::Stderr,
            admin: None,
            file: None,
        }
    }
}

/// Every key a layer may set: the rip.toml name; the flag is `--` plus dashes, the variable
/// `RIP_` plus upper case.
const KEYS: &[&str] = &[
    "host",
    "port",
    "workers",
    "max_requests",
    "max_requests_jitter",
    "max_memory",
    "max_age",
    "max_surge",
    "balance",
    "upstream",
    "graceful_timeout",
    "timeout",
    "queue_timeout",
    "header_timeout",
    "start_timeout",
    "max_body",
    "max_connections",
    "max_in_flight",
    "root",
    "worker_threads",
    "frontend_threads",
    "runtime_dir",
    "log_format",
    "access_log",
    "admin",
];

/// Where a raw value came from, for error messages.
#[derive(Debug, Clone, PartialEq)]
enum Origin {
    Flag,
    Env,
    File(PathBuf),
}

/// One layer's raw values, by key.
type Layer = HashMap<&'static str, String>;

/// Builds the config for `rip serve` from its flags, the process environment and the file.
pub fn load(args: &ServeArgs) -> Result<Config> {
    resolve(args, |name| std::env::var(name).ok())
}

/// The merge, with the environment passed in so that tests can fake it.
pub fn resolve(args: &ServeArgs, env: impl Fn(&str) -> Option<String>) -> Result<Config> {
    let flags = flag_layer(args);
    let env_layer = env_layer(&env);
    let file = match file_to_read(args, &env) {
        Some(path) => Some((file_layer(&path)?, path)),
        None => None,
    };

    let mut config = Config::default();
    for key in KEYS {
        let (raw, origin) = if let Some(v) = flags.get(key) {
            (v, Origin::Flag)
        } else if let Some(v) = env_layer.get(key) {
            (v, Origin::Env)
        } else if let Some((layer, path)) = &file {
            match layer.get(key) {
                Some(v) => (v, Origin::File(path.clone())),
                None => continue,
            }
        } else {
            continue;
        };
        apply(&mut config, key, raw).with_context(|| describe(key, raw, &origin))?;
    }
    config.file = file.map(|(_, path)| path);
    validate(&config)?;
    Ok(config)
}

fn describe(key: &str, raw: &str, origin: &Origin) -> String {
    match origin {
        Origin::Flag => format!("invalid value '{raw}' for --{}", key.replace('_', "-")),
        Origin::Env => format!("invalid value '{raw}' for RIP_{}", key.to_uppercase()),
        Origin::File(path) => format!("invalid value '{raw}' for {key} in {}", path.display()),
    }
}

fn apply(config: &mut Config, key: &str, raw: &str) -> Result<()> {
    match key {
        "host" => config.host = parse_host(raw)?,
        "port" => config.port = raw.parse().map_err(|_| anyhow!("expected a port number"))?,
        "workers" => config.workers = parse_count(raw)?,
        "max_requests" => {
            config.max_requests = raw.parse().map_err(|_| anyhow!("expected a whole number"))?
        }
        "max_requests_jitter" => {
            config.max_requests_jitter = raw.parse().map_err(|_| anyhow!("expected a whole number"))?
        }
        "max_memory" => config.max_memory = parse_size(raw)?,
        "max_age" => config.max_age = parse_duration(raw)?,
        "max_surge" => config.max_surge = parse_count(raw)?,
        "balance" => config.balance = raw.parse()?,
        "upstream" => config.upstream = raw.parse()?,
        "graceful_timeout" => config.graceful_timeout = parse_duration(raw)?,
        "timeout" => config.timeout = parse_positive_duration(raw)?,
        "queue_timeout" => config.queue_timeout = parse_duration(raw)?,
        "header_timeout" => config.header_timeout = parse_positive_duration(raw)?,
        "start_timeout" => config.start_timeout = parse_positive_duration(raw)?,
        "max_body" => config.max_body = parse_size(raw)?,
        "max_connections" => config.max_connections = parse_count(raw)?,
        "max_in_flight" => {
            config.max_in_flight = raw.parse().map_err(|_| anyhow!("expected a whole number"))?
        }
        "root" => config.root = Some(PathBuf::from(raw)),
        "worker_threads" => config.worker_threads = parse_count(raw)?,
        "frontend_threads" => config.frontend_threads = parse_count(raw)?,
        "runtime_dir" => config.runtime_dir = Some(PathBuf::from(raw)),
        "log_format" => config.log_format = raw.parse()?,
        "access_log" => config.access_log = raw.parse()?,
        "admin" => {
            config.admin = match raw {
                "" | "off" => None,
                addr => {
                    Some(addr.parse().map_err(|_| anyhow!("expected an address such as 127.0.0.1:9090"))?)
                }
            }
        }
        _ => unreachable!("key {key} is listed in KEYS but not applied"),
    }
    Ok(())
}

fn validate(config: &Config) -> Result<()> {
    if config.workers > crate::metrics::MAX_SLOTS {
        bail!("invalid value '{}' for workers: at most {}", config.workers, crate::metrics::MAX_SLOTS);
    }
    Ok(())
}

fn flag_layer(args: &ServeArgs) -> Layer {
    let mut layer = Layer::new();
    let mut put = |key: &'static str, value: Option<String>| {
        if let Some(v) = value {
            layer.insert(key, v);
        }
    };
    put("host", args.host.clone());
    put("port", args.port.map(|v| v.to_string()));
    put("workers", args.workers.map(|v| v.to_string()));
    put("max_requests", args.max_requests.map(|v| v.to_string()));
    put("max_requests_jitter", args.max_requests_jitter.map(|v| v.to_string()));
    put("max_memory", args.max_memory.clone());
    put("max_age", args.max_age.clone());
    put("max_surge", args.max_surge.map(|v| v.to_string()));
    put("balance", args.balance.clone());
    put("upstream", args.upstream.clone());
    put("graceful_timeout", args.graceful_timeout.clone());
    put("timeout", args.timeout.clone());
    put("queue_timeout", args.queue_timeout.clone());
    put("header_timeout", args.header_timeout.clone());
    put("start_timeout", args.start_timeout.clone());
    put("max_body", args.max_body.clone());
    put("max_connections", args.max_connections.map(|v| v.to_string()));
    put("max_in_flight", args.max_in_flight.map(|v| v.to_string()));
    put("root", args.root.as_ref().map(|p| p.display().to_string()));
    put("worker_threads", args.worker_threads.map(|v| v.to_string()));
    put("frontend_threads", args.frontend_threads.map(|v| v.to_string()));
    put("runtime_dir", args.runtime_dir.as_ref().map(|p| p.display().to_string()));
    put("log_format", args.log_format.clone());
    put("access_log", args.access_log.clone());
    put("admin", args.admin.clone());
    layer
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

fn file_layer(path: &Path) -> Result<Layer> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    parse_file(&text).with_context(|| format!("reading config {}", path.display()))
}

fn parse_file(text: &str) -> Result<Layer> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| anyhow!("{}", e.message().lines().next().unwrap_or("invalid TOML")))?;
    let mut layer = Layer::new();
    for (name, value) in table {
        let Some(key) = KEYS.iter().find(|k| **k == name) else {
            bail!("unknown key '{name}'");
        };
        let raw = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                bail!("invalid value for {name}: expected a string or a number, got {}", other.type_str())
            }
        };
        layer.insert(*key, raw);
    }
    Ok(layer)
}

fn parse_host(raw: &str) -> Result<IpAddr> {
    if raw == "localhost" {
        return Ok(IpAddr::from([127, 0, 0, 1]));
    }
    raw.trim_start_matches('[').trim_end_matches(']').parse().map_err(|_| anyhow!("expected an IP address"))
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
            args.workers = *flag;
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
            .filter(|l| !l.starts_with("# admin"))
            .map(|l| format!("{}\n", &l[2..]))
            .collect();
        let (_dir, args) = with_file(&uncommented);
        let mut config = resolve(&args, no_env).unwrap();
        config.file = None;
        assert_eq!(config, Config::default());
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
        let args = ServeArgs { workers: Some(0), ..Default::default() };
        let err = format!("{:#}", resolve(&args, no_env).unwrap_err());
        assert!(err.contains("--workers") && err.contains("at least 1"), "{err}");

        let err = format!(
            "{:#}",
            resolve(&ServeArgs::default(), |k| (k == "RIP_TIMEOUT").then(|| "soon".into())).unwrap_err()
        );
        assert!(err.contains("RIP_TIMEOUT"), "{err}");

        let (_dir, args) = with_file("balance = \"random\"");
        let err = format!("{:#}", resolve(&args, no_env).unwrap_err());
        assert!(err.contains("balance in") && err.contains("rip.toml"), "{err}");
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
    fn bad_toml_is_one_line() {
        let (_dir, args) = with_file("workers = ");
        let err = format!("{:#}", resolve(&args, no_env).unwrap_err());
        assert!(!err.contains('\n'), "{err}");
    }
}
