//! rip serve end to end: spread, replacement, recycling, shutdown, streaming, forwarded headers.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use nix::sys::signal::Signal;

use crate::harness::{
    empty, is_running, memory, request, runtime, send_signal, wait_gone, wait_until, Client, Load, Pattern,
    PatternBody, Rip, WhoAmI, WorkerEvent, WAIT,
};

/// Longest a test waits for rip to exit after a shutdown signal: well past the sleeps the
/// in-flight requests do, far below rip's default 30 s grace.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn requests_spread_over_every_worker() {
    let rt = runtime();
    let rip = Rip::start(&["--workers", "3"]);
    rip.wait_all_ready();
    let ready: BTreeSet<i32> = ready_pids(&rip).into_iter().collect();
    assert_eq!(ready.len(), 3, "ready workers: {ready:?}");

    let report = rt.block_on(Load::get("/whoami").clients(6).total(90).run(rip.addr()));

    assert_eq!((report.ok, report.failed), (90, 0), "{report:?}");
    assert_eq!(report.pids(), ready, "pids answering /whoami vs ready workers");
}

#[test]
fn a_killed_worker_is_replaced_and_requests_keep_succeeding() {
    let rt = runtime();
    let rip = Rip::start(&["--workers", "2"]);
    rip.wait_all_ready();
    let victim = *ready_pids(&rip).first().expect("a ready worker");

    let load = Load::get("/whoami").clients(4).total(usize::MAX).deadline(Duration::from_secs(60));
    let traffic = load.handle();
    let running = rt.spawn(load.run(rip.addr()));
    assert!(wait_until(WAIT, || traffic.done() >= 100), "load did not get going");

    let mark = rip.log_mark();
    send_signal(victim, Signal::SIGKILL);
    let exited = rip
        .wait_for_log_from(mark, |l| event_is(l, "worker exited unexpectedly", Some(victim)), WAIT)
        .expect("the killed worker's exit was logged");
    let slot = WorkerEvent::parse(&exited).unwrap().slot();
    let replacement = rip.wait_for_replacement(mark, slot, WAIT).pid;
    assert_ne!(replacement, victim);

    // Requests after the replacement joined the rotation succeed too.
    let after = traffic.done();
    assert!(wait_until(WAIT, || traffic.done() >= after + 200), "load stalled after the replacement");
    traffic.stop();
    let report = rt.block_on(running).unwrap();

    assert_eq!(report.failed, 0, "{report:?}");
    assert!(!report.timed_out);
    assert!(!is_running(victim), "the killed worker is still running");
    assert!(
        report.pids().contains(&replacement),
        "the replacement {replacement} never answered; pids seen: {:?}",
        report.pids()
    );
}

#[test]
fn recycling_every_five_requests_loses_none_of_a_thousand() {
    recycling_loses_none_of_a_thousand("http2");
}

#[test]
fn recycling_over_http1_to_workers_loses_none_of_a_thousand_either() {
    recycling_loses_none_of_a_thousand("http1");
}

fn recycling_loses_none_of_a_thousand(upstream: &str) {
    let rt = runtime();
    let rip = Rip::start(&["--workers", "2", "--max-requests", "5", "--upstream", upstream]);
    rip.wait_all_ready();

    let report = rt.block_on(
        Load::get("/whoami").clients(16).total(1000).deadline(Duration::from_secs(90)).run(rip.addr()),
    );

    assert_eq!((report.ok, report.failed), (1000, 0), "{report:?}");
    assert_eq!(report.statuses.get(&200), Some(&1000));
    let pids = report.pids();
    // 1000 requests at 5 per worker would be 200 workers if replacements were instant; while
    // one starts the exhausted ones keep serving, so fewer answer, but far more than 2.
    assert!(pids.len() >= 10, "only {} distinct pids: {pids:?}", pids.len());
    let recycled = rip.logs().iter().filter(|l| l.contains(" worker recycled ")).count();
    assert!(recycled >= 8, "only {recycled} workers recycled");
}

#[test]
fn sigterm_lets_requests_in_flight_finish_and_leaves_nothing_behind() {
    stops_gracefully_on(Signal::SIGTERM, 4, 2000, &[]);
}

#[test]
fn sigint_stops_as_gracefully_as_sigterm() {
    stops_gracefully_on(Signal::SIGINT, 2, 1500, &[]);
}

