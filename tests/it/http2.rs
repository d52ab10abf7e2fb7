//! HTTP/2 from clients with prior knowledge (h2c) on the plain listener: curl and hyper's
//! client reach every worker through the same proxy path as HTTP/1, bodies streamed both
//! ways; each known HTTP/2 attack is bounded (the attacker's connection ends, other clients
//! keep being served, the front-end's memory stays put); an idle connection is sent GOAWAY.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;

use crate::harness::h2raw::{
    field, frame, get_block, RawH2, CONTINUATION, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PING,
    REFUSED_STREAM, RST_STREAM, SETTINGS,
};
use crate::harness::{memory, runtime, Client, Rip, WhoAmI, WAIT};

/// `n` requests on one HTTP/2 connection, all in flight at once.
async fn h2_requests(
    addr: std::net::SocketAddr,
    n: usize,
    request: impl Fn() -> http::Request<Full<Bytes>>,
) -> Vec<(StatusCode, Bytes)> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connecting");
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("an HTTP/2 handshake with prior knowledge");
    tokio::spawn(conn);
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let mut sender = sender.clone();
            let req = request();
            tokio::spawn(async move {
                let response = sender.send_request(req).await.expect("an HTTP/2 response");
                let status = response.status();
                (status, response.into_body().collect().await.expect("the body").to_bytes())
            })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

#[test]
fn h2c_with_prior_knowledge_reaches_every_worker_with_bodies_streamed_both_ways() {
    let rip = Rip::start(&["--workers", "2"]);
    rip.wait_all_ready();
    let addr = rip.addr();

    let curl = std::process::Command::new("curl")
        .args(["-s", "-i", "--http2-prior-knowledge", &format!("http://{addr}/")])
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&curl.stdout);
    assert!(text.starts_with("HTTP/2 200"), "{text}");
    assert!(text.contains("Hello from rip worker"), "{text}");

    let rt = runtime();
    let uri = format!("http://{addr}/whoami");
    let answers = rt
        .block_on(h2_requests(addr, 64, || http::Request::get(&uri).body(Full::new(Bytes::new())).unwrap()));
    assert!(answers.iter().all(|(s, _)| *s == StatusCode::OK), "{answers:?}");
    let pids: std::collections::BTreeSet<i32> =
        answers.iter().map(|(_, body)| WhoAmI::parse(body).expect("a /whoami answer").pid).collect();
    assert_eq!(pids.len(), 2, "64 streams on one connection spread over both workers: {pids:?}");

    // A body larger than any window: flow control both ways, through the proxy.
    let body: Bytes = (0..4 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
    let uri = format!("http://{addr}/echo");
    let echoed = rt
        .block_on(h2_requests(addr, 2, || http::Request::post(&uri).body(Full::new(body.clone())).unwrap()));
    for (status, back) in echoed {
        assert_eq!(status, StatusCode::OK);
        assert!(back == body, "echoed {} bytes of {}", back.len(), body.len());
    }
}

/// The front-end still answers an HTTP/1 client.
fn still_serving(rip: &Rip, attack: &str) {
    let reply = runtime().block_on(async { Client::new(rip.addr()).get("/").await });
    let reply = reply.unwrap_or_else(|e| panic!("after the {attack}: {e}"));
    assert_eq!(reply.status, StatusCode::OK, "after the {attack}");
}

/// A GOAWAY, or the connection's end, within `WAIT`: the server stopped this client.
fn stopped(raw: &mut RawH2, attack: &str) -> Option<u32> {
    let started = Instant::now();
    let goaway = raw.until(WAIT, |f| f.kind == GOAWAY);
    assert!(started.elapsed() < WAIT, "the {attack} connection was neither closed nor sent GOAWAY");
    goaway.and_then(|f| f.error_code())
}

