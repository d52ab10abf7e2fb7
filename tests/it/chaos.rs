//! Workers dying under load, and which requests may be replayed when they do: random SIGKILLs
//! cost no request; a GET whose worker died is retried on another worker, while a POST that a
//! dead worker may have received gets a 502 or a cut-off response and never reaches a second
//! worker.
//!
//! The only paced loop is the fault injection itself ("kill a worker every 300 ms"). Tests
//! print one `faults: ...` line with their figures, shown with `-- --nocapture`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use hyper::StatusCode;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc;

use crate::harness::{
    lines_after, log_field, ready_workers, runtime, summary, thread_sleeps, unread_bytes_to_workers,
    wait_until, whoami, Client, Load, Rip, WhoAmI, WorkerEvent, WAIT,
};

#[test]
fn sigkill_of_random_workers_under_load_fails_no_request_with_2_workers() {
    sigkill_of_random_workers_under_load_fails_no_request(2, &[]);
}

#[test]
fn sigkill_of_random_workers_under_load_fails_no_request_with_4_workers() {
    sigkill_of_random_workers_under_load_fails_no_request(4, &[]);
}

/// The default is a shard per core; one shard keeps every connection on one thread.
#[test]
fn sigkill_of_random_workers_under_load_fails_no_request_with_1_shard() {
    sigkill_of_random_workers_under_load_fails_no_request(2, &["--shards", "1"]);
}

/// `extra`: more flags for `rip serve`.
fn sigkill_of_random_workers_under_load_fails_no_request(workers: usize, extra: &[&str]) {
    /// The fault pattern: one SIGKILL this often, for this long.
    const KILL_EVERY: Duration = Duration::from_millis(300);
    const KILLING_FOR: Duration = Duration::from_secs(10);
    let rt = runtime();
    // A queue timeout well past the kill pace lets requests wait out a moment with no worker
    // ready instead of getting a 503 by design. Any failure left is then a fault.
    let workers_arg = workers.to_string();
    let mut args = vec!["--workers", &workers_arg, "--queue-timeout", "15s", "--access-log", "off"];
    args.extend_from_slice(extra);
    let rip = Rip::start(&args);
    rip.wait_all_ready();

    let load = Load::get("/whoami").clients(32).total(usize::MAX).deadline(Duration::from_secs(60));
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
    // A worker that was ready when it was killed is replaced at once, not backed off as a
    // start failure: the pool is whole again within a second of the last kill.
    let last_kill = Instant::now();
    assert!(
        wait_until(Duration::from_secs(1), || ready_workers(&rip).len() == workers),
        "the pool is at {} of {workers} workers a second after the last kill",
        ready_workers(&rip).len()
    );
    let whole_after_ms = last_kill.elapsed().as_millis();
    // Requests go on after the last kill, through the replacements.
    let after = traffic.done();
    assert!(wait_until(WAIT, || traffic.done() >= after + 200), "load stalled after the kills");
    traffic.stop();
    let report = rt.block_on(running).unwrap();

    println!(
        "faults: kill_under_load workers={workers} clients=32 sent={} failed={} kills={kills} statuses={:?} logged_502={} \
         seed={:#x} distinct_pids={} restarts={} pool_whole_after_ms={whole_after_ms}",
        report.sent,
        report.failed,
        report.statuses,
        rip.logs().iter().filter(|l| l.contains(" request failed ") && l.contains("status=502")).count(),
        rng.seed,
        report.pids().len(),
        lines_after(&rip, 0, " worker exited unexpectedly ").len(),
    );
    assert!(kills >= 10, "only {kills} workers were killed");
    // What this guards: when the killed worker was the last one in the rotation, a GET must
    // not spend its retries on that worker's other pooled connections, which still look open
    // until their tasks see the EOF; it waits, within its queue timeout, for the replacement.
    assert_eq!(report.failed, 0, "{}", summary(&report));
    assert!(!report.timed_out);
}

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
