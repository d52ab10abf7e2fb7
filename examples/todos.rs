//! A todo list API whose todos every worker sees: they live in a directory that all workers
//! share, not in any worker's memory.
//!
//! ```text
//! TODOS_DIR=/tmp/todos cargo run --example todos -- serve --port 3000 --workers 2
//! curl -i localhost:3000/todos -H 'content-type: application/json' -d '{"title":"milk"}'
//! curl -i localhost:3000/todos/1 -X PATCH -H 'content-type: application/json' -d '{"done":true}'
//! curl -i localhost:3000/todos
//! ```
//!
//! Every rip worker is a process of its own, so a `HashMap` in the app would be one map per
//! worker: a todo created through one worker would be missing from the next answer that
//! another worker gives, and gone when its worker is recycled (examples/json_api.rs shows
//! exactly that). Two honest ways out: keep the state outside the workers, in a store they
//! all reach — a database, Redis, or, as here, files — or serve with `--workers 1` and
//! accept one process's worth of throughput and a restart losing everything.
//!
//! The store is a directory (`TODOS_DIR`, created if missing):
//!
//! - `ids/<id>`: one empty file per id ever handed out, made with `create_new`, which the
//!   kernel grants to exactly one process, so two workers never issue the same id; never
//!   removed, so a deleted todo's id is not reused either.
//! - `todos/<id>.json`: the todo now, always replaced whole (written to `tmp/`, then renamed
//!   over), so a reader sees the old version or the new one, never half of either.
//!
//! What files do not give is transactions: two PATCHes of one todo at the same moment keep
//! the last, and a PATCH racing a DELETE may bring the todo back. That is where a real app
//! wants its database.
//!
//! The worker prepares the directory in [`rip::Rip::new_async`]'s factory, before it is
//! ready; a directory it cannot write is a failed start, logged with the reason, and the
//! restarts back off while the front-end answers 503. Every response names the worker that
//! gave it in `x-rip-worker-pid`.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_http::set_header::SetResponseHeaderLayer;

fn main() -> ExitCode {
    rip::Rip::new_async(|_ctx| async {
        let dir = std::env::var_os("TODOS_DIR")
            .context("TODOS_DIR is not set: name the directory that every worker keeps the todos in")?;
        // File system calls block; the worker's runtime has other things to do meanwhile.
        let store = tokio::task::spawn_blocking(move || Store::open(dir)).await??;
        Ok(app(store))
    })
    .run()
}

fn app(store: Store) -> Router {
    Router::new()
        .route("/todos", get(list).post(create))
        .route("/todos/{id}", get(fetch).patch(update).delete(remove))
        .with_state(store)
        // Names the worker that answered, to show that any of them answers for any todo.
        .layer(SetResponseHeaderLayer::overriding(
            HeaderName::from_static("x-rip-worker-pid"),
            HeaderValue::from(std::process::id()),
        ))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Todo {
    id: u64,
    title: String,
    done: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTodo {
    title: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Change {
    title: Option<String>,
    done: Option<bool>,
}

async fn list(State(store): State<Store>) -> Response {
    match blocking(move || store.list()).await {
        Ok(todos) => Json(todos).into_response(),
        Err(response) => response,
    }
}

async fn create(State(store): State<Store>, Json(new): Json<NewTodo>) -> Response {
    if new.title.trim().is_empty() {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "title must not be empty");
    }
    match blocking(move || store.create(new.title)).await {
        Ok(todo) => {
            let location = format!("/todos/{}", todo.id);
            (StatusCode::CREATED, [(header::LOCATION, location)], Json(todo)).into_response()
        }
        Err(response) => response,
    }
}

async fn fetch(State(store): State<Store>, UrlPath(id): UrlPath<u64>) -> Response {
    match blocking(move || store.get(id)).await {
        Ok(Some(todo)) => Json(todo).into_response(),
        Ok(None) => not_found(id),
        Err(response) => response,
    }
}

async fn update(
    State(store): State<Store>,
    UrlPath(id): UrlPath<u64>,
    Json(change): Json<Change>,
) -> Response {
    if change.title.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "title must not be empty");
    }
    match blocking(move || store.update(id, change)).await {
        Ok(Some(todo)) => Json(todo).into_response(),
        Ok(None) => not_found(id),
        Err(response) => response,
    }
}

async fn remove(State(store): State<Store>, UrlPath(id): UrlPath<u64>) -> Response {
    match blocking(move || store.delete(id)).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => not_found(id),
        Err(response) => response,
    }
}

