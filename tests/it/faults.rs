//! Fault tolerance and hostile input, proven under load: workers SIGKILLed or recycled in the
//! middle of traffic, a hung worker, a crash-looping binary, overload, slow and silent
//! clients, oversized requests, unsafe runtime directories, a panicking handler, and which
//! requests may be retried when their worker dies.
//!
//! Every test starts its own rip on port 0 with a private runtime directory and talks to it on
//! loopback only. Load loops are bounded in count and time, and every wait is a condition with
//! a deadline; the only paced loops are the fault injections themselves ("kill a worker every
//! 300 ms"). Tests that produce figures print one `faults: ...` line on stdout, shown with
//! `cargo test --test it faults -- --nocapture`.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use hyper::header::RETRY_AFTER;
use hyper::StatusCode;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::harness::{
    assert_status, connect_raw, example_binary, is_running, log_field, memory, read_until_closed, runtime,
    served_by, wait_until, Client, Load, LoadReport, Reply, Rip, WhoAmI, WorkerEvent, WAIT,
};

// ---------------------------------------------------------------------------------------
// Workers dying and recycling under load
// ---------------------------------------------------------------------------------------

#[test]
fn sigkill_of_random_workers_under_load_fails_no_request() {
    /// The fault pattern: one SIGKILL this often, for this long.
    const KILL_EVERY: Duration = Duration::from_millis(300);
    const KILLING_FOR: Duration = Duration::from_secs(10);
    let rt = runtime();
    // Workers killed young count as crash-looping, so their slots back off (up to 10 s); a
    // queue timeout past that ceiling lets requests wait out a moment with no worker ready
    // instead of getting a 503 by design. Any failure left is then a fault.
    let rip = Rip::start(&["--workers", "4", "--queue-timeout", "15s", "--access-log", "off"]);
    rip.wait_all_ready();

    let load = Load::get("/whoami").clients(16).total(usize::MAX).deadline(Duration::from_secs(60));
    let traffic = load.handle();
    let running = rt.spawn(load.run(rip.addr()));
    assert!(wait_until(WAIT, || traffic.done() >= 100), "load did not get going");

    let mut rng = Rng::seeded();
    let mut kills = 0;
    let started = Instant::now();
    let mut tick = started;
    while started.elapsed() < KILLING_FOR {
        let ready = ready_workers(&rip);
        if !ready.is_empty() {
            let victim = ready[rng.below(ready.len())];
            if kill(Pid::from_raw(victim), Signal::SIGKILL).is_ok() {
                kills += 1;
            }
        }
        tick += KILL_EVERY;
        std::thread::sleep(tick.saturating_duration_since(Instant::now()));
    }
    // Requests go on after the last kill, through the replacements.
    let after = traffic.done();
    assert!(wait_until(WAIT, || traffic.done() >= after + 200), "load stalled after the kills");
    traffic.stop();
    let report = rt.block_on(running).unwrap();

    println!(
        "faults: kill_under_load sent={} failed={} kills={kills} statuses={:?} logged_502={} \
         seed={:#x} distinct_pids={} restarts={}",
        report.sent,
        report.failed,
        report.statuses,
        rip.logs().iter().filter(|l| l.contains(" request failed ") && l.contains("status=502")).count(),
        rng.seed,
        report.pids().len(),
        count_lines(&rip, " worker exited unexpectedly "),
    );
    assert!(kills >= 10, "only {kills} workers were killed");
    // FAILS TODAY (src/proxy/mod.rs, `Proxy::forward`): when the worker that died was the last
    // one in the rotation, a GET's retries go back to it (`avoid` only ranks it last, and only a
    // refused connect marks it unusable) through its other pooled idle connections, which still
    // look ready until their tasks see the EOF. All 4 attempts are spent within a millisecond,
    // and the GET gets 502 instead of waiting, within its queue timeout, for the replacement:
    // either "worker failed before responding" on the 4th stale connection, or "worker
    // unreachable, request retried attempt=4" (never sent, yet the loop ends with 502). With
    // `--workers 1` and 16 clients, about one SIGKILL in three costs a 502 or two.
    assert_eq!(report.failed, 0, "{}", summary(&report));
    assert!(!report.timed_out);
}

#[test]
fn recycling_every_5_requests_under_load_fails_no_request() {
    const REQUESTS: usize = 3000;
    let rt = runtime();
    let rip = Rip::start(&["--workers", "2", "--max-requests", "5", "--access-log", "off"]);
    rip.wait_all_ready();

    let started = Instant::now();
    let report = rt.block_on(
        Load::get("/whoami").clients(16).total(REQUESTS).deadline(Duration::from_secs(90)).run(rip.addr()),
    );
    let elapsed = started.elapsed();
    let pids = report.pids();
    let recycled = count_lines(&rip, " worker recycled ");

    println!(
        "faults: recycle_every_5 sent={} failed={} distinct_pids={} recycled={recycled} elapsed_ms={}",
        report.sent,
        report.failed,
        pids.len(),
        elapsed.as_millis()
    );
    assert_eq!((report.ok, report.failed), (REQUESTS, 0), "{}", summary(&report));
    // At 5 requests each, 3000 requests would need 600 workers if replacements were instant;
    // exhausted workers keep serving while their replacement starts, so fewer answer.
    assert!(pids.len() >= 30, "only {} distinct pids answered", pids.len());
    assert!(recycled >= 30, "only {recycled} workers recycled");
}

// ---------------------------------------------------------------------------------------
// A hung worker
// ---------------------------------------------------------------------------------------