/// Sends `requests` × `GET /sleep/<ms>`, waits until every one reached a worker, sends
/// `signal`, then checks each request got its 200, rip exited 0 and took its workers and
/// sockets with it. `extra`: more flags for `rip serve`.
pub(crate) fn stops_gracefully_on(signal: Signal, requests: usize, ms: u64, extra: &[&str]) {
    let rt = runtime();
    // Round-robin, so that the /whoami polls below reach every worker in turn.
    let mut args = vec!["--workers", "2", "--balance", "round-robin"];
    args.extend_from_slice(extra);
    let mut rip = Rip::start(&args);
    rip.wait_all_ready();
    let addr = rip.addr();

    let path = format!("/sleep/{ms}");
    let in_flight: Vec<_> = (0..requests)
        .map(|_| {
            let path = path.clone();
            rt.spawn(async move { Client::new(addr).get(&path).await })
        })
        .collect();
    rt.block_on(wait_until_workers_received(addr, requests));
    assert!(
        in_flight.iter().all(|r| !r.is_finished()),
        "a request finished before the signal; the test needs them in flight"
    );
    rip.signal(signal);

    let status = rip.wait_exit(EXIT_TIMEOUT);
    for (i, request) in in_flight.into_iter().enumerate() {
        let reply = rt
            .block_on(request)
            .unwrap()
            .unwrap_or_else(|e| panic!("request {i} in flight at {signal} failed: {e}"));
        assert_eq!(reply.status, StatusCode::OK, "request {i}: {}", reply.text());
        assert_eq!(reply.text(), format!("slept {ms} ms"));
    }
    assert_eq!(status.code(), Some(0), "rip exited with {status}");
    assert!(
        rip.wait_for_log(|l| l.contains(" rip stopped"), Duration::ZERO).is_some(),
        "no `rip stopped` line"
    );

    let workers = rip.worker_pids();
    assert_eq!(workers.len(), 2, "{workers:?}");
    let alive = wait_gone(&workers, WAIT);
    assert!(alive.is_empty(), "workers still running: {alive:?}");
    let leftovers: Vec<_> =
        std::fs::read_dir(rip.runtime_dir()).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(leftovers.is_empty(), "left in the runtime dir: {leftovers:?}");
}

