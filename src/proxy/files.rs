//! `--root` served by the front-end itself, between [`Observe`](super::Observe) (so every
//! file is counted, logged and drained like any request) and [`Rewrite`](super::Rewrite).
//! Invariant: a request reaches a worker exactly as it would without a root unless a file
//! under the root answers it — a GET or HEAD that passes the client checks and names a
//! file, or a directory to redirect to. Everything else (other methods, missing files,
//! refused paths, upgrades) goes on to the workers, as nginx's `try_files $uri @app` does;
//! rip's stock workers serve the same root and answer those with the same 404, 405 or 400.
//!
//! Why here and not in a worker: a file is in memory or a system call away, and the hop to a
//! worker and back costs several times what serving it does.

use std::future::{Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwapOption;
use futures_util::future::Either;
use http::{header, Request, Response};
use tower::Service;

use super::{refusal, ClientBody, ProxyError, ResponseBody};
use crate::app::{Answer, Content, Files as Root};

/// The root the front-end serves now: none, or one swapped whole on reload.
pub type LiveRoot = Arc<ArcSwapOption<Root>>;

#[derive(Debug, Clone)]
pub struct Files<S> {
    pub(super) inner: S,
    root: LiveRoot,
}

impl<S> Files<S> {
    pub fn new(inner: S, root: LiveRoot) -> Self {
        Files { inner, root }
    }
}

type Answered = Result<Response<ResponseBody>, ProxyError>;
type Looked = Pin<Box<dyn Future<Output = Answered> + Send>>;

fn respond(response: Response<Content>) -> Response<ResponseBody> {
    response.map(|content| match content {
        Content::Full(bytes) => ResponseBody::full(bytes),
        Content::Stream(body) => ResponseBody::local(body),
    })
}

/// Whether the root may answer a request with this head: a fetch that would pass the client
/// checks and asks for no protocol switch (a WebSocket handshake on a path that is also a
/// file is the app's). A body's size is the worker path's business: a GET's is never read.
fn for_the_root(head: &http::request::Parts) -> bool {
    let fetch = head.method == http::Method::GET || head.method == http::Method::HEAD;
    fetch && !head.headers.contains_key(header::UPGRADE) && refusal(head, u64::MAX).is_none()
}

impl<S> Service<Request<ClientBody>> for Files<S>
where
    S: Service<Request<ClientBody>, Response = Response<ResponseBody>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = Either<S::Future, Either<Ready<Answered>, Looked>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ClientBody>) -> Self::Future {
        let Some(root) = self.root.load_full() else {
            return Either::Left(self.inner.call(req));
        };
        let (head, body) = req.into_parts();
        let ours = for_the_root(&head);
        let req = Request::from_parts(head, body);
        if !ours {
            return Either::Left(self.inner.call(req));
        }
        let probe = match root.probe(&req) {
            Ok(kept) => return Either::Right(Either::Left(std::future::ready(Ok(respond(kept))))),
            Err(probe) => probe,
        };
        let mut inner = self.inner.clone();
        Either::Right(Either::Right(Box::pin(async move {
            match root.look(req, probe).await {
                Answer::Served(response) => Ok(respond(response)),
                Answer::Missed(req, _) => inner.call(req).await,
            }
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::{body_text, get, request};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::{service_fn, ServiceExt};

    /// A root with one file; removed on drop.
    struct Dir(std::path::PathBuf);

    impl Dir {
        fn new() -> Dir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "rip-front-files-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(path.join("dir")).unwrap();
            std::fs::write(path.join("hello.txt"), "from the root").unwrap();
            Dir(path)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The layer over an inner service that counts what reached it and answers "worker".
    fn files(
        dir: Option<&Dir>,
    ) -> (
        impl Service<Request<ClientBody>, Response = Response<ResponseBody>, Error = ProxyError> + Clone,
        Arc<AtomicUsize>,
    ) {
        let reached = Arc::new(AtomicUsize::new(0));
        let inner = service_fn({
            let reached = reached.clone();
            move |_req: Request<ClientBody>| {
                reached.fetch_add(1, Ordering::Relaxed);
                async { Ok::<_, ProxyError>(Response::new(ResponseBody::full("worker"))) }
            }
        });
        let root = LiveRoot::default();
        root.store(dir.map(|d| Arc::new(Root::open(&d.0, None).unwrap())));
        (Files::new(inner, root), reached)
    }

    #[tokio::test]
    async fn a_file_is_answered_here_and_everything_else_reaches_a_worker() {
        let dir = Dir::new();
        let (svc, reached) = files(Some(&dir));
        for _ in 0..2 {
            // Read, then kept.
            let response = svc.clone().oneshot(get("/hello.txt")).await.unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(body_text(response).await, "from the root");
        }
        let response = svc.clone().oneshot(get("/dir")).await.unwrap();
        assert_eq!(
            (response.status().as_u16(), response.headers()["location"].to_str().unwrap()),
            (307, "/dir/")
        );
        assert_eq!(reached.load(Ordering::Relaxed), 0);

        let mut upgrade = get("/hello.txt");
        upgrade.headers_mut().insert("upgrade", "websocket".parse().unwrap());
        upgrade.headers_mut().insert("connection", "upgrade".parse().unwrap());
        let mut two_hosts = get("/hello.txt");
        two_hosts.headers_mut().append("host", "second".parse().unwrap());
        let misses = [
            get("/missing.txt"),
            get("/dir/"),
            get("/../hello.txt"),
            request("POST", "/hello.txt", ClientBody::from("x")),
            upgrade,
            two_hosts,
        ];
        let count = misses.len();
        for req in misses {
            let response = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(body_text(response).await, "worker");
        }
        assert_eq!(reached.load(Ordering::Relaxed), count);
    }

    #[tokio::test]
    async fn without_a_root_every_request_reaches_a_worker() {
        let (svc, reached) = files(None);
        let response = svc.oneshot(get("/hello.txt")).await.unwrap();
        assert_eq!(body_text(response).await, "worker");
        assert_eq!(reached.load(Ordering::Relaxed), 1);
    }
}
