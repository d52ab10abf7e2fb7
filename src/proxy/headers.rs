//! Header rewriting on the proxy path. Invariants: hop-by-hop headers (RFC 9110 §7.6.1) never
//! cross the proxy; what a worker reads about the client (`X-Forwarded-For`/`-Proto`, and
//! `Forwarded`, `X-Forwarded-Host`/`-Port`, `X-Real-IP`) is rip's, unless the peer is a
//! trusted proxy (`--trusted-proxies`), whose word is kept and to which `X-Forwarded-For`
//! appends; and the `Host` the client sent reaches the worker only if it is a valid one.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, Method, StatusCode, Uri, Version};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// The client's address and port as the front-end saw them, for the worker's
/// `ConnectInfo<SocketAddr>`. Set by the front-end on every request (replacing whatever a
/// client sent), and taken off again by the worker before the app sees the request.
pub static PEER: HeaderName = HeaderName::from_static("x-rip-peer");
/// The front-end's number for the request, which the worker writes into its heartbeat page
/// while it runs the request, so that the one a stalled worker is stuck in is known (and not
/// moved to another worker to stall that one too). Removed by the worker like [`PEER`].
pub static REQUEST: HeaderName = HeaderName::from_static("x-rip-request");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers meaningful only for one connection, in either direction.
fn hop_by_hop() -> [&'static HeaderName; 9] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
    ]
}

/// True when the request asks to switch protocols (`Connection: upgrade` plus `Upgrade`).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers, including any the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in hop_by_hop() {
        headers.remove(name);
    }
}

/// Rejects requests whose target is ambiguous, which hyper's parser lets through: an HTTP/1.1
/// request with no Host or several (RFC 9112 §3.2). Ambiguous framing never gets this far:
/// `crate::frontend::framing` makes hyper refuse it while parsing.
pub fn check_request(parts: &request::Parts) -> Result<(), &'static str> {
    let hosts = parts.headers.get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err("more than one Host header");
    }
    if hosts == 0 && parts.version == Version::HTTP_11 && parts.uri.authority().is_none() {
        return Err("no Host header");
    }
    if parts.headers.get(header::HOST).is_some_and(|host| !is_valid_host(host)) {
        return Err("invalid Host header");
    }
    // RFC 9112 §3.2.3: authority-form (`example.com:443`) is for CONNECT only, which is
    // refused before this; §3.2.4: asterisk-form (`*`) for a server-wide OPTIONS only.
    if parts.uri.scheme().is_none() && parts.uri.authority().is_some() {
        return Err("an authority-form target without CONNECT");
    }
    if parts.uri.path() == "*" && parts.method != Method::OPTIONS {
        return Err("an asterisk-form target without OPTIONS");
    }
    // RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message means the framing is faulty.
    if parts.version == Version::HTTP_10 && parts.headers.contains_key(header::TRANSFER_ENCODING) {
        return Err("Transfer-Encoding in an HTTP/1.0 request");
    }
    Ok(())
}

/// Whether every transfer coding of the request is one rip decodes: chunked alone. hyper
/// frames `gzip, chunked` by its last coding and would hand the still-gzipped body on as if
/// it were plain; RFC 9112 §6.1 asks for 501 instead.
pub fn codings_understood(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::TRANSFER_ENCODING).iter().peekable();
    if values.peek().is_none() {
        return true;
    }
    let mut chunked = 0;
    for value in values {
        let Ok(value) = value.to_str() else { return false };
        for coding in value.split(',') {
            if !coding.trim().eq_ignore_ascii_case("chunked") {
                return false;
            }
            chunked += 1;
        }
    }
    // Chunked applied twice is not a coding anyone sends in good faith.
    chunked == 1
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2, RFC 3986 §3.2.2): a registered name, an IPv4
/// address or a bracketed IP literal, and a port that is a port. Empty is allowed: a client
/// sends it for a target without an authority (RFC 9112 §3.2).
fn is_valid_host(value: &HeaderValue) -> bool {
    let Ok(text) = value.to_str() else { return false };
    if text.is_empty() {
        return true;
    }
    if text.contains('@') {
        return false;
    }
    let Ok(authority) = text.parse::<http::uri::Authority>() else { return false };
    let port_ok = match text.rsplit_once(':') {
        // A colon inside an IPv6 literal is not a port separator.
        Some((_, tail)) if !tail.contains(']') => authority.port_u16().is_some(),
        _ => true,
    };
    authority.as_str() == text && !authority.host().is_empty() && port_ok
}

