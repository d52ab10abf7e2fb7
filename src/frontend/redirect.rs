//! `--http-redirect ADDR`: with TLS on the main listener, a plain-HTTP listener that answers
//! every request with 308 to the same host and path over https, as Caddy does for port 80.
//! 308 rather than 301 keeps the method and body of a POST. A request without a usable Host
//! gets 400: there is nowhere to send it.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Binds `addr` and redirects to https on `https_port` until `stop`. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    https_port: u16,
    stop: CancellationToken,
) -> Result<(SocketAddr, impl std::future::Future<Output = ()> + Send + 'static)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the http redirect listener {addr}"))?;
    let local = listener.local_addr().context("reading the redirect address")?;
    let app = Router::new().fallback(move |req: Request| async move { redirect(&req, https_port) });
    let serving = async move {
        let _ =
            axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
    };
    Ok((local, serving))
}

fn redirect(req: &Request, https_port: u16) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok());
    let Some(host) = host else {
        return (StatusCode::BAD_REQUEST, "a Host header is needed to redirect to https\n").into_response();
    };
    let port = if https_port == 443 { String::new() } else { format!(":{https_port}") };
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location = format!("https://{}{port}{target}", host.host());
    match HeaderValue::from_str(&location) {
        Ok(location) => (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, location)]).into_response(),
        Err(_) => StatusCode::BAD_REQUEST.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(host: Option<&str>, target: &str, port: u16) -> (StatusCode, Option<String>) {
        let mut req = Request::builder().uri(target);
        if let Some(host) = host {
            req = req.header(header::HOST, host);
        }
        let response = redirect(&req.body(axum::body::Body::empty()).unwrap(), port);
        let location = response.headers().get(header::LOCATION).map(|l| l.to_str().unwrap().to_string());
        (response.status(), location)
    }

    /// Host, target, https port; the status and Location expected.
    type Row = (Option<&'static str>, &'static str, u16, StatusCode, Option<&'static str>);

    #[test]
    fn every_request_goes_to_the_same_host_and_path_over_https() {
        let table: &[Row] = &[
            (
                Some("example.com"),
                "/a/b?c=d",
                443,
                StatusCode::PERMANENT_REDIRECT,
                Some("https://example.com/a/b?c=d"),
            ),
            (Some("example.com:80"), "/", 443, StatusCode::PERMANENT_REDIRECT, Some("https://example.com/")),
            (
                Some("localhost:8080"),
                "/x",
                8443,
                StatusCode::PERMANENT_REDIRECT,
                Some("https://localhost:8443/x"),
            ),
            (Some("[::1]:80"), "/", 443, StatusCode::PERMANENT_REDIRECT, Some("https://[::1]/")),
            (None, "/", 443, StatusCode::BAD_REQUEST, None),
            (Some("bad host/with/slash"), "/", 443, StatusCode::BAD_REQUEST, None),
        ];
        for (host, target, port, status, expected) in table {
            assert_eq!(
                location(*host, target, *port),
                (*status, expected.map(str::to_string)),
                "{host:?} {target}"
            );
        }
    }
}
