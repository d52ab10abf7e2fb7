//! In-memory requests and responses for the layers' unit tests: no sockets, no processes.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use http_body_util::BodyExt;

use super::{ClientBody, Peer, ResponseBody};

pub const PEER: &str = "10.1.2.3:4567";

/// A request as the front-end's router hands it to the stack: with its peer.
pub fn request(method: &str, target: &str, body: ClientBody) -> Request<ClientBody> {
    let mut req =
        Request::builder().method(method).uri(target).header("host", "rip.test").body(body).unwrap();
    let addr: SocketAddr = PEER.parse().unwrap();
    req.extensions_mut().insert(Arc::new(Peer::new(addr, false, false)));
    req
}

pub fn get(target: &str) -> Request<ClientBody> {
    request("GET", target, ClientBody::empty())
}

pub async fn body_text(response: Response<ResponseBody>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}