/// Rewrites a client request for a worker. Returns whether it is a protocol upgrade, in which
/// case the `Upgrade` handshake headers are kept end to end.
/// `forwarded_for` and `peer` are the client's address as made by [`forwarded_for`] and
/// [`peer_value`], once per connection.
pub fn prepare_request(
    parts: &mut request::Parts,
    forwarded_for: &HeaderValue,
    peer: &HeaderValue,
    trusted: bool,
    https: bool,
) -> bool {
    let upgrade = is_upgrade(&parts.headers);
    let upgrade_value = if upgrade { parts.headers.get(header::UPGRADE).cloned() } else { None };
    strip_hop_by_hop(&mut parts.headers);
    if let Some(value) = upgrade_value {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, value);
    }

    // An absolute-form target names the host; RFC 9112 §3.2.2 says it wins over Host.
    if let Some(authority) = parts.uri.authority() {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            parts.headers.insert(header::HOST, host);
        }
    }
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let origin_form = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        parts.uri = Uri::try_from(origin_form).unwrap_or_else(|_| Uri::from_static("/"));
    }

    set_forwarded(&mut parts.headers, forwarded_for, trusted, https);
    parts.headers.insert(&PEER, peer.clone());
    // The hop to a worker is always keep-alive HTTP/1.1, whatever the client spoke.
    parts.version = Version::HTTP_11;
    upgrade
}

/// Says who the client is. From an untrusted peer, whatever it claimed about the client is
/// removed and `X-Forwarded-For`/`-Proto` are the truth: the peer's address, and HTTPS when
/// the connection is. A trusted proxy's claims are kept, and its own address is appended to
/// `X-Forwarded-For`, as every proxy in a chain does.
pub fn set_forwarded(headers: &mut HeaderMap, forwarded_for: &HeaderValue, trusted: bool, https: bool) {
    let proto = HeaderValue::from_static(if https { "https" } else { "http" });
    if !trusted {
        for name in [&header::FORWARDED, &X_FORWARDED_HOST, &X_FORWARDED_PORT, &X_REAL_IP] {
            headers.remove(name);
        }
        headers.insert(&X_FORWARDED_FOR, forwarded_for.clone());
        headers.insert(&X_FORWARDED_PROTO, proto);
        return;
    }
    let chain: Vec<&[u8]> = headers.get_all(&X_FORWARDED_FOR).iter().map(HeaderValue::as_bytes).collect();
    let value = if chain.is_empty() {
        forwarded_for.clone()
    } else {
        let mut joined = chain.join(&b", "[..]);
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(forwarded_for.as_bytes());
        HeaderValue::from_bytes(&joined).unwrap_or_else(|_| forwarded_for.clone())
    };
    headers.insert(&X_FORWARDED_FOR, value);
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(&X_FORWARDED_PROTO, proto);
    }
}

/// Rewrites a worker's response for the client. A 101 keeps its handshake headers.
pub fn prepare_response(status: StatusCode, headers: &mut HeaderMap) {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    strip_hop_by_hop(headers);
}

/// The [`PEER`] value for a client address.
pub fn peer_value(addr: std::net::SocketAddr) -> HeaderValue {
    let addr = std::net::SocketAddr::new(unmapped(addr.ip()), addr.port());
    let mut value =
        HeaderValue::from_str(&addr.to_string()).expect("a socket address is a valid header value");
    // Never indexed by HPACK: every connection has its own value, and on the worker's shared
    // HTTP/2 connection each would otherwise push another entry through the header table.
    value.set_sensitive(true);
    value
}

