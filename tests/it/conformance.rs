//! Request conformance, class by class from RFC 9110 and RFC 9112: each case names the rule
//! it checks and what rip must do — refuse the request (one answer, then the connection
//! closes) or answer it and keep the connection for the next request.
//!
//! Every case runs three times on a connection of its own: alone; after a request with an
//! `Upgrade` field and no `Connection: upgrade` (the worker answers it, nothing switches);
//! and after a WebSocket handshake the worker declines. A declined upgrade must leave the
//! checks on for the rest of the connection, or the bytes after it are judged by nobody.
//! Each is followed by a sentinel request, all in one write: every run is a pipeline (RFC 9112
//! §9.3.2), whose answers must come in order, and the sentinel is answered only if the
//! connection stayed in step, so a request hidden inside a refused one would show up as an
//! extra answer.

use std::net::SocketAddr;

use crate::framing::{exchange, Answer};
use crate::harness::Rip;

/// What rip must do with a case.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// Answer with this status and close the connection: nothing after it is read.
    Refused(u16),
    /// Answer with this status and serve the next request on the same connection.
    Served(u16),
}

struct Case {
    rule: &'static str,
    request: &'static [u8],
    want: Want,
}

use Want::{Refused, Served};

const CASES: &[Case] = &[
    // Request line (RFC 9112 §3).
    Case { rule: "§3: a request line as it should be", request: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", want: Served(200) },
    Case { rule: "§3: one SP between the parts, not two", request: b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", want: Refused(400) },
    Case { rule: "§3: no whitespace after the version", request: b"GET / HTTP/1.1 \r\nHost: x\r\n\r\n", want: Refused(400) },
    Case { rule: "§3: the method is a token", request: b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", want: Refused(400) },
    Case { rule: "§3: no whitespace inside the target", request: b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", want: Refused(400) },
    Case { rule: "§2.3: HTTP/0.9 has no version and is not served", request: b"GET /\r\n\r\n", want: Refused(400) },
    Case { rule: "§2.3: a version that is not HTTP/1.x", request: b"GET / HTTP/3\r\nHost: x\r\n\r\n", want: Refused(400) },
    Case { rule: "§2.2: empty lines before a request line are skipped", request: b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", want: Served(200) },
    // Target forms (RFC 9112 §3.2).
    Case { rule: "§3.2.2: absolute-form is accepted", request: b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n", want: Served(200) },
    Case { rule: "§3.2.3: authority-form only with CONNECT", request: b"GET example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n", want: Refused(400) },
    Case { rule: "§3.2.4: asterisk-form only with OPTIONS", request: b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", want: Refused(400) },
    Case { rule: "§3.2.4: OPTIONS * is a request like any other", request: b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", want: Served(404) },
    Case { rule: "RFC 9110 §9.3.6: CONNECT is for forward proxies; rip is a gateway", request: b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", want: Refused(405) },
    // Host (RFC 9112 §3.2, RFC 9110 §7.2).
    Case { rule: "§3.2: HTTP/1.1 needs Host", request: b"GET / HTTP/1.1\r\n\r\n", want: Refused(400) },
    Case { rule: "§3.2: one Host only", request: b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", want: Refused(400) },
    Case { rule: "§3.2: Host is a host", request: b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", want: Refused(400) },
    Case { rule: "§3.2: Host's port is a port", request: b"GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n", want: Refused(400) },
    // Field syntax (RFC 9112 §5).
    Case { rule: "§5.1: no whitespace between a field name and its colon", request: b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", want: Refused(400) },
    Case { rule: "§5.2: obs-fold is refused", request: b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", want: Refused(400) },
    Case { rule: "§5.1: a field line has a colon", request: b"GET / HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", want: Refused(400) },
    Case { rule: "§2.2: a bare CR is refused", request: b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", want: Refused(400) },
    Case { rule: "§2.2: a bare LF ends no line", request: b"GET / HTTP/1.1\r\nHost: x\nX-A: a\r\n\r\n", want: Refused(400) },
    Case { rule: "§5: whitespace around a value is not part of it", request: b"GET / HTTP/1.1\r\nHost: x\r\nX-A: \t a \t\r\n\r\n", want: Served(200) },
    // Message framing (RFC 9112 §6).
    Case { rule: "§6.2: a Content-Length body", request: b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", want: Served(200) },
    Case { rule: "§6.3: Content-Length with Transfer-Encoding is refused", request: b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", want: Refused(400) },
    Case { rule: "§6.3: Content-Length twice, even equal, is refused", request: b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", want: Refused(400) },
    Case { rule: "§6.3: a Content-Length list is refused", request: b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello", want: Refused(400) },
    Case { rule: "§8.6 of RFC 9110: Content-Length is digits only", request: b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello", want: Refused(400) },
    Case { rule: "§6.1: Transfer-Encoding in HTTP/1.0 means faulty framing", request: b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", want: Refused(400) },
    // Chunked coding (RFC 9112 §7.1).
    Case { rule: "§7.1: a chunked body with an extension and a trailer", request: b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\nX-T: 1\r\n\r\n", want: Served(200) },
    Case { rule: "§7.1.1: whitespace is allowed before a chunk extension", request: b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5 ;a\r\nhello\r\n0\r\n\r\n", want: Served(200) },
    Case { rule: "§7.1: chunk-size is hex digits", request: b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", want: Refused(400) },
    Case { rule: "§7.1: no whitespace after a chunk size without an extension", request: b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0 \r\n\r\n", want: Refused(400) },
    Case { rule: "§7.1: chunk data ends with CRLF", request: b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\n0\r\n\r\n", want: Refused(400) },
    Case { rule: "§7.1: a chunk size that overflows", request: b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\nhello\r\n0\r\n\r\n", want: Refused(400) },
    // Transfer codings (RFC 9112 §6.1, §7).
    Case { rule: "§6.1: a coding rip does not decode gets 501", request: b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", want: Refused(501) },
    Case { rule: "§6.3: chunked must be the last coding", request: b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", want: Refused(400) },
    Case { rule: "§7: chunked is applied once", request: b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", want: Refused(501) },
];

/// Requests a case may follow on its connection, with the statuses they get.
const PREFIXES: &[(&str, &[u8], &[u16])] = &[
    ("alone", b"", &[]),
    ("after an Upgrade field alone", b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: foo\r\n\r\n", &[200]),
    (
        "after a declined WebSocket handshake",
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        &[200],
    ),
];

/// Answered only if the connection is still in step after the case.
const SENTINEL: &[u8] = b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

#[test]
fn every_request_class_gets_what_rfc_9112_asks_alone_and_after_a_declined_upgrade() {
    let rip = Rip::start(&["--workers", "2", "--header-timeout", "60s", "--access-log", "off"]);
    rip.wait_all_ready();
    let addr = rip.addr();
    let runs: Vec<_> =
        PREFIXES.iter().flat_map(|prefix| CASES.iter().map(move |case| (prefix, case))).collect();
    let failures: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = runs
            .chunks(runs.len().div_ceil(8))
            .map(|chunk| {
                scope.spawn(move || chunk.iter().filter_map(|(p, c)| check(addr, p, c)).collect::<Vec<_>>())
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a conformance thread panicked")).collect()
    });
    println!("faults: conformance cases={} runs={} failed={}", CASES.len(), runs.len(), failures.len());
    assert!(
        failures.is_empty(),
        "{} of {} runs broke their rule:\n{}",
        failures.len(),
        runs.len(),
        failures.join("\n")
    );
}

/// Runs one case after one prefix; the failure, described, if rip did not do what it must.
fn check(addr: SocketAddr, (name, prefix, before): &(&str, &[u8], &[u16]), case: &Case) -> Option<String> {
    let request = [*prefix, case.request, SENTINEL].concat();
    let answers: Vec<Answer> = exchange(addr, &request);
    let got: Vec<u16> = answers.iter().map(|a| a.status).collect();
    let mut want = before.to_vec();
    match case.want {
        Refused(status) => want.push(status),
        Served(status) => want.extend([status, 200]),
    }
    let sentinel_ok = match case.want {
        Served(_) => answers.last().is_some_and(|a| String::from_utf8_lossy(&a.body).contains("\"pid\"")),
        Refused(_) => true,
    };
    (got != want || !sentinel_ok).then(|| {
        format!(
            "  {} ({name}): want {want:?}, got {got:?}; request {:?}",
            case.rule,
            String::from_utf8_lossy(case.request)
        )
    })
}

/// RFC 9112 §9.6: a client may close its sending side once its request is out and still
/// wait for the answer (a half-close is not an abort), so it gets the answer, even one the
/// worker takes its time over.
#[test]
fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
    use std::io::{Read, Write};
    let rip = Rip::start(&["--workers", "1", "--access-log", "off"]);
    rip.wait_all_ready();
    for request in [
        &b"GET /sleep/300 HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    ] {
        let mut stream = crate::harness::connect_raw(rip.addr());
        stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        stream.write_all(request).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut received = Vec::new();
        let _ = stream.read_to_end(&mut received);
        let text = String::from_utf8_lossy(&received);
        assert!(
            text.starts_with("HTTP/1.1 200 "),
            "{:?} after a half-close got {text:?}",
            String::from_utf8_lossy(request)
        );
    }
}