/// Polls `/whoami` until the workers' `served` counters show `n` requests beyond the polls
/// themselves: every request sent before is then in a worker's hands. Needs round-robin so
/// that the polls visit every worker; each poll is a new connection, because with
/// `--upstream handoff` a connection stays with one worker.
async fn wait_until_workers_received(addr: SocketAddr, n: usize) {
    let deadline = Instant::now() + WAIT;
    // Per pid: (latest served, polls it answered).
    let mut seen: HashMap<i32, (u64, u64)> = HashMap::new();
    loop {
        let reply = Client::new(addr).get("/whoami").await.expect("GET /whoami");
        let who = WhoAmI::parse(&reply.body).expect("a /whoami answer");
        let entry = seen.entry(who.pid).or_default();
        entry.0 = who.served;
        entry.1 += 1;
        let others: u64 = seen.values().map(|(served, polls)| served.saturating_sub(*polls)).sum();
        if others >= n as u64 {
            return;
        }
        assert!(Instant::now() < deadline, "workers received {others} of {n} requests: {seen:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn a_64_mib_echo_streams_through_without_growing_the_front_end() {
    const SIZE: u64 = 64 << 20;
    const LIMIT: u64 = 32 << 20;
    const SEED: u64 = 0x5eed;
    let rt = runtime();
    let rip = Rip::start(&["--workers", "1"]);

    let received = rt.block_on(async {
        let mut client = Client::new(rip.addr());
        client.timeout = Duration::from_secs(120);
        let response = client.post_stream("/echo", PatternBody::new(SEED, SIZE)).await.expect("POST /echo");
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut expected = Pattern::new(SEED);
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("reading the echoed body");
            if let Ok(data) = frame.into_data() {
                let at = expected.offset();
                assert!(expected.check(&data), "echoed bytes differ in {} bytes at offset {at}", data.len());
            }
        }
        expected.offset()
    });

    assert_eq!(received, SIZE, "echoed length");
    let front_end = memory(rip.pid()).expect("reading the front-end's memory");
    println!("faults: echo_64mib front_end_peak_mib={:.1}", front_end.peak as f64 / f64::from(1 << 20));
    assert!(
        front_end.peak < LIMIT,
        "front-end peak RSS {} MiB for a {} MiB body",
        front_end.peak >> 20,
        SIZE >> 20
    );
}

#[test]
fn killing_the_parent_takes_every_worker_down() {
    let mut rip = Rip::start(&["--workers", "2"]);
    rip.wait_all_ready();
    let workers = rip.worker_pids();
    assert_eq!(workers.len(), 2, "{workers:?}");
    assert!(workers.iter().all(|p| is_running(*p)));

    rip.signal(Signal::SIGKILL);
    rip.wait_exit(WAIT);

    let alive = wait_gone(&workers, WAIT);
    assert!(alive.is_empty(), "workers outlived their parent: {alive:?}");
}

#[test]
fn request_headers_are_forwarded_without_hop_by_hop_or_forged_ones() {
    let rt = runtime();
    let rip = Rip::start(&["--workers", "1"]);
    let seen = rt.block_on(async {
        let mut req = request(Method::GET, "/headers", empty());
        let headers = req.headers_mut();
        for (name, value) in [
            ("host", "example.test"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("connection", "keep-alive, X-Hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("x-end-to-end", "kept"),
        ] {
            headers.insert(name, value.parse().unwrap());
        }
        let reply = Client::new(rip.addr()).request(req).await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        reply.json()
    });

    assert_eq!(seen["x-forwarded-for"], "127.0.0.1", "{seen}");
    assert_eq!(seen["x-forwarded-proto"], "http", "{seen}");
    assert_eq!(seen["host"], "example.test", "{seen}");
    assert_eq!(seen["x-end-to-end"], "kept", "{seen}");
    for hop in ["x-hop", "keep-alive"] {
        assert!(seen.get(hop).is_none(), "{hop} was forwarded: {seen}");
    }
    // The worker connection may carry its own Connection header, never the client's.
    if let Some(connection) = seen.get("connection") {
        let connection = connection.as_str().unwrap_or_default().to_ascii_lowercase();
        assert!(!connection.contains("x-hop"), "client's Connection forwarded: {seen}");
    }
}

/// Pids from every `worker ready` line so far.
fn ready_pids(rip: &Rip) -> Vec<i32> {
    rip.logs()
        .iter()
        .filter_map(|l| WorkerEvent::parse(l))
        .filter(|e| e.is("worker ready"))
        .map(|e| e.pid)
        .collect()
}

/// `line` is the worker event `event`, for `pid` when given.
fn event_is(line: &str, event: &str, pid: Option<i32>) -> bool {
    WorkerEvent::parse(line).is_some_and(|e| e.is(event) && pid.is_none_or(|p| p == e.pid))
}

/// Apps in workers can take axum's `ConnectInfo<SocketAddr>`, and it holds each client's own
/// address and port as the front-end accepted it: eight clients at once over two workers,
/// each sending a forged peer header that neither decides the answer nor reaches the app.
#[test]
fn connect_info_in_workers_is_each_clients_real_address_and_cannot_be_forged() {
    use std::io::{Read, Write};
    let rip = Rip::start(&["--workers", "2"]);
    let addr = rip.addr();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                let mut answers = Vec::new();
                for path in ["/whoami", "/headers"] {
                    let mut stream = std::net::TcpStream::connect(addr).expect("connecting");
                    stream.set_read_timeout(Some(WAIT)).unwrap();
                    let request = format!(
                        "GET {path} HTTP/1.1\r\nHost: rip.test\r\nX-Rip-Peer: 6.6.6.6:1\r\nConnection: close\r\n\r\n"
                    );
                    stream.write_all(request.as_bytes()).unwrap();
                    let mut reply = String::new();
                    stream.read_to_string(&mut reply).expect("reading the reply");
                    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
                    answers.push((stream.local_addr().unwrap(), body));
                }
                answers
            })
        })
        .collect();
    for client in clients {
        let answers = client.join().expect("a client thread");
        let (local, whoami) = &answers[0];
        let whoami: serde_json::Value = serde_json::from_str(whoami).expect(whoami);
        assert_eq!(whoami["client"], local.to_string(), "{whoami}");
        let headers: serde_json::Value = serde_json::from_str(&answers[1].1).expect(&answers[1].1);
        assert!(headers.get("x-rip-peer").is_none(), "the peer header reached the app: {headers}");
    }
}