/// IPv4 clients of a dual-stack listener, shown as the IPv4 addresses they are.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The `X-Forwarded-For` value for a client address.
pub fn forwarded_for(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&unmapped(ip).to_string()).expect("an IP address is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(req: Request<()>) -> request::Parts {
        req.into_parts().0
    }

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 2, 3));
    static PEER_VALUE: HeaderValue = HeaderValue::from_static("10.1.2.3:9");

    #[test]
    fn hop_by_hop_headers_are_removed_and_forwarding_headers_replaced() {
        let mut p = parts(
            Request::get("/x?y=1")
                .header("host", "example.test")
                .header("connection", "keep-alive, X-Secret")
                .header("keep-alive", "timeout=5")
                .header("x-secret", "1")
                .header("te", "trailers")
                .header("proxy-authorization", "Basic abc")
                .header("x-forwarded-for", "6.6.6.6")
                .header("x-forwarded-proto", "https")
                .header("accept", "*/*")
                .body(())
                .unwrap(),
        );
        assert!(!prepare_request(&mut p, &forwarded_for(PEER), &PEER_VALUE, false, false));
        let h = &p.headers;
        for gone in ["connection", "keep-alive", "x-secret", "te", "proxy-authorization"] {
            assert!(!h.contains_key(gone), "{gone} was forwarded");
        }
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["host"], "example.test");
        assert_eq!(h["accept"], "*/*");
        assert_eq!(p.uri, "/x?y=1");
    }

    #[test]
    fn what_an_untrusted_peer_says_about_the_client_is_removed_and_a_trusted_one_is_kept() {
        let forged = || {
            parts(
                Request::get("/")
                    .header("host", "a")
                    .header("forwarded", "for=6.6.6.6;host=evil.test")
                    .header("x-forwarded-host", "evil.test")
                    .header("x-forwarded-port", "443")
                    .header("x-real-ip", "6.6.6.6")
                    .header("x-forwarded-for", "6.6.6.6")
                    .header("x-forwarded-proto", "https")
                    .body(())
                    .unwrap(),
            )
        };
        let mut untrusted = forged();
        prepare_request(&mut untrusted, &forwarded_for(PEER), &PEER_VALUE, false, false);
        for gone in ["forwarded", "x-forwarded-host", "x-forwarded-port", "x-real-ip"] {
            assert!(!untrusted.headers.contains_key(gone), "{gone} passed from an untrusted peer");
        }
        assert_eq!(untrusted.headers["x-forwarded-for"], "10.1.2.3");
        assert_eq!(untrusted.headers["x-forwarded-proto"], "http");

        let mut trusted = forged();
        prepare_request(&mut trusted, &forwarded_for(PEER), &PEER_VALUE, true, false);
        assert_eq!(trusted.headers["x-forwarded-for"], "6.6.6.6, 10.1.2.3");
        assert_eq!(trusted.headers["x-forwarded-proto"], "https");
        assert_eq!(trusted.headers["x-forwarded-host"], "evil.test");
        assert_eq!(trusted.headers["forwarded"], "for=6.6.6.6;host=evil.test");
    }

    #[test]
    fn hosts_are_checked_against_the_grammar() {
        let host = |h: &str| parts(Request::get("/").header("host", h).body(()).unwrap());
        for good in ["a", "example.test:8080", "127.0.0.1", "[::1]", "[::1]:80", "xn--bcher-kva.example", ""]
        {
            assert_eq!(check_request(&host(good)), Ok(()), "{good:?}");
        }
        for bad in ["bad host", "a/b", "a:99999", "a:x", "user@a", "a?b", "[::1"] {
            assert!(check_request(&host(bad)).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn targets_are_checked_against_their_method() {
        let req = |method: &str, target: &str| {
            parts(Request::builder().method(method).uri(target).header("host", "a").body(()).unwrap())
        };
        assert!(check_request(&req("GET", "example.com:443")).is_err(), "authority-form without CONNECT");
        assert!(check_request(&req("GET", "*")).is_err(), "asterisk-form without OPTIONS");
        assert_eq!(check_request(&req("OPTIONS", "*")), Ok(()));
        assert_eq!(check_request(&req("GET", "http://a/x")), Ok(()), "absolute-form");
        let te_10 = Request::post("/").version(Version::HTTP_10).header("transfer-encoding", "chunked");
        assert!(check_request(&parts(te_10.body(()).unwrap())).is_err());
    }

    #[test]
    fn only_chunked_alone_is_an_understood_transfer_coding() {
        let te = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(header::TRANSFER_ENCODING, HeaderValue::from_str(v).unwrap());
            }
            codings_understood(&headers)
        };
        assert!(te(&[]));
        assert!(te(&["chunked"]) && te(&["Chunked"]) && te(&[" chunked "]));
        assert!(!te(&["gzip, chunked"]) && !te(&["gzip", "chunked"]) && !te(&["identity"]));
        assert!(!te(&["chunked, chunked"]) && !te(&["chunked", "chunked"]));
    }

    #[test]
    fn ambiguous_requests_are_refused() {
        let ok = parts(Request::get("/").header("host", "a").body(()).unwrap());
        assert_eq!(check_request(&ok), Ok(()));
        let two_hosts = parts(Request::get("/").header("host", "a").header("host", "b").body(()).unwrap());
        assert!(check_request(&two_hosts).is_err());
        let no_host = parts(Request::get("/").body(()).unwrap());
        assert!(check_request(&no_host).is_err());
        let old = parts(Request::get("/").version(Version::HTTP_10).body(()).unwrap());
        assert_eq!(check_request(&old), Ok(()));
    }

    #[test]
    fn upgrade_handshake_is_kept() {
        let mut p = parts(
            Request::get("/ws")
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-key", "k")
                .body(())
                .unwrap(),
        );
        assert!(prepare_request(&mut p, &forwarded_for(PEER), &PEER_VALUE, false, false));
        assert_eq!(p.headers["connection"], "upgrade");
        assert_eq!(p.headers["upgrade"], "websocket");
        assert_eq!(p.headers["sec-websocket-key"], "k");
    }

    #[test]
    fn absolute_form_becomes_origin_form_with_its_host() {
        let mut p =
            parts(Request::get("http://example.test:8080/a/b?c").header("host", "other").body(()).unwrap());
        prepare_request(&mut p, &forwarded_for(PEER), &PEER_VALUE, false, false);
        assert_eq!(p.uri, "/a/b?c");
        assert_eq!(p.headers["host"], "example.test:8080");
    }

    #[test]
    fn mapped_ipv6_peers_are_shown_as_ipv4() {
        let mut p = parts(Request::get("/").body(()).unwrap());
        prepare_request(
            &mut p,
            &forwarded_for("::ffff:127.0.0.1".parse().unwrap()),
            &PEER_VALUE,
            false,
            false,
        );
        assert_eq!(p.headers["x-forwarded-for"], "127.0.0.1");
    }

    #[test]
    fn response_hop_by_hop_headers_are_removed_except_on_101() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        let mut kept = h.clone();
        prepare_response(StatusCode::OK, &mut h);
        assert!(!h.contains_key("connection") && !h.contains_key("transfer-encoding"));
        assert!(h.contains_key("content-type"));
        prepare_response(StatusCode::SWITCHING_PROTOCOLS, &mut kept);
        assert!(kept.contains_key("connection"));
    }
}