#[test]
fn each_http2_flood_is_bounded_and_other_clients_keep_being_served() {
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    let rip = Rip::start(&["--workers", "2", "--access-log", "off"]);
    rip.wait_all_ready();
    let addr = rip.addr();
    let host = addr.to_string();
    still_serving(&rip, "start");
    let before = memory(rip.pid()).expect("rip's memory").resident;

    // Rapid reset (CVE-2023-44487): streams opened and cancelled at once, over and over.
    let mut raw = RawH2::open(addr);
    let mut burst = Vec::new();
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        burst.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &get_block("/", &host, &[])));
        burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    let _ = raw.send(&burst);
    assert_eq!(stopped(&mut raw, "rapid reset"), Some(ENHANCE_YOUR_CALM));
    still_serving(&rip, "rapid reset");

    // CONTINUATION flood (CVE-2024-27316): a header block that never ends.
    let mut raw = RawH2::open(addr);
    let _ = raw.send(&frame(HEADERS, END_STREAM, 1, &get_block("/", &host, &[])));
    let mut filler = Vec::new();
    while filler.len() < 16 * 1024 - 64 {
        field(&mut filler, "x-filler", &[b'f'; 1000]);
    }
    let continuation = frame(CONTINUATION, 0, 1, &filler);
    let mut sent = 0usize;
    while sent < 32 << 20 && raw.send(&continuation).is_ok() {
        sent += continuation.len();
    }
    stopped(&mut raw, "CONTINUATION flood");
    assert!(sent < 32 << 20, "the server read 32 MiB of one header block");
    still_serving(&rip, "CONTINUATION flood");

    // SETTINGS and PING floods (CVE-2019-9515, -9512): acknowledgements never read.
    for (attack, flood) in
        [("SETTINGS flood", frame(SETTINGS, 0, 0, &[])), ("PING flood", frame(PING, 0, 0, &[7; 8]))]
    {
        let mut raw = RawH2::open(addr);
        let burst: Vec<u8> = flood.iter().copied().cycle().take(flood.len() * 20_000).collect();
        let started = Instant::now();
        for _ in 0..20 {
            if raw.send(&burst).is_err() || started.elapsed() > Duration::from_secs(20) {
                break;
            }
        }
        still_serving(&rip, attack);
    }

    // An oversized header list: refused, never forwarded.
    let mut raw = RawH2::open(addr);
    let big = vec![b'b'; 100 * 1024];
    let block = get_block("/headers", &host, &[("x-big", &big)]);
    let (first, rest) = block.split_at(16 * 1024);
    let mut frames = frame(HEADERS, END_STREAM, 1, first);
    let chunks: Vec<&[u8]> = rest.chunks(16 * 1024).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let flags = if i + 1 == chunks.len() { END_HEADERS } else { 0 };
        frames.extend(frame(CONTINUATION, flags, 1, chunk));
    }
    let _ = raw.send(&frames);
    let answer = raw.until(WAIT, |f| f.kind == HEADERS || f.kind == RST_STREAM || f.kind == GOAWAY);
    match answer {
        Some(f) if f.kind == HEADERS => {
            // :status 431 from the static table is not indexed; any answer but 200 will do.
            assert_ne!(f.payload.first(), Some(&0x88), "a 100 KiB header list was answered 200");
        }
        _ => {}
    }
    still_serving(&rip, "oversized header list");

    // More streams at once than the server allows: the excess is refused.
    let mut raw = RawH2::open(addr);
    let mut burst = Vec::new();
    for i in 0..200u32 {
        burst.extend(frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            2 * i + 1,
            &get_block("/sleep/1000", &host, &[]),
        ));
    }
    let _ = raw.send(&burst);
    let mut refused = 0;
    let deadline = Instant::now() + WAIT;
    while let Some(f) = raw.next_frame(deadline.saturating_duration_since(Instant::now())) {
        if f.kind == RST_STREAM && f.error_code() == Some(REFUSED_STREAM) {
            refused += 1;
        }
        if f.kind == GOAWAY || refused >= 72 {
            break;
        }
    }
    assert!(refused >= 72, "only {refused} of 200 streams refused past the limit of 128");
    still_serving(&rip, "too many streams");

    let after = memory(rip.pid()).expect("rip's memory").resident;
    assert!(after < before + (32 << 20), "the front-end grew from {before} to {after} bytes");
}

#[test]
fn an_idle_http2_connection_is_sent_goaway_after_the_header_timeout() {
    let rip = Rip::start(&["--workers", "1", "--header-timeout", "1s"]);
    rip.wait_all_ready();
    let mut raw = RawH2::open(rip.addr());
    let opened = Instant::now();
    let goaway = raw.until(WAIT, |f| f.kind == GOAWAY);
    assert!(goaway.is_some(), "no GOAWAY for an idle connection");
    let after = opened.elapsed();
    assert!(after >= Duration::from_millis(900) && after < Duration::from_secs(5), "GOAWAY after {after:?}");
}
