//! Static files from a root directory. Invariant: no request can read a file outside the
//! root, whether by `..`, encoded separators, or a symbolic link that points out of it.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Router;
use tower::ServiceExt;
use tower_http::services::ServeDir;

/// A router serving files under `root` (index.html for directories).
pub fn static_files(root: &Path) -> Router {
    let root: Arc<Path> = match root.canonicalize() {
        Ok(p) => Arc::from(p),
        Err(_) => Arc::from(root),
    };
    let serve_dir = ServeDir::new(root.as_ref()).append_index_html_on_directories(true);
    Router::new().fallback(move |req: Request| {
        let root = root.clone();
        let serve_dir = serve_dir.clone();
        async move {
            if !contained(&root, req.uri().path()) {
                return StatusCode::NOT_FOUND.into_response();
            }
            match serve_dir.oneshot(req).await {
                Ok(resp) => resp.map(Body::new),
                Err(never) => match never {},
            }
        }
    })
}

/// True when the file a request path names resolves (links followed) inside `root`.
fn contained(root: &Path, uri_path: &str) -> bool {
    let Some(relative) = decode(uri_path) else {
        return false;
    };
    let mut path = root.to_path_buf();
    for component in relative.components() {
        match component {
            Component::Normal(part) => path.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return false,
        }
    }
    match path.canonicalize() {
        Ok(real) => real.starts_with(root),
        // Missing files are ServeDir's to answer (404); nothing outside can be read.
        Err(_) => true,
    }
}

/// Percent-decodes a request path; refuses NUL and backslashes.
fn decode(uri_path: &str) -> Option<PathBuf> {
    let bytes = uri_path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    if out.contains(&0) || out.contains(&b'\\') {
        return None;
    }
    let text = String::from_utf8(out).ok()?;
    Some(PathBuf::from(text.trim_start_matches('/')))
}
