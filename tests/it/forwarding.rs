//! What apps are told about the client: a `Host` that is not one is refused, and what a
//! client says about itself in forwarding headers reaches the app only from a proxy named by
//! `--trusted-proxies` — in the default mode and with `--upstream handoff` alike.

use hyper::{Method, StatusCode};
use serde_json::Value;

use crate::harness::{assert_status, empty, request, runtime, Client, Rip};

const FORGED: [(&str, &str); 6] = [
    ("forwarded", "for=203.0.113.9;host=evil.test;proto=https"),
    ("x-forwarded-for", "203.0.113.9"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-host", "evil.test"),
    ("x-forwarded-port", "443"),
    ("x-real-ip", "203.0.113.9"),
];

fn start(mode: &[&str], extra: &[&str]) -> Rip {
    let mut args = vec!["--workers", "1"];
    args.extend_from_slice(mode);
    args.extend_from_slice(extra);
    let rip = Rip::start(&args);
    rip.wait_all_ready();
    rip
}

/// The request headers the worker's app saw for a GET carrying every forged header.
fn seen_with_forged_headers(rip: &Rip) -> Value {
    runtime().block_on(async {
        let mut req = request(Method::GET, "/headers", empty());
        for (name, value) in FORGED {
            req.headers_mut().insert(name, value.parse().unwrap());
        }
        let reply = Client::new(rip.addr()).request(req).await.expect("GET /headers");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        reply.json()
    })
}

fn untrusted_peers_cannot_tell_the_app_who_the_client_is(mode: &[&str]) {
    let rip = start(mode, &[]);
    let seen = seen_with_forged_headers(&rip);
    for gone in ["forwarded", "x-forwarded-host", "x-forwarded-port", "x-real-ip"] {
        assert!(seen.get(gone).is_none(), "{gone} from an untrusted peer reached the app: {seen}");
    }
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1", "{seen}");
    assert_eq!(seen["x-forwarded-proto"], "http", "{seen}");
}

fn a_trusted_proxys_forwarding_headers_are_kept_and_its_address_appended(mode: &[&str]) {
    let rip = start(mode, &["--trusted-proxies", "10.0.0.0/8, 127.0.0.1"]);
    let seen = seen_with_forged_headers(&rip);
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1", "{seen}");
    for (name, value) in FORGED.iter().filter(|(n, _)| *n != "x-forwarded-for") {
        assert_eq!(seen[*name], *value, "{name} from a trusted proxy: {seen}");
    }
}

fn hosts_that_are_not_hosts_get_400(mode: &[&str]) {
    let rip = start(mode, &[]);
    for host in ["bad host", "a/b", "a:99999", "user@evil.test"] {
        let req = format!("GET /headers HTTP/1.1\r\nHost: {host}\r\n\r\n");
        assert_status(rip.addr(), req.as_bytes(), 400, &format!("Host: {host}"));
    }
    let ok = b"GET /headers HTTP/1.1\r\nHost: example.test:8080\r\nConnection: close\r\n\r\n";
    assert_status(rip.addr(), ok, 200, "a valid Host");
}

#[test]
fn forwarding_headers_from_an_untrusted_peer_never_reach_the_app() {
    untrusted_peers_cannot_tell_the_app_who_the_client_is(&[]);
}

#[test]
fn forwarding_headers_from_an_untrusted_peer_never_reach_the_app_with_handoff() {
    untrusted_peers_cannot_tell_the_app_who_the_client_is(&["--upstream", "handoff"]);
}

#[test]
fn a_trusted_proxy_is_believed_and_appended_to() {
    a_trusted_proxys_forwarding_headers_are_kept_and_its_address_appended(&[]);
}

#[test]
fn a_trusted_proxy_is_believed_and_appended_to_with_handoff() {
    a_trusted_proxys_forwarding_headers_are_kept_and_its_address_appended(&["--upstream", "handoff"]);
}

#[test]
fn an_invalid_host_gets_400() {
    hosts_that_are_not_hosts_get_400(&[]);
}

#[test]
fn an_invalid_host_gets_400_with_handoff() {
    hosts_that_are_not_hosts_get_400(&["--upstream", "handoff"]);
}
