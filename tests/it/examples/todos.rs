//! examples/todos.rs: a CRUD API whose state lives in a directory shared by every worker, so
//! unlike json_api's per-worker notes, any worker answers for any todo; and a store the
//! workers cannot write is a failed start that backs off.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::header::{HeaderValue, CONTENT_TYPE, LOCATION};
use hyper::{Method, StatusCode};
use serde_json::Value;

use crate::harness::{
    backoff_delays, empty, example, full, request, runtime, served_by, wait_until, Client, Reply, Rip,
    REQUEST_TIMEOUT, WAIT,
};

/// Most requests a test sends to reach each of two workers: ties in the balancer rotate, so
/// a few normally do.
const TO_REACH_BOTH: usize = 50;

/// `todos serve --workers 2` with its store in the test's private dir.
fn start() -> Rip {
    let builder = example("todos").args(&["--workers", "2"]);
    let store = builder.dir().join("todos");
    builder.env("TODOS_DIR", store).start_all_ready()
}

fn workers(rip: &Rip) -> BTreeSet<i32> {
    let workers: BTreeSet<i32> = rip.worker_pids().into_iter().collect();
    assert_eq!(workers.len(), 2, "two workers spawned: {workers:?}");
    workers
}

/// A request with a JSON body.
async fn send_json(client: &mut Client, method: Method, path: &str, body: &str) -> Reply {
    let mut req = request(method, path, full(body.to_string()));
    req.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    client.request(req).await.expect("a reply")
}

async fn create(client: &mut Client, title: &str) -> Value {
    let body = serde_json::json!({ "title": title }).to_string();
    let created = send_json(client, Method::POST, "/todos", &body).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let todo = created.json();
    let location = format!("/todos/{}", todo["id"].as_u64().expect("a numeric id"));
    assert_eq!(created.headers[LOCATION], location.as_str());
    todo
}

/// `GET path` until each of `workers` answered it, each answer held to `check`.
async fn on_every_worker(addr: SocketAddr, path: &str, workers: &BTreeSet<i32>, check: impl Fn(&Reply)) {
    let mut client = Client::new(addr);
    let mut reached = BTreeSet::new();
    for _ in 0..TO_REACH_BOTH {
        let reply = client.get(path).await.expect("a GET reply");
        let pid = served_by(&reply);
        assert!(workers.contains(&pid), "{pid} is not a worker");
        check(&reply);
        reached.insert(pid);
        if &reached == workers {
            return;
        }
    }
    panic!("only workers {reached:?} of {workers:?} answered {path}");
}

