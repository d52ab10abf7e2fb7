//! Why a request could not be served. Two small types: [`Failed`], how one attempt on a
//! worker went wrong, which answers the retry layer's one question (`is_retryable`); and
//! [`ProxyError`], what the client is told, mapped to an HTTP answer in exactly one place
//! ([`ProxyError::into_response`]).

use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};

use super::body::{BodyError, ResponseBody};
use super::Forward;
use crate::discovery::WorkerId;

/// How one attempt failed. When the request never reached the worker, it comes back whole
/// in `unsent`, so that it can go to another worker whatever its method or body.
#[derive(Debug)]
pub struct Failed {
    pub cause: Cause,
    /// The worker the attempt went to, if one was chosen.
    pub worker: Option<WorkerId>,
    pub unsent: Option<Box<Forward>>,
}

#[derive(Debug)]
pub enum Cause {
    /// No worker became usable before the queue deadline.
    NoWorker,
    /// The worker's socket refused the connection: the process is gone.
    Unreachable(std::io::Error),
    /// The pooled connection closed before the request was written.
    NotReady,
    /// The client's body failed while it was being passed on.
    Body(BodyError),
    /// The worker took the request and then failed before response headers came back.
    Worker(hyper::Error),
    /// The worker did not answer within `--request-timeout`, or was declared hung.
    Timeout(Duration),
    /// The worker stalled before it began to answer; the request can go elsewhere.
    Stalled,
}

impl Failed {
    pub fn new(cause: Cause, worker: Option<WorkerId>) -> Failed {
        Failed { cause, worker, unsent: None }
    }

    pub fn unsent(cause: Cause, worker: Option<WorkerId>, forward: Forward) -> Failed {
        Failed { cause, worker, unsent: Some(Box::new(forward)) }
    }

    /// May the request be sent again? Always when it never reached a worker, since nothing
    /// was done; after a worker failed with it, only when it can be replayed (an idempotent
    /// request without a body), since the worker may have acted on anything else. A timeout
    /// or a broken client body is never retried: the first means the worker is stuck with
    /// it, the second that there is nothing whole left to send.
    pub fn is_retryable(&self, replayable: bool) -> bool {
        match self.cause {
            Cause::Unreachable(_) | Cause::NotReady => self.unsent.is_some(),
            Cause::Worker(_) | Cause::Stalled => replayable,
            Cause::NoWorker | Cause::Body(_) | Cause::Timeout(_) => false,
        }
    }

    /// What the client is told when the request is not tried again.
    pub fn into_proxy_error(self) -> ProxyError {
        match self.cause {
            Cause::NoWorker => ProxyError::NoWorker,
            Cause::Unreachable(_) | Cause::NotReady | Cause::Worker(_) | Cause::Stalled => {
                ProxyError::Upstream
            }
            Cause::Body(BodyError::TooLarge) => ProxyError::BodyTooLarge,
            Cause::Body(BodyError::Timeout) => ProxyError::BodyTimeout,
            Cause::Body(BodyError::Client) => ProxyError::BadBody,
            Cause::Timeout(elapsed) => ProxyError::Timeout(elapsed),
        }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::NoWorker => f.write_str("no worker available"),
            Cause::Unreachable(e) => write!(f, "worker unreachable: {e}"),
            Cause::NotReady => f.write_str("connection closed before the request was sent"),
            Cause::Body(e) => write!(f, "{e}"),
            Cause::Worker(e) => write!(f, "{e}"),
            Cause::Timeout(elapsed) => write!(f, "no answer within {} ms", elapsed.as_millis()),
            Cause::Stalled => f.write_str("worker stalled before it began to answer"),
        }
    }
}

#[derive(Debug)]
pub enum ProxyError {
    /// No worker became ready before the queue deadline.
    NoWorker,
    /// The worker did not send response headers within `--timeout`.
    Timeout(Duration),
    /// The request reached a worker but no response came back, and it was not safe to retry.
    Upstream,
    /// The request body is larger than `--max-body`.
    BodyTooLarge,
    /// The client stalled in the middle of its request body.
    BodyTimeout,
    /// The client's request body was malformed (bad chunk framing) or cut off.
    BadBody,
    /// The request's framing or target is ambiguous; it is never forwarded.
    BadRequest(&'static str),
    /// CONNECT: rip is a gateway to its workers, not a forward proxy.
    MethodNotAllowed,
    /// A transfer coding other than chunked (RFC 9112 §6.1): rip cannot decode the body.
    NotImplemented,
}

/// Seconds a client is asked to wait after a 503; a worker restart takes well under this.
const RETRY_AFTER_SECS: &str = "1";

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoWorker => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream => StatusCode::BAD_GATEWAY,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BadBody | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::NotImplemented => StatusCode::NOT_IMPLEMENTED,
        }
    }

    fn message(&self) -> &'static str {
        match self {
            ProxyError::NoWorker => "no worker is available, try again shortly\n",
            ProxyError::Timeout(_) => "the worker did not answer in time\n",
            ProxyError::Upstream => "the worker failed to answer\n",
            ProxyError::BodyTooLarge => "request body too large\n",
            ProxyError::BodyTimeout => "timed out reading the request body\n",
            ProxyError::BadBody => "invalid request body\n",
            ProxyError::BadRequest(_) => "bad request\n",
            ProxyError::MethodNotAllowed => "method not allowed\n",
            ProxyError::NotImplemented => "transfer coding not implemented\n",
        }
    }

    /// The client's errors: logged at debug level only, and the connection is closed after.
    pub fn is_client_error(&self) -> bool {
        self.status().is_client_error()
    }

    /// The rest of the request was not read, or cannot be trusted: the connection cannot
    /// carry another request.
    fn closes_connection(&self) -> bool {
        self.is_client_error() || matches!(self, ProxyError::NotImplemented)
    }

    pub fn into_response(self) -> Response<ResponseBody> {
        let mut response = Response::new(ResponseBody::full(self.message()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        if matches!(self, ProxyError::NoWorker) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        if self.closes_connection() {
            // The rest of the body was not read; the connection cannot carry another request.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_to_its_status() {
        let table = [
            (ProxyError::NoWorker, 503),
            (ProxyError::Timeout(Duration::from_secs(1)), 504),
            (ProxyError::Upstream, 502),
            (ProxyError::BodyTooLarge, 413),
            (ProxyError::BodyTimeout, 408),
            (ProxyError::BadBody, 400),
            (ProxyError::BadRequest("x"), 400),
            (ProxyError::MethodNotAllowed, 405),
            (ProxyError::NotImplemented, 501),
        ];
        for (err, status) in table {
            let no_worker = matches!(err, ProxyError::NoWorker);
            let resp = err.into_response();
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(resp.headers().contains_key("retry-after"), no_worker);
            assert_eq!(
                resp.headers().contains_key("connection"),
                (400..500).contains(&status) || status == 501
            );
        }
    }
}
