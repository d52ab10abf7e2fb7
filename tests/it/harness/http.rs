//! Speaking HTTP/1.1 to rip as a well-behaved client: [`Client`], one keep-alive connection on
//! loopback, reopened when the server closed it, with every exchange under a timeout so a
//! test fails instead of hanging; and the whole responses it reads ([`Reply`]).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::{Error, REQUEST_TIMEOUT};

/// The body type the client sends.
pub type ReqBody = BoxBody<Bytes, Error>;

pub fn empty() -> ReqBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> ReqBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// A whole response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
}

/// What `GET /whoami` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WhoAmI {
    pub worker: u64,
    pub pid: i32,
    pub served: u64,
}

impl WhoAmI {
    pub fn parse(body: &[u8]) -> Option<WhoAmI> {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        Some(WhoAmI {
            worker: v["worker"].as_u64()?,
            pid: i32::try_from(v["pid"].as_u64()?).ok()?,
            served: v["served"].as_u64()?,
        })
    }
}

/// What `GET /whoami` answers, on a connection of its own.
pub async fn whoami(addr: SocketAddr) -> WhoAmI {
    let reply = Client::new(addr).get("/whoami").await.expect("GET /whoami");
    WhoAmI::parse(&reply.body).unwrap_or_else(|| panic!("not a /whoami answer: {}", reply.text()))
}

/// One HTTP/1.1 keep-alive connection to rip, reopened when the server closed it. Requests
/// without a `Host` get `Host: <addr>`.
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    sender: Option<SendRequest<ReqBody>>,
    pub timeout: Duration,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        assert!(addr.ip().is_loopback(), "tests talk to loopback only");
        Client { addr, sender: None, timeout: REQUEST_TIMEOUT }
    }

    pub async fn get(&mut self, path: &str) -> Result<Reply, Error> {
        self.request(request(Method::GET, path, empty())).await
    }

    pub async fn post(&mut self, path: &str, body: impl Into<Bytes>) -> Result<Reply, Error> {
        let body = body.into();
        let mut req = request(Method::POST, path, full(body.clone()));
        req.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        self.request(req).await
    }

    /// A `POST` with `Content-Type: application/json`, as the json_api example wants.
    pub async fn post_json(&mut self, path: &str, body: impl Into<Bytes>) -> Result<Reply, Error> {
        let mut req = request(Method::POST, path, full(body));
        req.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        self.request(req).await
    }

    /// Sends a streamed body (e.g. a [`PatternBody`]); the response comes back as soon as its
    /// headers do, with the body still streaming both ways.
    pub async fn post_stream<B>(&mut self, path: &str, body: B) -> Result<Response<Incoming>, Error>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<Error>,
    {
        let length = body.size_hint().exact();
        let mut req = request(Method::POST, path, body.map_err(Into::into).boxed());
        if let Some(length) = length {
            req.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(length));
        }
        self.send(req).await
    }

    /// Sends a request and reads the whole response.
    pub async fn request(&mut self, req: Request<ReqBody>) -> Result<Reply, Error> {
        let timeout = self.timeout;
        let exchange = async {
            let response = self.send(req).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok(Reply { status: parts.status, headers: parts.headers, body })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no whole response within {timeout:?}"))?
    }

    /// Sends a request and returns once the response headers arrived.
    pub async fn send(&mut self, mut req: Request<ReqBody>) -> Result<Response<Incoming>, Error> {
        if !req.headers().contains_key(HOST) {
            let host = HeaderValue::from_str(&self.addr.to_string()).expect("an address");
            req.headers_mut().insert(HOST, host);
        }
        let timeout = self.timeout;
        let exchange = async {
            let sender = self.ready_sender().await?;
            Ok(sender.send_request(req).await?)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no response headers within {timeout:?}"))?
    }

    async fn ready_sender(&mut self) -> Result<&mut SendRequest<ReqBody>, Error> {
        if let Some(sender) = &mut self.sender {
            if sender.ready().await.is_err() {
                self.sender = None;
            }
        }
        if self.sender.is_none() {
            let stream = tokio::net::TcpStream::connect(self.addr).await?;
            stream.set_nodelay(true)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                // Ends when either side closes; a request on it sees the error.
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("connected above");
        sender.ready().await?;
        Ok(sender)
    }
}

pub fn request(method: Method, path: &str, body: ReqBody) -> Request<ReqBody> {
    Request::builder().method(method).uri(path).body(body).expect("a valid request")
}
