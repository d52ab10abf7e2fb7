//! A handler that panics costs one 500 and nothing else: the worker and its state stay.
//! Handlers that block or take too long are in `stalls.rs`.
//!
//! Tests print one `faults: ...` line with their figures, shown with `-- --nocapture`.

use hyper::StatusCode;

use crate::harness::{example_binary, is_running, lines_after, runtime, served_by, Client, Rip};

#[test]
fn a_panic_in_a_user_handler_costs_one_500_not_the_worker() {
    const PANICS: usize = 5;
    let rip = Rip::builder().program(example_binary("json_api")).args(&["--workers", "1"]).start();
    rip.wait_all_ready();
    let rt = runtime();
    let mark = rip.log_mark();

    let (pid, statuses) = rt.block_on(async {
        let mut client = Client::new(rip.addr());
        let created =
            client.post_json("/api/items", r#"{"text":"survive a panic"}"#).await.expect("POST /api/items");
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
        let note = created.json();
        let location = format!("/api/items/{}", note["id"]);
        let pid = served_by(&created);

        let mut statuses = Vec::new();
        for _ in 0..PANICS {
            let reply = client.get("/api/panic").await.expect("GET /api/panic");
            statuses.push(reply.status.as_u16());
            // The same process still answers, with the note it held before the panic.
            let reply = client.get(&location).await.expect("GET the note");
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            assert_eq!(served_by(&reply), pid, "another worker answered after a panic");
            assert_eq!(reply.json(), note);
        }
        (pid, statuses)
    });
    println!("faults: handler_panic panics={PANICS} statuses={statuses:?} worker_kept=true");
    assert_eq!(statuses, vec![500; PANICS]);
    assert!(is_running(pid));
    let exits = lines_after(&rip, mark, " worker exited").len();
    assert_eq!(exits, 0, "a worker exited after a handler panic");
}
