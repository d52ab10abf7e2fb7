//! How much rip takes in before it says no: past `--max-in-flight` and `--queue-timeout`, 503
//! with `Retry-After`, each in about the queue timeout, while the front-end's memory stays
//! bounded; heads over 64 KiB or 100 fields get 431, and bodies over `--max-body` 413, before
//! they reach a worker.
//!
//! Tests print one `faults: ...` line with their figures, shown with `-- --nocapture`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::RETRY_AFTER;
use hyper::StatusCode;

use crate::harness::{assert_status, memory, runtime, whoami, Client, Reply, Rip, WAIT};

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