/// Runs a store call off the runtime's threads; a failure is a 500 whose details go to the
/// log, not to the client.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, Response> {
    let failure = match tokio::task::spawn_blocking(call).await {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    tracing::error!(error = failure, "todo store failed");
    Err(error(StatusCode::INTERNAL_SERVER_ERROR, "the todo store failed"))
}

fn not_found(id: u64) -> Response {
    error(StatusCode::NOT_FOUND, &format!("no todo {id}"))
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// The todo directory, shared by every worker (see the module doc for its layout).
#[derive(Clone)]
struct Store(Arc<Dirs>);

struct Dirs {
    ids: PathBuf,
    todos: PathBuf,
    tmp: PathBuf,
}

impl Store {
    /// Creates the directory if needed and proves that this worker can write in it, so that
    /// a worker that could not is never ready rather than failing its first POST.
    fn open(root: OsString) -> anyhow::Result<Store> {
        let root = PathBuf::from(root);
        let dirs = Dirs { ids: root.join("ids"), todos: root.join("todos"), tmp: root.join("tmp") };
        for dir in [&dirs.ids, &dirs.todos, &dirs.tmp] {
            fs::create_dir_all(dir)
                .with_context(|| format!("creating the todo directory {}", dir.display()))?;
        }
        let probe = dirs.tmp.join(format!("probe.{}", std::process::id()));
        fs::write(&probe, b"")
            .with_context(|| format!("writing in the todo directory {}", root.display()))?;
        fs::remove_file(&probe).with_context(|| format!("cleaning up {}", probe.display()))?;
        Ok(Store(Arc::new(dirs)))
    }

    fn list(&self) -> io::Result<Vec<Todo>> {
        let mut todos = Vec::new();
        for entry in fs::read_dir(&self.0.todos)? {
            let Some(id) = id_of(&entry?.path(), "json") else { continue };
            // Deleted since the directory was read: not an error, just no longer listed.
            if let Some(todo) = self.get(id)? {
                todos.push(todo);
            }
        }
        todos.sort_by_key(|t| t.id);
        Ok(todos)
    }

    fn get(&self, id: u64) -> io::Result<Option<Todo>> {
        match fs::read(self.todo_path(id)) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn create(&self, title: String) -> io::Result<Todo> {
        let todo = Todo { id: self.allocate_id()?, title, done: false };
        self.write(&todo)?;
        Ok(todo)
    }

    fn update(&self, id: u64, change: Change) -> io::Result<Option<Todo>> {
        let Some(mut todo) = self.get(id)? else { return Ok(None) };
        if let Some(title) = change.title {
            todo.title = title;
        }
        if let Some(done) = change.done {
            todo.done = done;
        }
        self.write(&todo)?;
        Ok(Some(todo))
    }

    fn delete(&self, id: u64) -> io::Result<bool> {
        match fs::remove_file(self.todo_path(id)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The lowest id above every one issued so far, by any worker. Two workers may both try
    /// the same id; `create_new` lets one win, and the other moves on to the next.
    fn allocate_id(&self) -> io::Result<u64> {
        let mut id = 1;
        for entry in fs::read_dir(&self.0.ids)? {
            if let Some(issued) = id_of(&entry?.path(), "") {
                id = id.max(issued + 1);
            }
        }
        loop {
            match OpenOptions::new().write(true).create_new(true).open(self.0.ids.join(id.to_string())) {
                Ok(_) => return Ok(id),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => id += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Replaces the todo's file whole: readers in any worker see the old content or the new.
    fn write(&self, todo: &Todo) -> io::Result<()> {
        static WRITES: AtomicU64 = AtomicU64::new(0);
        // Unique per write in every worker, so concurrent writers never share a temp file.
        let n = WRITES.fetch_add(1, Ordering::Relaxed);
        let tmp = self.0.tmp.join(format!("{}.{}.{n}", todo.id, std::process::id()));
        let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        let written = file
            .write_all(&serde_json::to_vec(todo)?)
            // On disk before the rename, so a crash cannot leave the new name on an empty file.
            .and_then(|()| file.sync_all())
            .and_then(|()| fs::rename(&tmp, self.todo_path(todo.id)));
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }

    fn todo_path(&self, id: u64) -> PathBuf {
        self.0.todos.join(format!("{id}.json"))
    }
}

/// The id a store file is named after: `<id>.<extension>`, or `<id>` for an empty extension.
fn id_of(path: &Path, extension: &str) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let stem = if extension.is_empty() { name } else { name.strip_suffix(extension)?.strip_suffix('.')? };
    stem.parse().ok()
}