#[test]
fn a_hung_worker_gets_504_and_is_replaced_while_others_serve() {
    let rt = runtime();
    let rip = Rip::start(&["--workers", "2", "--timeout", "1s"]);
    rip.wait_all_ready();
    let addr = rip.addr();

    // One client: each of its requests finds the healthy worker with fewer requests in flight
    // than the hung one, so none is parked behind the hang (one that was would get its own
    // 504 if its timeout ran out before the kill it is waiting for).
    let load = Load::get("/").clients(1).total(usize::MAX).deadline(Duration::from_secs(60));
    let traffic = load.handle();
    let running = rt.spawn(load.run(addr));
    assert!(wait_until(WAIT, || traffic.done() >= 20), "load did not get going");

    let mark = rip.log_mark();
    let started = Instant::now();
    let reply = rt.block_on(async { Client::new(addr).get("/block/5000").await }).expect("GET /block/5000");
    let elapsed = started.elapsed();
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.text());
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "504 after {elapsed:?}, want about the 1 s timeout"
    );

    let timed_out = rip
        .wait_for_log_from(mark, |l| l.contains("request timed out, worker will be replaced"), WAIT)
        .expect("the timeout was logged");
    assert_eq!(log_field(&timed_out, "method"), Some("GET"), "{timed_out}");
    assert_eq!(log_field(&timed_out, "path"), Some("/block/5000"), "{timed_out}");
    let waited: u64 = log_field(&timed_out, "elapsed_ms").and_then(|v| v.parse().ok()).expect(&timed_out);
    assert!(waited >= 1000, "{timed_out}");
    let hung = log_field(&timed_out, "worker").expect("the timeout names the worker").to_string();

    let killed = rip
        .wait_for_log_from(mark, |l| event_of(l, "worker hung, killed", &hung), WAIT)
        .expect("the hung worker was killed");
    let hung_pid = WorkerEvent::parse(&killed).unwrap().pid;
    rip.wait_for_log_from(mark, |l| event_of(l, "worker exited after hanging", &hung), WAIT)
        .expect("the hung worker's exit was logged");
    let slot = WorkerEvent::parse(&killed).unwrap().slot();
    let replacement = rip.wait_for_replacement(mark, slot, WAIT);
    assert_ne!(replacement.worker, hung);
    assert!(!is_running(hung_pid), "the hung worker {hung_pid} still runs");

    let after = traffic.done();
    assert!(wait_until(WAIT, || traffic.done() >= after + 20), "load stalled after the replacement");
    traffic.stop();
    let report = rt.block_on(running).unwrap();
    println!(
        "faults: hung_worker status=504 after_ms={} others_sent={} others_failed={}",
        elapsed.as_millis(),
        report.sent,
        report.failed
    );
    assert_eq!(report.failed, 0, "{}", summary(&report));
}

// ---------------------------------------------------------------------------------------
// Overload
// ---------------------------------------------------------------------------------------

#[test]
fn overload_gets_503_with_retry_after_and_memory_stays_bounded() {
    /// The connections of the burst, all open at once.
    const BURST: usize = 500;
    /// Long enough to hold the worker full through the whole burst (checked).
    const SATURATING_MS: u64 = 6000;
    /// Well above what a front-end with 500 waiting connections needs (a few MiB).
    const PEAK_LIMIT: u64 = 64 << 20;
    let rt = runtime();
    let rip = Rip::start(&[
        "--workers",
        "1",
        "--max-in-flight",
        "2",
        "--queue-timeout",
        "500ms",
        "--access-log",
        "off",
    ]);
    let addr = rip.addr();
    let slow = format!("/sleep/{SATURATING_MS}");

    let saturating: Vec<_> = (0..2)
        .map(|_| {
            let slow = slow.clone();
            rt.spawn(async move { Client::new(addr).get(&slow).await })
        })
        .collect();
    // The worker is full once a quick request is turned away.
    rt.block_on(async {
        let deadline = Instant::now() + WAIT;
        loop {
            let reply = Client::new(addr).get("/").await.expect("GET /");
            if reply.status == StatusCode::SERVICE_UNAVAILABLE {
                break;
            }
            assert!(Instant::now() < deadline, "the worker never filled up; last answer {}", reply.status);
        }
    });
    let outcomes: Vec<Result<Timed, String>> = rt.block_on(async {
        let tasks: Vec<_> = (0..BURST)
            .map(|_| {
                let slow = slow.clone();
                tokio::spawn(async move { get_timed(addr, &slow).await })
            })
            .collect();
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.expect("a burst task panicked"));
        }
        outcomes
    });
    assert!(
        saturating.iter().all(|r| !r.is_finished()),
        "a saturating request ended during the burst, which then proves nothing: make it sleep longer"
    );

    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut errors = Vec::new();
    let mut slowest = Duration::ZERO;
    let mut fastest = Duration::MAX;
    for outcome in &outcomes {
        match outcome {
            Ok(t) => {
                *statuses.entry(t.status.as_u16()).or_default() += 1;
                assert_eq!(
                    t.retry_after.as_deref(),
                    Some("1"),
                    "a {} without Retry-After: 1 ({:?})",
                    t.status,
                    t.retry_after
                );
                slowest = slowest.max(t.answered_in);
                fastest = fastest.min(t.answered_in);
            }
            Err(e) => errors.push(e.clone()),
        }
    }
    let saturated: Vec<Reply> =
        saturating.into_iter().map(|r| rt.block_on(r).unwrap().expect("a saturating request")).collect();
    let front_end = memory(rip.pid()).expect("reading the front-end's memory");

    println!(
        "faults: overload burst={BURST} statuses={statuses:?} errors={} fastest_503_ms={} \
         slowest_503_ms={} front_end_peak_mib={:.1}",
        errors.len(),
        fastest.as_millis(),
        slowest.as_millis(),
        front_end.peak as f64 / f64::from(1 << 20)
    );
    assert!(
        errors.is_empty(),
        "{} burst requests failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert_eq!(statuses, BTreeMap::from([(503, BURST)]));
    // Each waited out the 500 ms queue timeout, and not much more.
    assert!(fastest >= Duration::from_millis(450), "a 503 after {fastest:?}, before the queue timeout");
    assert!(slowest < Duration::from_secs(3), "a 503 took {slowest:?}");
    for reply in &saturated {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.text(), format!("slept {SATURATING_MS} ms"));
    }
    assert!(front_end.peak < PEAK_LIMIT, "front-end peak RSS {} MiB", front_end.peak >> 20);
}

