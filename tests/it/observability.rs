//! What rip tells about itself: `/metrics` on the admin listener parses as Prometheus text and
//! counts the requests sent; the JSON access log has one line per request, in order, and moves
//! to a new file on SIGUSR1; `rip status` lists every worker (as a table and as JSON, naming
//! the same ones), and `rip stop` then ends rip gracefully.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hyper::header::CONTENT_TYPE;
use hyper::StatusCode;
use nix::sys::signal::Signal;

use crate::harness::{
    json_message, log_addr, parse_prometheus, runtime, settle, wait_gone, wait_until, Client, Control, Rip,
    Sample, Status, START_TIMEOUT, WAIT,
};

#[test]
fn metrics_parse_as_prometheus_text_and_count_the_requests_sent() {
    const SENT: usize = 37;
    let rip = Rip::start(&["--workers", "2", "--admin", "127.0.0.1:0"]);
    rip.wait_all_ready();
    let admin: SocketAddr = rip
        .wait_for_log(|l| l.contains(" admin listener started "), WAIT)
        .and_then(|l| log_addr(&l))
        .expect("the admin address is logged");

    let (text, ready, live) = runtime().block_on(async {
        let mut client = Client::new(rip.addr());
        for _ in 0..SENT {
            assert_eq!(client.get("/").await.unwrap().status, StatusCode::OK);
        }
        let mut admin = Client::new(admin);
        let metrics = admin.get("/metrics").await.unwrap();
        assert_eq!(metrics.status, StatusCode::OK);
        let kind = metrics.headers[CONTENT_TYPE].to_str().unwrap().to_string();
        assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
        (metrics.text(), admin.get("/ready").await.unwrap(), admin.get("/live").await.unwrap())
    });

    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    assert_eq!(live.status, StatusCode::OK, "{}", live.text());
    let samples = parse_prometheus(&text);
    let sum = |name: &str| samples.iter().filter(|s| s.name == name).map(|s| s.value).sum::<f64>();
    let one = |name: &str, labels: &[(&str, &str)]| {
        samples
            .iter()
            .find(|s| {
                s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{text}"))
            .value
    };

    let ok = one("rip_requests_total", &[("status", "200")]);
    assert!(ok >= SENT as f64, "rip_requests_total{{status=\"200\"}} {ok} < {SENT}\n{text}");
    let answered = sum("rip_requests_total");
    // Every request here was answered by a worker, so the per-worker counters add up.
    assert_eq!(sum("rip_worker_requests_total"), answered, "{text}");
    assert_eq!(one("rip_request_duration_seconds_count", &[]), answered, "{text}");
    assert_eq!(one("rip_request_duration_seconds_bucket", &[("le", "+Inf")]), answered, "{text}");
    let buckets: Vec<f64> =
        samples.iter().filter(|s| s.name == "rip_request_duration_seconds_bucket").map(|s| s.value).collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "histogram buckets not cumulative: {buckets:?}");
    assert_eq!(one("rip_workers_ready", &[]), 2.0, "{text}");
    let rss: Vec<&Sample> = samples.iter().filter(|s| s.name == "rip_worker_rss_bytes").collect();
    assert_eq!(rss.len(), 2, "{text}");
    assert!(rss.iter().all(|s| s.value > 0.0), "{text}");
}

#[test]
fn the_json_access_log_has_a_line_per_request_and_reopens_on_sigusr1() {
    const FIRST: usize = 12;
    const SECOND: usize = 5;
    let builder = Rip::builder();
    let path = builder.dir().join("access.log");
    let rotated = builder.dir().join("access.log.1");
    let rip = builder.args(&["--workers", "2", "--log-format", "json", "--access-log"]).arg(&path).spawn();
    // The harness reads text logs; with --log-format json the address is found here.
    let started = rip
        .wait_for_log(|l| json_message(l).as_deref() == Some("rip started"), START_TIMEOUT)
        .expect("rip logs `rip started`");
    let addr: SocketAddr = serde_json::from_str::<serde_json::Value>(&started).unwrap()["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no addr in {started}"));
    // Ready without sending a request, so that the log holds only the test's requests.
    rip.wait_for_log(|l| json_message(l).as_deref() == Some("all workers ready"), START_TIMEOUT)
        .expect("every worker becomes ready");

    let rt = runtime();
    let first = rt.block_on(send_mixed(addr, FIRST));
    assert!(wait_until(WAIT, || read_lines(&path).len() >= FIRST), "lines: {:?}", read_lines(&path));
    check_access_lines(&read_lines(&path), &first);

    std::fs::rename(&path, &rotated).unwrap();
    let mark = rip.log_mark();
    rip.signal(Signal::SIGUSR1);
    rip.wait_for_log_from(mark, |l| json_message(l).as_deref() == Some("access log reopened"), WAIT)
        .expect("rip logs `access log reopened` once the file is reopened");
    let second = rt.block_on(send_mixed(addr, SECOND));
    assert!(wait_until(WAIT, || read_lines(&path).len() >= SECOND), "no new file at {}", path.display());
    check_access_lines(&read_lines(&path), &second);
    check_access_lines(&read_lines(&rotated), &first);
}

