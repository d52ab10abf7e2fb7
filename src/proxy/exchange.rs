//! The innermost service: one request over a connection to the worker the balancer chose —
//! the worker's shared HTTP/2 connection, or an HTTP/1 connection of its own for a request
//! with a body, an upgrade, or one alone on its worker (see `Upstream::Http2`). A 101 joins
//! the client's connection and the worker's into a tunnel.
//!
//! Invariant: a request that was not written to the worker is handed back whole in
//! [`Failed::unsent`]; once written, a failure says whether the client's body or the worker
//! was to blame.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Response, StatusCode};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tower::Service;

use super::body::BodyError;
use super::endpoint::Sender;
use super::{headers, upgrade, Cause, Dispatch, Failed, Forward, Lease, ResponseBody, ALONE};

#[derive(Debug, Clone, Default)]
pub struct Exchange;

impl Exchange {
    pub fn new() -> Exchange {
        Exchange
    }
}

impl Service<Dispatch> for Exchange {
    type Response = Response<ResponseBody>;
    type Error = Failed;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Failed>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dispatch: Dispatch) -> Self::Future {
        Box::pin(exchange(dispatch))
    }
}

async fn exchange(Dispatch { forward, lease }: Dispatch) -> Result<Response<ResponseBody>, Failed> {
    let endpoint = lease.endpoint().clone();
    let id = Some(endpoint.id);
    let has_body = !forward.request.body().is_end_stream();
    let own = forward.upgrade.is_some() || has_body || endpoint.in_flight() <= ALONE;
    let mut sender = match endpoint.connection(own).await {
        Ok(sender) => sender,
        Err(e) => {
            // The socket refuses connections: the worker is gone. Stop choosing it until the
            // supervisor replaces it; the request was never sent.
            endpoint.mark_unreachable();
            return Err(Failed::unsent(Cause::Unreachable(e), id, forward));
        }
    };
    let progress = forward.request.body().progress();
    let Forward { request, upgrade, avoid, id: number, movable, moved } = forward;
    match sender.try_send_request(request).await {
        Ok(response) => Ok(respond(response, lease, sender, upgrade)),
        Err(mut err) => {
            if let Some(request) = err.take_message() {
                let forward = Forward { request, upgrade, avoid, id: number, movable, moved };
                return Err(Failed::unsent(Cause::NotReady, id, forward));
            }
            let err = err.into_error();
            let body_error = progress.and_then(|p| p.failure()).or_else(|| cause::<BodyError>(&err));
            if let Some(body_error) = body_error {
                return Err(Failed::new(Cause::Body(body_error), id));
            }
            // The worker may be dead with more pooled connections to it that still look
            // open; the next attempt to it must find out by connecting afresh.
            endpoint.forget_idle();
            Err(Failed::new(Cause::Worker(err), id))
        }
    }
}

fn respond(
    response: Response<Incoming>,
    lease: Lease,
    sender: Sender,
    client_upgrade: Option<OnUpgrade>,
) -> Response<ResponseBody> {
    let (mut parts, body) = response.into_parts();
    // A proxy answers in its own HTTP version (RFC 9110 §6.2): an app that speaks HTTP/1.0
    // would otherwise turn every client's connection into one that closes after a response.
    parts.version = http::Version::HTTP_11;
    headers::prepare_response(parts.status, &mut parts.headers);
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client) = client_upgrade {
            let id = lease.endpoint().id;
            let mut upstream = Response::from_parts(parts, body);
            let upstream_upgrade = hyper::upgrade::on(&mut upstream);
            upgrade::tunnel(client, upstream_upgrade, lease);
            drop(sender);
            let (parts, _) = upstream.into_parts();
            return Response::from_parts(parts, ResponseBody::empty().from_worker(id));
        }
    }
    Response::from_parts(parts, ResponseBody::upstream(body, lease, sender))
}

/// The first error of type `E` in `err`'s chain of causes.
fn cause<E: std::error::Error + Copy + 'static>(err: &(dyn std::error::Error + 'static)) -> Option<E> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(*found);
        }
        next = e.source();
    }
    None
}