#[test]
fn a_todo_created_through_one_worker_is_found_through_every_worker() {
    let todos = start();
    let workers = workers(&todos);
    runtime().block_on(async {
        let todo = create(&mut Client::new(todos.addr()), "buy milk").await;
        assert_eq!(todo["title"], "buy milk");
        assert_eq!(todo["done"], false);
        let path = format!("/todos/{}", todo["id"]);
        on_every_worker(todos.addr(), &path, &workers, |reply| {
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            assert_eq!(reply.json(), todo);
        })
        .await;
        on_every_worker(todos.addr(), "/todos", &workers, |reply| {
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            assert_eq!(reply.json(), Value::Array(vec![todo.clone()]));
        })
        .await;

        let mut client = Client::new(todos.addr());
        let empty_title = send_json(&mut client, Method::POST, "/todos", r#"{"title":"  "}"#).await;
        assert_eq!(empty_title.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(empty_title.json()["error"].is_string());
        let missing = client.get("/todos/987654321").await.expect("a GET reply");
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        assert!(missing.json()["error"].is_string());
    });
}

#[test]
fn an_update_and_a_delete_through_one_worker_are_seen_through_every_worker() {
    let todos = start();
    let workers = workers(&todos);
    runtime().block_on(async {
        let mut client = Client::new(todos.addr());
        let todo = create(&mut client, "write tests").await;
        let path = format!("/todos/{}", todo["id"]);

        let updated = send_json(&mut client, Method::PATCH, &path, r#"{"done":true}"#).await;
        assert_eq!(updated.status, StatusCode::OK, "{}", updated.text());
        let done = updated.json();
        assert_eq!((&done["title"], &done["done"]), (&todo["title"], &Value::Bool(true)));
        on_every_worker(todos.addr(), &path, &workers, |reply| {
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            assert_eq!(reply.json(), done);
        })
        .await;
        let renamed = send_json(&mut client, Method::PATCH, &path, r#"{"title":""}"#).await;
        assert_eq!(renamed.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", renamed.text());

        let deleted = client.request(request(Method::DELETE, &path, empty())).await.expect("a DELETE reply");
        assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.text());
        on_every_worker(todos.addr(), &path, &workers, |reply| {
            assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
            assert!(reply.json()["error"].is_string());
        })
        .await;
        let again = client.request(request(Method::DELETE, &path, empty())).await.expect("a DELETE reply");
        assert_eq!(again.status, StatusCode::NOT_FOUND);
        let gone = send_json(&mut client, Method::PATCH, &path, r#"{"done":false}"#).await;
        assert_eq!(gone.status, StatusCode::NOT_FOUND);
    });
}

#[test]
fn concurrent_creates_through_both_workers_get_unique_ids_and_all_are_listed() {
    const CLIENTS: usize = 16;
    const TODOS: usize = 200;
    let todos = start();
    let workers = workers(&todos);
    let addr = todos.addr();
    let created = runtime().block_on(async {
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|c| {
                tokio::spawn(async move {
                    let mut client = Client::new(addr);
                    let mut made = Vec::new();
                    // Client c makes todos c, c + CLIENTS, ...: TODOS in all.
                    for n in (c..TODOS).step_by(CLIENTS) {
                        let body = serde_json::json!({ "title": format!("todo {n}") }).to_string();
                        let reply = send_json(&mut client, Method::POST, "/todos", &body).await;
                        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
                        made.push((reply.json()["id"].as_u64().expect("an id"), served_by(&reply)));
                    }
                    made
                })
            })
            .collect();
        let mut created = Vec::new();
        for task in tasks {
            let made = tokio::time::timeout(REQUEST_TIMEOUT, task).await.expect("creates in time");
            created.extend(made.expect("a client's creates"));
        }
        created
    });
    assert_eq!(created.len(), TODOS);
    let ids: BTreeSet<u64> = created.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), TODOS, "an id was issued twice");
    let creators: BTreeSet<i32> = created.iter().map(|(_, pid)| *pid).collect();
    assert_eq!(creators, workers, "both workers issued ids");

    let listed = runtime().block_on(async { Client::new(addr).get("/todos").await.expect("GET /todos") });
    assert_eq!(listed.status, StatusCode::OK);
    let listed: BTreeSet<u64> =
        listed.json().as_array().expect("a list").iter().map(|t| t["id"].as_u64().expect("an id")).collect();
    assert_eq!(listed, ids);
}

#[test]
fn workers_that_cannot_write_the_todos_dir_fail_to_start_and_back_off_while_clients_get_503() {
    // A short queue timeout, so that a request does not wait long for a worker that never comes.
    let builder = example("todos").args(&["--workers", "2", "--queue-timeout", "200ms"]);
    // A directory cannot be created under a regular file, whoever runs the test (even root).
    let file = builder.dir().join("not-a-dir");
    std::fs::write(&file, "").unwrap();
    let todos = builder.env("TODOS_DIR", file.join("todos")).start_listening();

    let failed = todos
        .wait_for_log(
            |l| l.contains(" worker exited unexpectedly ") && l.contains("creating the todo directory"),
            WAIT,
        )
        .expect("a worker's exit logged with the error of its start");
    assert!(failed.contains(&file.display().to_string()), "the error names the path: {failed}");
    let mut delays = Default::default();
    let backed_off = wait_until(WAIT, || {
        delays = backoff_delays(&todos, 0);
        delays.values().any(|d| d.len() >= 3)
    });
    assert!(backed_off, "fewer than 3 backoffs in a slot: {delays:?}");
    for (slot, d) in &delays {
        assert!(d.windows(2).all(|w| w[1] > w[0]), "slot {slot} delays not growing: {d:?}");
    }

    let (reply, waited) = runtime().block_on(async {
        let asked = Instant::now();
        (Client::new(todos.addr()).get("/todos").await.expect("GET /todos"), asked.elapsed())
    });
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    assert!(waited < Duration::from_secs(2), "503 after {waited:?}");
    assert!(!todos.logs().iter().any(|l| l.contains(" worker ready ")), "a worker became ready");
}