/// One answer of the burst, timed from when its connection was established.
#[derive(Debug)]
struct Timed {
    status: StatusCode,
    retry_after: Option<String>,
    answered_in: Duration,
}

/// `GET path` on a new connection; the time counts from the connection being open, so that
/// SYN retries on a full accept queue do not count as the server's slowness.
async fn get_timed(addr: SocketAddr, path: &str) -> Result<Timed, String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("a valid request");
    let started = Instant::now();
    let exchange = async {
        let response = sender.send_request(req).await?;
        let (parts, body) = response.into_parts();
        body.collect().await?;
        Ok::<_, hyper::Error>(parts)
    };
    let parts = tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .map_err(|_| "no answer within 20 s".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(Timed {
        status: parts.status,
        retry_after: parts.headers.get(RETRY_AFTER).map(|v| v.to_str().unwrap_or("?").to_owned()),
        answered_in: started.elapsed(),
    })
}

// ---------------------------------------------------------------------------------------
// Slow, silent and stalling clients
// ---------------------------------------------------------------------------------------

#[test]
fn slowloris_and_silent_connections_are_closed_while_others_are_served() {
    const SLOW: usize = 100;
    const SILENT: usize = 100;
    /// The header timeout rip gets, and how long past it a connection may stay open.
    const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
    const CLOSE_WITHIN: Duration = Duration::from_secs(6);
    /// The slowloris pace: one byte of an endless header this often.
    const DRIP: Duration = Duration::from_millis(200);
    let rt = runtime();
    let rip = Rip::start(&["--workers", "2", "--header-timeout", "1s", "--access-log", "off"]);
    rip.wait_all_ready();
    let addr = rip.addr();

    let load = Load::get("/whoami").clients(4).total(usize::MAX).deadline(Duration::from_secs(60));
    let traffic = load.handle();
    let running = rt.spawn(load.run(addr));
    assert!(wait_until(WAIT, || traffic.done() >= 50), "load did not get going");

    let (slow, silent) = rt.block_on(async {
        let slow: Vec<_> = (0..SLOW).map(|_| tokio::spawn(slowloris(addr, DRIP, CLOSE_WITHIN))).collect();
        let silent: Vec<_> = (0..SILENT).map(|_| tokio::spawn(silent(addr, CLOSE_WITHIN))).collect();
        let mut slow_closed = Vec::new();
        for task in slow {
            slow_closed.push(task.await.expect("a slowloris task panicked"));
        }
        let mut silent_closed = Vec::new();
        for task in silent {
            silent_closed.push(task.await.expect("a silent task panicked"));
        }
        (slow_closed, silent_closed)
    });
    // Requests go on after the hostile connections are gone, too.
    let after = traffic.done();
    assert!(wait_until(WAIT, || traffic.done() >= after + 50), "load stalled");
    traffic.stop();
    let report = rt.block_on(running).unwrap();

    let range = |times: Vec<Duration>| (times.iter().min().copied(), times.iter().max().copied());
    let (slow_min, slow_max) = range(slow.iter().flatten().map(|(closed, _)| *closed).collect());
    let (silent_min, silent_max) = range(silent.iter().flatten().copied().collect());
    println!(
        "faults: slowloris slow={SLOW} silent={SILENT} slow_closed_ms={:?}..{:?} silent_closed_ms={:?}..{:?} \
         others_sent={} others_failed={}",
        slow_min.map(|d| d.as_millis()),
        slow_max.map(|d| d.as_millis()),
        silent_min.map(|d| d.as_millis()),
        silent_max.map(|d| d.as_millis()),
        report.sent,
        report.failed
    );
    let open: Vec<&String> = slow
        .iter()
        .filter_map(|c| c.as_ref().err())
        .chain(silent.iter().filter_map(|c| c.as_ref().err()))
        .collect();
    assert!(open.is_empty(), "{} connections were not closed: {:?}", open.len(), &open[..open.len().min(5)]);
    // Each slowloris was still sending when it was cut: the timeout covers the whole head, not
    // the pause between two bytes.
    let fewest_drips = slow.iter().flatten().map(|(_, drips)| *drips).min().unwrap_or(0);
    assert!(
        fewest_drips as u128 * DRIP.as_millis() >= HEADER_TIMEOUT.as_millis() * 3 / 4,
        "a slowloris was cut after only {fewest_drips} bytes"
    );
    assert_eq!(report.failed, 0, "{}", summary(&report));
}

