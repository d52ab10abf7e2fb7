//! `--shards N`: the front-end as N threads, each accepting from the one listener and keeping
//! its own connections to the workers. Every shard serves under load; a worker killed under
//! load, recycling, a reload and a graceful stop fail no request with two shards as with
//! one; `--max-connections` counts the connections of every shard together.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::harness::{no_failures, ready_workers, runtime, summary, wait_until, Client, Load, Rip, WAIT};

/// CPU ticks (user + system) of each of `pid`'s threads, by thread name.
fn thread_ticks(pid: i32) -> BTreeMap<String, u64> {
    let mut ticks = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let path = task.path();
        let (Ok(comm), Ok(stat)) =
            (std::fs::read_to_string(path.join("comm")), std::fs::read_to_string(path.join("stat")))
        else {
            continue;
        };
        // After the parenthesised name: state is field 3, utime 14 and stime 15.
        let fields: Vec<&str> =
            stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
        let used = fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
            + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        *ticks.entry(comm.trim().to_string()).or_default() += used;
    }
    ticks
}

#[test]
fn every_shard_serves_and_a_killed_worker_fails_no_request() {
    let rt = runtime();
    let rip =
        Rip::start(&["--workers", "2", "--shards", "2", "--queue-timeout", "15s", "--access-log", "off"]);
    rip.wait_all_ready();
    assert!(thread_ticks(rip.pid()).contains_key("rip-shard-1"), "no second shard thread");
    let before = thread_ticks(rip.pid());

    let load = Load::get("/whoami").clients(32).total(6000).deadline(Duration::from_secs(60));
    let traffic = load.handle();
    let running = rt.spawn(load.run(rip.addr()));
    assert!(wait_until(WAIT, || traffic.done() >= 500), "load did not get going");
    for _ in 0..3 {
        let ready = ready_workers(&rip);
        let victim = *ready.first().expect("a ready worker");
        kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
        let done = traffic.done();
        assert!(wait_until(WAIT, || traffic.done() >= done + 500), "load stalled after a kill");
    }
    let report = rt.block_on(running).unwrap();
    no_failures(&report);
    assert_eq!(report.ok, 6000, "{}", summary(&report));

    let after = thread_ticks(rip.pid());
    let used = |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    // 32 connections opened at once, spread over the shards: each serves its own share.
    let (first, second) = (used("rip"), used("rip-shard-1"));
    println!("shards: cpu ticks first={first} second={second}");
    let share = second as f64 / (first + second).max(1) as f64;
    assert!((0.2..=0.8).contains(&share), "the second shard did {share:.2} of the work: {after:?}");
}

#[test]
fn recycling_every_5_requests_with_2_shards_fails_no_request() {
    const REQUESTS: usize = 2000;
    let rt = runtime();
    let rip = Rip::start(&["--workers", "2", "--shards", "2", "--max-requests", "5", "--access-log", "off"]);
    rip.wait_all_ready();
    let report = rt.block_on(
        Load::get("/whoami").clients(16).total(REQUESTS).deadline(Duration::from_secs(90)).run(rip.addr()),
    );
    assert_eq!((report.ok, report.failed), (REQUESTS, 0), "{}", summary(&report));
    // The budget is one count over every shard: never more than twice it.
    let most = report.whoami().iter().map(|w| w.served).max().unwrap_or(0);
    assert!(most <= 10, "a worker served {most} requests with --max-requests 5");
    assert!(report.pids().len() >= REQUESTS / 10, "only {} distinct pids answered", report.pids().len());
}

#[test]
fn sigterm_with_2_shards_lets_every_request_in_flight_finish() {
    let rt = runtime();
    let mut rip = Rip::start(&["--workers", "2", "--shards", "2", "--access-log", "off"]);
    rip.wait_all_ready();
    // Sixteen connections, so both shards hold some, each with a slow request in flight.
    let slow: Vec<_> = (0..16)
        .map(|_| {
            let addr = rip.addr();
            rt.spawn(async move { Client::new(addr).get("/sleep/1500").await })
        })
        .collect();
    assert!(
        wait_until(WAIT, || crate::harness::Control::of(&rip).status().in_flight == 16),
        "the 16 requests did not all reach the workers"
    );
    rip.signal(Signal::SIGTERM);
    for request in slow {
        let reply = rt.block_on(request).unwrap().expect("a request in flight at SIGTERM");
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert!(rip.wait_exit(Duration::from_secs(20)).success());
}

/// One `--max-connections` for the whole front-end: with a limit of 4, four idle keep-alive
/// connections (whichever shards took them) leave a fifth unserved until one of them closes.
#[test]
fn max_connections_counts_the_connections_of_every_shard() {
    let rip =
        Rip::start(&["--workers", "1", "--shards", "2", "--max-connections", "4", "--access-log", "off"]);
    rip.wait_all_ready();
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", rip.addr());
    let served = |stream: &mut TcpStream| -> bool {
        stream.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut buf = [0u8; 512];
        matches!(stream.read(&mut buf), Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 200"))
    };
    let mut open: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(rip.addr()).unwrap()).collect();
    for stream in &mut open {
        assert!(served(stream), "one of the first four connections was not served");
    }
    let mut fifth = TcpStream::connect(rip.addr()).unwrap();
    assert!(!served(&mut fifth), "a fifth connection was served past --max-connections 4");
    drop(open.pop());
    fifth.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 512];
    let n = fifth.read(&mut buf).expect("the fifth connection is served once one closes");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
}
