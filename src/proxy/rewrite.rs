//! The client checks and header rewriting every request gets before a worker is chosen.
//! Invariant: a request that fails a check ([`refusal`]) never reaches a worker; one that
//! passes reaches it with hop-by-hop headers removed, `X-Forwarded-For`/`-Proto` and the
//! peer header made by rip (never the client's), and its body held to `--max-body` and
//! `--header-timeout` between pieces.
//!
//! [`refusal`] is the one copy of the checks: the hand-off mode's workers, which face
//! clients themselves, call it too.

use std::future::Ready;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{request, Method, Request, Response};
use http_body::Body as _;
use hyper::upgrade::OnUpgrade;
use tower::Service;

use super::{
    headers, ClientBody, Forward, LiveSettings, Peer, Prepared, ProxyError, Replay, RequestBody, ResponseBody,
};

#[derive(Debug, Clone)]
pub struct Rewrite<S> {
    inner: S,
    settings: LiveSettings,
    /// The client, when the stack serves one connection; else each request's extension.
    pub(super) peer: Option<Arc<Peer>>,
}

impl<S> Rewrite<S> {
    pub fn new(inner: S, settings: LiveSettings) -> Self {
        Rewrite { inner, settings, peer: None }
    }

    fn prepare(&self, req: Request<ClientBody>) -> Result<Prepared, ProxyError> {
        let settings = self.settings.load();
        let (mut parts, body) = req.into_parts();
        let max_body = if settings.max_body == 0 { u64::MAX } else { settings.max_body };
        if let Some(err) = refusal(&parts, max_body) {
            return Err(err);
        }
        let peer = match &self.peer {
            Some(peer) => Some(peer.clone()),
            None => parts.extensions.remove::<Arc<Peer>>(),
        };
        let upgrade = match &peer {
            Some(peer) => headers::prepare_request(
                &mut parts,
                &peer.forwarded_for,
                &peer.peer_header,
                peer.trusted,
                peer.https,
            ),
            None => headers::prepare_request(&mut parts, &unknown_peer(), &unknown_peer(), false, false),
        };
        let id = super::next_request_id();
        let mut value = http::HeaderValue::from(id);
        value.set_sensitive(true);
        parts.headers.insert(&headers::REQUEST, value);
        let replay = Replay::capture(&parts, body.is_end_stream() && !upgrade).map(|r| r.numbered(id));
        let client_upgrade = if upgrade { parts.extensions.remove::<OnUpgrade>() } else { None };
        // What the router and the edge layers put here means nothing to a worker process.
        parts.extensions.clear();
        let body = RequestBody::client(body, max_body, settings.body_timeout);
        let mut forward = Forward::new(Request::from_parts(parts, body));
        forward.upgrade = client_upgrade;
        forward.id = id;
        forward.movable = replay.is_some();
        Ok(Prepared { forward, replay })
    }
}

/// Why a client request must not be forwarded, if it must not: CONNECT (rip is a gateway to
/// its workers, not a forward proxy), a target or Host that is not what its method allows, a
/// transfer coding rip cannot decode, or a declared body over `max_body`.
pub fn refusal(parts: &request::Parts, max_body: u64) -> Option<ProxyError> {
    if parts.method == Method::CONNECT {
        return Some(ProxyError::MethodNotAllowed);
    }
    if let Err(why) = headers::check_request(parts) {
        return Some(ProxyError::BadRequest(why));
    }
    if !headers::codings_understood(&parts.headers) {
        return Some(ProxyError::NotImplemented);
    }
    if super::declared_length(&parts.headers).is_some_and(|len| len > max_body) {
        return Some(ProxyError::BodyTooLarge);
    }
    None
}

/// Only a request built without the front-end (a test) has no peer.
fn unknown_peer() -> http::HeaderValue {
    http::HeaderValue::from_static("0.0.0.0")
}

impl<S> Service<Request<ClientBody>> for Rewrite<S>
where
    S: Service<Prepared, Response = Response<ResponseBody>, Error = ProxyError>,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = Either<S::Future, Ready<Result<Response<ResponseBody>, ProxyError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ClientBody>) -> Self::Future {
        match self.prepare(req) {
            Ok(prepared) => Either::Left(self.inner.call(prepared)),
            Err(err) => Either::Right(std::future::ready(Err(err))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::{get, request};
    use crate::proxy::Settings;
    use arc_swap::ArcSwap;
    use std::sync::Mutex;
    use tower::{service_fn, ServiceExt};

    fn settings(max_body: u64) -> LiveSettings {
        let config = crate::config::Config { max_body, ..Default::default() };
        Arc::new(ArcSwap::from_pointee(Settings::from(&config)))
    }

    type Seen = Arc<Mutex<Vec<Prepared>>>;

    /// The layer over an inner service that keeps what reached it.
    fn rewrite(
        max_body: u64,
    ) -> (impl Service<Request<ClientBody>, Response = Response<ResponseBody>, Error = ProxyError>, Seen)
    {
        let seen = Seen::default();
        let inner = service_fn({
            let seen = seen.clone();
            move |prepared: Prepared| {
                seen.lock().unwrap().push(prepared);
                async { Ok(Response::new(ResponseBody::empty())) }
            }
        });
        (Rewrite::new(inner, settings(max_body)), seen)
    }

    #[tokio::test]
    async fn refused_requests_never_reach_the_inner_service() {
        let cases = [
            (request("CONNECT", "example.test:443", ClientBody::empty()), 405),
            (
                {
                    let mut r = get("/");
                    r.headers_mut().append("host", "second".parse().unwrap());
                    r
                },
                400,
            ),
            (
                {
                    let mut r = request("POST", "/echo", ClientBody::from("0123456789"));
                    r.headers_mut().insert("content-length", "10".parse().unwrap());
                    r
                },
                413,
            ),
        ];
        for (req, status) in cases {
            let (svc, seen) = rewrite(5);
            let err = svc.oneshot(req).await.unwrap_err();
            assert_eq!(err.status().as_u16(), status);
            assert!(seen.lock().unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn a_forwarded_request_carries_rips_forwarding_headers_and_a_replay_only_when_safe() {
        let (svc, seen) = rewrite(0);
        let mut req = get("/x");
        req.headers_mut().insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
        req.headers_mut().insert("x-rip-peer", "6.6.6.6:1".parse().unwrap());
        svc.oneshot(req).await.unwrap();
        let (svc2, seen2) = rewrite(0);
        svc2.oneshot(request("POST", "/echo", ClientBody::from("hi"))).await.unwrap();

        let prepared = seen.lock().unwrap().pop().unwrap();
        let headers = prepared.forward.request.headers();
        assert_eq!(headers["x-forwarded-for"], "10.1.2.3");
        assert_eq!(headers["x-rip-peer"], crate::proxy::testing::PEER);
        assert!(prepared.replay.is_some(), "a GET without a body can be replayed");
        let post = seen2.lock().unwrap().pop().unwrap();
        assert!(post.replay.is_none(), "a POST is never replayed");
        assert!(post.forward.request.body().progress().is_some());
    }
}