/// A client that sends a request head one byte at a time and never finishes it. Returns when
/// the server closed the connection, and how many bytes were dripped until then.
async fn slowloris(addr: SocketAddr, drip: Duration, within: Duration) -> Result<(Duration, usize), String> {
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: slow\r\nX-Slow: ").await.map_err(|e| e.to_string())?;
    let mut ticks = tokio::time::interval(drip);
    let mut drips = 0;
    let mut buf = [0; 1024];
    let deadline = tokio::time::Instant::from_std(started + within);
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Ok((started.elapsed(), drips)),
                Ok(_) => {}
            },
            _ = ticks.tick() => {
                if stream.write_all(b"a").await.is_err() {
                    return Ok((started.elapsed(), drips));
                }
                drips += 1;
            }
            () = tokio::time::sleep_until(deadline) => {
                return Err(format!("a slowloris still open after {within:?} and {drips} bytes"));
            }
        }
    }
}

/// A client that connects and sends nothing. Returns when the server closed the connection.
async fn silent(addr: SocketAddr, within: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let mut buf = [0; 1024];
    loop {
        match tokio::time::timeout(within, stream.read(&mut buf)).await {
            Err(_) => return Err(format!("a silent connection still open after {within:?}")),
            Ok(Ok(0) | Err(_)) => return Ok(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[test]
fn a_request_body_that_stalls_gets_408_and_its_worker_is_not_taken_for_hung() {
    // The worker timeout (1 s) is shorter than the body timeout (the header timeout, 2 s): a
    // proxy that timed the worker from the start of the request, not from the end of its body,
    // would kill the worker as hung before the 408.
    let rip = Rip::builder()
        .program(example_binary())
        .args(&["--workers", "1", "--timeout", "1s", "--header-timeout", "2s"])
        .start();
    rip.wait_all_ready();
    let rt = runtime();
    let before = rt.block_on(served_by_pid(rip.addr(), "/api/items"));
    let mark = rip.log_mark();

    // The example's POST /api/items reads the whole JSON body before it answers.
    let mut stream = connect_raw(rip.addr());
    let head = concat!(
        "POST /api/items HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n",
        "Content-Length: 100\r\n\r\n",
    );
    stream.write_all(head.as_bytes()).unwrap();
    // The first 8 of the 100 bytes promised, then nothing.
    stream.write_all(b"{\"text\":").unwrap();
    let started = Instant::now();
    let received = read_until_closed(&mut stream, Duration::from_secs(15));
    let elapsed = started.elapsed();
    let answer = String::from_utf8_lossy(&received).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408 "), "want a 408, got {answer:?} after {elapsed:?}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer:?}");
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(8),
        "408 after {elapsed:?}"
    );

    // Same worker, still serving; nothing took it for hung.
    let after = rt.block_on(served_by_pid(rip.addr(), "/api/items"));
    assert_eq!(after, before, "the worker changed");
    let logs = rip.logs();
    let suspicious: Vec<&String> = logs[mark..]
        .iter()
        .filter(|l| l.contains("worker hung") || l.contains("timed out") || l.contains("worker exited"))
        .collect();
    assert!(suspicious.is_empty(), "{suspicious:#?}");
    println!("faults: stalled_body status=408 after_ms={} worker_kept=true", elapsed.as_millis());
}

// ---------------------------------------------------------------------------------------
// Limits on what a request may carry
// ---------------------------------------------------------------------------------------

#[test]
fn oversized_heads_get_431_and_oversized_bodies_get_413_before_reaching_a_worker() {
    let rt = runtime();
    let rip = Rip::start(&["--workers", "1", "--max-body", "1k"]);
    let addr = rip.addr();

    // One header value past the 64 KiB head limit.
    let huge = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Huge: {}\r\n\r\n", "h".repeat(66 * 1024));
    assert_status(addr, huge.as_bytes(), 431, "a 66 KiB header");

    // 150 small headers, past the limit of 100.
    let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..150 {
        many.push_str(&format!("X-H{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    assert_status(addr, many.as_bytes(), 431, "150 headers");

    // A declared length over --max-body: refused from the head alone, so the body is not sent,
    // and the worker's served count moves only by the /whoami polls.
    let before = rt.block_on(whoami(addr));
    let declared = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n";
    assert_status(addr, declared, 413, "Content-Length: 2000");
    let after = rt.block_on(whoami(addr));
    assert_eq!(after.pid, before.pid, "the worker changed");
    assert_eq!(after.served, before.served + 1, "the 413'd request reached the worker");

    // A chunked body has no declared length: it is cut when it passes the limit.
    let mut chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n".to_vec();
    chunked.extend_from_slice(&[b'c'; 2000]);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    assert_status(addr, &chunked, 413, "a 2000-byte chunked body");

    // Within the limit, both pass.
    let reply = rt.block_on(async { Client::new(addr).post("/echo", vec![b'k'; 1024]).await }).unwrap();
    assert_eq!((reply.status, reply.body.len()), (StatusCode::OK, 1024));
    println!(
        "faults: limits huge_head=431 many_headers=431 content_length=413 chunked=413 worker_saw_413=false"
    );
}

// ---------------------------------------------------------------------------------------
// A crash-looping worker binary
// ---------------------------------------------------------------------------------------

#[test]
fn crash_looping_workers_back_off_and_recover_when_the_binary_is_fixed() {
    /// What the broken binary says before it exits 3.
    const BROKEN: &str = "rip-faults: this build is broken";
    /// The backoff ceiling (10 s) plus slack: the longest a fixed binary may wait for its turn.
    const RECOVER_WITHIN: Duration = Duration::from_secs(15);
    let real = Path::new(env!("CARGO_BIN_EXE_rip"));
    let builder = Rip::builder();
    let bin_dir = builder.dir().join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    let exe = bin_dir.join("rip");
    replace_file(&exe, |tmp| std::fs::copy(real, tmp).map(drop));
    // rip starts workers from its own path, so what is at that path now is what they run.
    let rip = builder.program(&exe).args(&["--workers", "2", "--queue-timeout", "200ms"]).start();
    rip.wait_all_ready();
    let rt = runtime();
    let originals = ready_workers(&rip);
    assert_eq!(originals.len(), 2, "{originals:?}");

    replace_file(&exe, |tmp| {
        std::fs::write(tmp, format!("#!/bin/sh\necho '{BROKEN}' >&2\nexit 3\n"))?;
        std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755))
    });
    let mark = rip.log_mark();
    for pid in &originals {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }

    // Both slots fail to restart, over and over, each time after a longer pause.
    let crashed = rip
        .wait_for_log_from(mark, |l| l.contains(" worker exited unexpectedly ") && l.contains(BROKEN), WAIT)
        .expect("a broken worker's exit was logged with what it wrote to stderr");
    assert_eq!(log_field(&crashed, "status"), Some("exit code 3"), "{crashed}");
    let mut delays: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let backed_off = wait_until(WAIT, || {
        delays = backoff_delays(&rip, mark);
        delays.values().any(|d| d.len() >= 4)
    });
    assert!(backed_off, "fewer than 4 backoffs in a slot: {delays:?}");
    for (slot, d) in &delays {
        assert!(d.windows(2).all(|w| w[1] > w[0] || w[1] == 10_000), "slot {slot} delays not growing: {d:?}");
    }

    // Nobody is ready; the front-end still answers, at once, with 503 and Retry-After.
    let (reply, waited) = rt.block_on(async {
        let started = Instant::now();
        (Client::new(rip.addr()).get("/").await.expect("GET /"), started.elapsed())
    });
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    assert_eq!(reply.headers.get(RETRY_AFTER).map(|v| v.as_bytes()), Some(&b"1"[..]));
    assert!(waited < Duration::from_secs(2), "503 after {waited:?}");

    replace_file(&exe, |tmp| std::fs::copy(real, tmp).map(drop));
    let fixed_at = Instant::now();
    let recovered = rt.block_on(async {
        let mut client = Client::new(rip.addr());
        let deadline = fixed_at + RECOVER_WITHIN;
        loop {
            let reply = client.get("/").await.expect("GET /");
            if reply.status == StatusCode::OK {
                return Some(fixed_at.elapsed());
            }
            assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let delays = backoff_delays(&rip, mark);
    println!(
        "faults: crash_loop exits={} backoffs={delays:?} recovered_after_ms={:?}",
        count_lines_from(&rip, mark, " worker exited unexpectedly "),
        recovered.map(|d| d.as_millis())
    );
    let recovered = recovered.unwrap_or_else(|| panic!("no 200 within {RECOVER_WITHIN:?} of the fix"));
    assert!(recovered < RECOVER_WITHIN);
    rip.wait_for_log_from(mark, |l| WorkerEvent::parse(l).is_some_and(|e| e.is("worker ready")), WAIT)
        .expect("a worker of the fixed binary became ready");
}

/// Writes a new file next to `path` with `write`, then renames it over `path`: a running
/// executable cannot be written to (ETXTBSY), but it can be replaced.
fn replace_file(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) {
    let tmp = path.with_extension("new");
    write(&tmp).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming over {}: {e}", path.display()));
}

/// Per slot, the `delay_ms` of each `worker restart backed off` line logged from `mark` on.
fn backoff_delays(rip: &Rip, mark: usize) -> BTreeMap<String, Vec<u64>> {
    let mut delays: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in &rip.logs()[mark..] {
        if !line.contains(" worker restart backed off ") {
            continue;
        }
        let slot = log_field(line, "slot").unwrap_or("?").to_string();
        let delay = log_field(line, "delay_ms").and_then(|d| d.parse().ok()).unwrap_or(0);
        delays.entry(slot).or_default().push(delay);
    }
    delays
}

// ---------------------------------------------------------------------------------------
// The runtime directory
// ---------------------------------------------------------------------------------------

#[test]
fn a_runtime_directory_owned_by_someone_else_or_open_to_others_is_refused() {
    let scratch = crate::harness::TempDir::new();

    let open = scratch.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    refused_runtime_dir(&open, "lets other users in");

    let target = scratch.path().join("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = scratch.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    refused_runtime_dir(&link, "symbolic link");

    // Another user's directory: only root can make one.
    if nix::unistd::geteuid().is_root() {
        let theirs = scratch.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        refused_runtime_dir(&theirs, "owned by uid 65534");
    } else {
        println!("faults: runtime_dir owned-by-another-user case skipped: not root");
    }
}

/// rip refuses to start with `dir` as its runtime directory: a non-zero exit and exactly one
/// stderr line, `rip: ...`, naming the directory and `why`.
#[track_caller]
fn refused_runtime_dir(dir: &Path, why: &str) {
    let mut rip = Rip::builder().runtime_dir(dir).env("RUST_BACKTRACE", "1").spawn();
    let status = rip.wait_exit(WAIT);
    let logs = rip.logs();
    assert!(status.code().is_some_and(|c| c != 0), "rip exited with {status}; stderr: {logs:#?}");
    assert_eq!(logs.len(), 1, "want one line on stderr: {logs:#?}");
    let line = &logs[0];
    assert!(line.starts_with("rip: "), "{line:?}");
    assert!(line.contains(dir.to_str().unwrap()), "{line:?} does not name {}", dir.display());
    assert!(line.contains(why), "{line:?} does not say {why:?}");
    assert!(!line.contains("panicked"), "{line:?}");
    assert!(rip.worker_pids().is_empty());
}

// ---------------------------------------------------------------------------------------
// A panicking handler
// ---------------------------------------------------------------------------------------

#[test]
fn a_panic_in_a_user_handler_costs_one_500_not_the_worker() {
    const PANICS: usize = 5;
    let rip = Rip::builder().program(example_binary()).args(&["--workers", "1"]).start();
    rip.wait_all_ready();
    let rt = runtime();
    let mark = rip.log_mark();

    let (pid, statuses) = rt.block_on(async {
        let mut client = Client::new(rip.addr());
        let created =
            client.post_json("/api/items", r#"{"text":"survive a panic"}"#).await.expect("POST /api/items");
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
        let note = created.json();
        let location = format!("/api/items/{}", note["id"]);
        let pid = served_by(&created);

        let mut statuses = Vec::new();
        for _ in 0..PANICS {
            let reply = client.get("/api/panic").await.expect("GET /api/panic");
            statuses.push(reply.status.as_u16());
            // The same process still answers, with the note it held before the panic.
            let reply = client.get(&location).await.expect("GET the note");
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            assert_eq!(served_by(&reply), pid, "another worker answered after a panic");
            assert_eq!(reply.json(), note);
        }
        (pid, statuses)
    });
    println!("faults: handler_panic panics={PANICS} statuses={statuses:?} worker_kept=true");
    assert_eq!(statuses, vec![500; PANICS]);
    assert!(is_running(pid));
    let exits = count_lines_from(&rip, mark, " worker exited");
    assert_eq!(exits, 0, "a worker exited after a handler panic");
}

// ---------------------------------------------------------------------------------------
// Retry safety
// ---------------------------------------------------------------------------------------

#[test]
fn a_post_whose_worker_dies_before_answering_gets_502_and_is_not_replayed() {
    const BLOCK_MS: u64 = 1500;
    let rt = runtime();
    let rip = Rip::start(&["--workers", "1"]);
    rip.wait_all_ready();
    let addr = rip.addr();
    let worker = *ready_workers(&rip).first().expect("a ready worker");

    // The worker's only thread sleeps in a handler, so the POST that follows is written to
    // its socket and never read: the worker may have it, and it never answers.
    let block = format!("/block/{BLOCK_MS}");
    let blocked = rt.spawn(async move { Client::new(addr).get(&block).await });
    assert!(
        wait_until(WAIT, || thread_sleeps(worker)),
        "the worker's thread never went to sleep in /block: wchan {:?}",
        std::fs::read_to_string(format!("/proc/{worker}/wchan"))
    );
    let posted = rt.spawn(async move { Client::new(addr).post("/echo", "do this once").await });
    if unread_bytes_to_workers(rip.pid()).is_none() {
        println!("faults: post_killed_before_answer skipped: `ss` (iproute2) is not available");
        return;
    }
    assert!(
        wait_until(WAIT, || unread_bytes_to_workers(rip.pid()).is_some_and(|n| n > 0)),
        "the POST never reached the worker's socket"
    );
    let mark = rip.log_mark();
    kill(Pid::from_raw(worker), Signal::SIGKILL).expect("killing the worker");

    let post = rt.block_on(posted).unwrap().expect("the POST is answered");
    assert_eq!(post.status, StatusCode::BAD_GATEWAY, "{}", post.text());
    // The GET in flight with it was idempotent: replayed on the replacement.
    let get = rt.block_on(blocked).unwrap().expect("the GET is answered");
    assert_eq!((get.status, get.text()), (StatusCode::OK, format!("blocked {BLOCK_MS} ms")));
    // The replacement saw that GET and this poll, and never the POST.
    let replacement = rt.block_on(whoami(addr));
    assert_ne!(replacement.pid, worker);
    assert_eq!(replacement.served, 2, "the replacement served more than the GET and this poll");
    let failed = rip
        .wait_for_log_from(mark, |l| l.contains(" request failed ") && l.contains("method=POST"), WAIT)
        .expect("the POST's failure was logged");
    assert_eq!(log_field(&failed, "status"), Some("502"), "{failed}");
    println!("faults: post_killed_before_answer status=502 replayed=false get_replayed_status=200");
}

#[test]
fn a_post_whose_worker_dies_mid_response_is_cut_off_and_not_replayed() {
    let rt = runtime();
    // Round-robin, so that /whoami polls visit both workers in turn.
    let rip = Rip::start(&["--workers", "2", "--balance", "round-robin"]);
    rip.wait_all_ready();
    let addr = rip.addr();

    rt.block_on(async {
        let mut polls = Client::new(addr);
        let mut census = Census::default();
        census.until(&mut polls, |c| c.workers() == 2).await;

        // A POST /echo whose body the test streams piece by piece and never finishes.
        let (pieces, body) = ChannelBody::new();
        pieces.send(Bytes::from_static(b"first piece;")).await.unwrap();
        let mut poster = Client::new(addr);
        poster.timeout = Duration::from_secs(20);
        let response = poster.post_stream("/echo", body).await.expect("POST /echo headers");
        assert_eq!(response.status(), StatusCode::OK);
        let mut echoed = response.into_body();
        let first = echoed.frame().await.expect("an echoed frame").expect("echoed data");
        assert_eq!(first.into_data().ok().as_deref(), Some(&b"first piece;"[..]));

        // The worker that has the POST is the one whose count includes a request not ours.
        census.until(&mut polls, |c| c.holders().len() == 1).await;
        let holder = census.holders()[0];
        let others: Vec<i32> = census.pids().into_iter().filter(|p| *p != holder).collect();
        let mark = rip.log_mark();
        kill(Pid::from_raw(holder), Signal::SIGKILL).expect("killing the worker with the POST");
        let _ = pieces.send(Bytes::from_static(b"second piece;")).await;

        // The response breaks off: no clean end of the echo.
        let mut outcome = "a clean end";
        while let Some(frame) = tokio::time::timeout(Duration::from_secs(10), echoed.frame())
            .await
            .expect("the broken response ends within 10 s")
        {
            if frame.is_err() {
                outcome = "an error";
                break;
            }
        }
        assert_eq!(outcome, "an error", "the echo of a POST whose worker died ended cleanly");

        // Nobody else ever saw it: every other worker's count (the replacement's too, once it
        // answers) is all our polls.
        census.until(&mut polls, |c| others.iter().all(|p| c.polled_since(*p) >= 2)).await;
        for pid in census.pids().into_iter().filter(|p| *p != holder) {
            assert_eq!(census.extra(pid), 0, "the POST was replayed to {pid}: {census:?}");
        }
        drop(pieces);
        let logs = rip.logs();
        let replayed: Vec<&String> =
            logs[mark..].iter().filter(|l| l.contains("POST") && l.contains("retried")).collect();
        assert!(replayed.is_empty(), "{replayed:#?}");
        println!("faults: post_killed_mid_response outcome=broken_response replayed=false");
    });
}

#[test]
fn an_idempotent_get_whose_worker_dies_is_retried_on_another_and_succeeds() {
    const SLEEP_MS: u64 = 2000;
    let rt = runtime();
    let rip = Rip::start(&["--workers", "2", "--balance", "round-robin"]);
    rip.wait_all_ready();
    let addr = rip.addr();

    let (reply, elapsed, holder, mark) = rt.block_on(async {
        let mut polls = Client::new(addr);
        let mut census = Census::default();
        census.until(&mut polls, |c| c.workers() == 2).await;

        let started = Instant::now();
        let sleeping = tokio::spawn(async move {
            let mut client = Client::new(addr);
            client.timeout = Duration::from_secs(20);
            client.get(&format!("/sleep/{SLEEP_MS}")).await
        });
        census.until(&mut polls, |c| c.holders().len() == 1).await;
        let holder = census.holders()[0];
        assert!(!sleeping.is_finished(), "the GET finished before its worker could be killed");
        let mark = rip.log_mark();
        kill(Pid::from_raw(holder), Signal::SIGKILL).expect("killing the worker with the GET");
        let reply = sleeping.await.unwrap().expect("the GET whose worker died");
        (reply, started.elapsed(), holder, mark)
    });

    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), format!("slept {SLEEP_MS} ms"));
    let retried = rip
        .wait_for_log_from(mark, |l| l.contains("worker failed before responding, request retried"), WAIT)
        .expect("the retry was logged");
    let dead = rip
        .wait_for_log_from(mark, |l| WorkerEvent::parse(l).is_some_and(|e| e.pid == holder), WAIT)
        .map(|l| WorkerEvent::parse(&l).unwrap().worker)
        .expect("the killed worker's exit was logged");
    assert_eq!(log_field(&retried, "worker"), Some(dead.as_str()), "{retried}");
    println!("faults: get_worker_killed status=200 retried=true elapsed_ms={}", elapsed.as_millis());
}

/// What each worker told `/whoami`: per pid, its latest `served` count and how many of the
/// polls it answered. The difference is what others sent it.
#[derive(Debug, Default)]
struct Census {
    seen: HashMap<i32, (u64, u64)>,
    /// Polls each pid answered since it was first found holding a request.
    since: HashMap<i32, u64>,
}

impl Census {
    async fn poll(&mut self, client: &mut Client) {
        let reply = client.get("/whoami").await.expect("GET /whoami");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let who = WhoAmI::parse(&reply.body).expect("a /whoami answer");
        let entry = self.seen.entry(who.pid).or_default();
        entry.0 = who.served;
        entry.1 += 1;
        *self.since.entry(who.pid).or_default() += 1;
    }

    /// Polls until `done` holds.
    async fn until(&mut self, client: &mut Client, done: impl Fn(&Census) -> bool) {
        self.since.clear();
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            assert!(Instant::now() < deadline, "the workers never got there: {self:?}");
            self.poll(client).await;
        }
    }

    fn workers(&self) -> usize {
        self.seen.len()
    }

    fn pids(&self) -> Vec<i32> {
        self.seen.keys().copied().collect()
    }

    /// Requests `pid` received that were not our polls.
    fn extra(&self, pid: i32) -> u64 {
        self.seen.get(&pid).map_or(0, |(served, polls)| served.saturating_sub(*polls))
    }

    /// Workers that received a request that was not ours.
    fn holders(&self) -> Vec<i32> {
        self.pids().into_iter().filter(|p| self.extra(*p) > 0).collect()
    }

    /// Polls `pid` answered within the current [`Self::until`].
    fn polled_since(&self, pid: i32) -> u64 {
        self.since.get(&pid).copied().unwrap_or(0)
    }
}

/// A request body the test feeds piece by piece through a channel; it ends when the sender is
/// dropped.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl ChannelBody {
    fn new() -> (mpsc::Sender<Bytes>, ChannelBody) {
        let (tx, rx) = mpsc::channel(16);
        (tx, ChannelBody(rx))
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut().0.poll_recv(cx).map(|piece| piece.map(|b| Ok(Frame::data(b))))
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// True while the main (and, in a worker with one runtime thread, only) thread of `pid` sleeps
/// in `nanosleep`, as a blocking handler makes it; an idle worker waits in `epoll` instead.
fn thread_sleeps(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/wchan")).is_ok_and(|w| w.contains("nanosleep"))
}

/// Bytes that the process `pid` wrote to Unix sockets and that no peer has read yet (the
/// Send-Q of `ss`), or `None` when `ss` cannot be run. For `rip serve`, these are requests
/// written to a worker that is not reading.
fn unread_bytes_to_workers(pid: i32) -> Option<u64> {
    let out = std::process::Command::new("ss").args(["-x", "-H", "-p", "-n"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let owner = format!("pid={pid},");
    let unread = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&owner))
        .filter_map(|l| {
            // Netid State Recv-Q Send-Q Local Port Peer Port Process
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.get(1) == Some(&"ESTAB")).then(|| fields.get(3)?.parse::<u64>().ok()).flatten()
        })
        .sum();
    Some(unread)
}

/// Pids of the workers ready now: logged ready, not logged gone, and still running.
fn ready_workers(rip: &Rip) -> Vec<i32> {
    let mut ready: BTreeMap<String, i32> = BTreeMap::new();
    for line in rip.logs() {
        let Some(event) = WorkerEvent::parse(&line) else { continue };
        match event.event.as_str() {
            "worker ready" => {
                ready.insert(event.worker, event.pid);
            }
            "worker exited" | "worker exited unexpectedly" | "worker hung, killed" => {
                ready.remove(&event.worker);
            }
            _ => {}
        }
    }
    ready.into_values().filter(|pid| is_running(*pid)).collect()
}

/// `line` is the worker event `event` about worker `worker` (`slot/generation`).
fn event_of(line: &str, event: &str, worker: &str) -> bool {
    WorkerEvent::parse(line).is_some_and(|e| e.is(event) && e.worker == worker)
}

fn count_lines(rip: &Rip, needle: &str) -> usize {
    count_lines_from(rip, 0, needle)
}

fn count_lines_from(rip: &Rip, mark: usize, needle: &str) -> usize {
    rip.logs()[mark..].iter().filter(|l| l.contains(needle)).count()
}

/// A load report in a few lines, for assertion messages.
fn summary(report: &LoadReport) -> String {
    format!(
        "sent={} ok={} failed={} statuses={:?} timed_out={} errors={:?}",
        report.sent, report.ok, report.failed, report.statuses, report.timed_out, report.errors
    )
}

async fn whoami(addr: SocketAddr) -> WhoAmI {
    let reply = Client::new(addr).get("/whoami").await.expect("GET /whoami");
    WhoAmI::parse(&reply.body).unwrap_or_else(|| panic!("not a /whoami answer: {}", reply.text()))
}

/// The pid of the example's worker that answers `GET path`.
async fn served_by_pid(addr: SocketAddr, path: &str) -> i32 {
    let reply = Client::new(addr).get(path).await.expect("GET from the example");
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    served_by(&reply)
}

/// A small xorshift generator: which worker dies is random, and the seed is printed so that a
/// failing sequence can be told apart from a lucky one.
struct Rng {
    seed: u64,
    state: u64,
}

impl Rng {
    fn seeded() -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64);
        let seed = nanos | 1;
        Rng { seed, state: seed }
    }

    fn below(&mut self, n: usize) -> usize {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        (self.state % n as u64) as usize
    }
}

// ---------------------------------------------------------------------------------------
// Clients that abandon uploads
// ---------------------------------------------------------------------------------------

/// Uploads cut off midway must never hold up the requests after them. With every request
/// multiplexed on one HTTP/2 connection per worker, flow control ties streams together, and
/// a release build under wrk stalled that way (timing-dependent: this test's debug build did
/// not show it); requests with bodies now get connections of their own.
#[test]
fn clients_abandoning_uploads_midway_never_stall_the_requests_after_them() {
    let rt = runtime();
    let rip = Rip::start(&["--workers", "1", "--access-log", "off"]);
    rip.wait_all_ready();
    for round in 0..5 {
        // Clients posting 1 MiB bodies back to back on keep-alive connections, cut off
        // mid-exchange after a while, as a load generator stops or a browser tab closes.
        rt.block_on(async {
            let clients: Vec<_> = (0..4)
                .map(|_| {
                    let addr = rip.addr();
                    tokio::spawn(async move {
                        let mut client = Client::new(addr);
                        loop {
                            let _ = client.post("/echo", vec![b'x'; 1 << 20]).await;
                        }
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(300)).await;
            for client in clients {
                client.abort();
            }
        });
        // Everything after them is answered, bodies and all.
        let (echo, hello) = rt.block_on(async {
            let mut client = Client::new(rip.addr());
            let body = vec![b'y'; 256 * 1024];
            let echo = tokio::time::timeout(WAIT, client.post("/echo", body.clone())).await;
            let hello = tokio::time::timeout(WAIT, client.get("/")).await;
            (echo.map(|r| r.map(|r| r.body.len() == body.len())), hello.map(|r| r.map(|r| r.status)))
        });
        assert!(matches!(echo, Ok(Ok(true))), "round {round}: echo after abandoned uploads: {echo:?}");
        assert!(
            matches!(hello, Ok(Ok(StatusCode::OK))),
            "round {round}: GET after abandoned uploads: {hello:?}"
        );
    }
    println!("faults: abandoned_uploads rounds=5 later_requests_ok=true");
}