#[test]
fn status_lists_every_worker_and_stop_ends_rip_gracefully() {
    let mut rip = Rip::start(&["--workers", "2"]);
    rip.wait_all_ready();
    let control = Control::of(&rip);
    let workers = settle(&control, rip.pid(), 2);

    let table = control.run(&["status"]);
    assert!(table.status.success(), "{table:?}");
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "header, a row per worker, totals, totals since start:\n{}", table.stdout);
    assert!(lines[0].starts_with("WORKER") && lines[0].contains("PID") && lines[0].contains("STATE"));
    let mut rows = BTreeMap::new();
    for row in &lines[1..3] {
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert!(cols.len() >= 4 && cols[2] == "ready", "{row}");
        let pid = cols[1].parse::<i32>().unwrap_or_else(|_| panic!("no pid in {row}"));
        rows.insert(pid, cols[0].to_string());
    }
    assert_eq!(rows.keys().copied().collect::<BTreeSet<_>>(), workers);
    let totals = format!("rip pid {}: 2 of 2 workers ready", rip.pid());
    assert!(lines[3].starts_with(&totals), "{:?} vs {totals:?}", lines[3]);
    assert!(lines[4].starts_with("since start ("), "{:?}", lines[4]);

    let json = control.run(&["status", "--json"]);
    assert!(json.status.success(), "{json:?}");
    let status: Status =
        serde_json::from_str(&json.stdout).unwrap_or_else(|e| panic!("{e}: {}", json.stdout));
    assert_eq!(status.pid, rip.pid());
    assert_eq!(status.workers_ready, 2);
    let ids: BTreeMap<i32, String> = status.workers.iter().map(|w| (w.pid, w.id.clone())).collect();
    assert_eq!(ids, rows, "the table and the JSON name the same workers");

    let stop = control.run(&["stop"]);
    assert!(stop.status.success(), "{stop:?}");
    let exit = rip.wait_exit(WAIT);
    assert_eq!(exit.code(), Some(0), "rip exited with {exit}");
    assert!(rip.wait_for_log(|l| l.contains(" rip stopped"), Duration::ZERO).is_some());
    assert_eq!(wait_gone(&workers.into_iter().collect::<Vec<_>>(), WAIT), Vec::<i32>::new());
    let after = control.run(&["status"]);
    assert!(!after.status.success(), "status after stop: {after:?}");
}

/// What the test sent and got, to hold the log lines against.
#[derive(Debug)]
struct Sent {
    path: String,
    status: u16,
    bytes: usize,
}

/// `n` requests, one at a time so that the log lines come in the same order: every third to
/// a route that does not exist (404), the others to `/` (200).
async fn send_mixed(addr: SocketAddr, n: usize) -> Vec<Sent> {
    let mut client = Client::new(addr);
    let mut sent = Vec::new();
    for i in 0..n {
        let path = if i % 3 == 2 { format!("/no-such-route/{i}") } else { "/".to_string() };
        let reply = client.get(&path).await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let want = if i % 3 == 2 { StatusCode::NOT_FOUND } else { StatusCode::OK };
        assert_eq!(reply.status, want, "GET {path}");
        sent.push(Sent { path, status: reply.status.as_u16(), bytes: reply.body.len() });
    }
    sent
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).map(|t| t.lines().map(str::to_string).collect()).unwrap_or_default()
}

/// Exactly one valid JSON line per request sent, in order, with its fields.
fn check_access_lines(lines: &[String], sent: &[Sent]) {
    assert_eq!(lines.len(), sent.len(), "{lines:#?}");
    for (line, sent) in lines.iter().zip(sent) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert_eq!(v["method"], "GET", "{line}");
        assert_eq!(v["path"], sent.path.as_str(), "{line}");
        assert_eq!(v["status"], sent.status, "{line}");
        assert_eq!(v["bytes"], sent.bytes as u64, "{line}");
        assert!(v["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{line}");
        let worker = v["worker"].as_str().unwrap_or_else(|| panic!("no worker in {line}"));
        assert!(
            worker.split_once('/').is_some_and(|(s, g)| s.parse::<u32>().is_ok() && g.parse::<u64>().is_ok()),
            "{line}"
        );
    }
}
