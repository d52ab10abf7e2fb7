//! The status page on the admin listener, in a real browser: headless Chromium loads it once,
//! the worker rows appear with the pids `rip status` reports, the rates fill in under traffic,
//! and after a reload the same page, never reloaded, shows the new workers and what changed.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use crate::harness::chromium::Browser;
use crate::harness::{runtime, settle, wait_until, Client, Control, Load, Rip, WAIT};

/// The rows of the page's worker table: (worker, pid, state).
const ROWS: &str = "JSON.stringify([...document.querySelectorAll('#workers tbody tr')]\
    .map(r => [r.dataset.worker, Number(r.dataset.pid), r.dataset.state]))";

fn rows(browser: &mut Browser) -> Vec<(String, i32, String)> {
    let json = browser.eval(ROWS);
    serde_json::from_str(json.as_str().unwrap_or("[]")).unwrap_or_default()
}

fn ready_pids(browser: &mut Browser) -> BTreeSet<i32> {
    rows(browser).into_iter().filter(|(_, _, state)| state == "ready").map(|(_, pid, _)| pid).collect()
}

fn text(browser: &mut Browser, id: &str) -> String {
    browser
        .eval(&format!("document.getElementById('{id}').textContent"))
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn the_status_page_shows_every_worker_and_follows_a_reload_without_being_reloaded() {
    let rip = Rip::start(&["--workers", "2", "--admin", "127.0.0.1:0", "--access-log", "off"]);
    rip.wait_all_ready();
    let admin: SocketAddr = rip
        .wait_for_log(|l| l.contains(" admin listener started "), WAIT)
        .and_then(|l| crate::harness::log_field(&l, "addr").and_then(|a| a.parse().ok()))
        .expect("the admin address is logged");
    let control = Control::of(&rip);
    let before = settle(&control, rip.pid(), 2);

    // One page, nothing fetched from elsewhere, sized for a phone.
    let page = runtime().block_on(async { Client::new(admin).get("/").await.unwrap() });
    let html = page.text();
    assert!(html.contains("<table id=\"workers\"") && html.contains("name=\"viewport\""), "{html}");
    for external in ["src=\"http", "href=\"http", "src=\"//", "href=\"//", "@import", "url("] {
        assert!(!html.contains(external), "the page loads something from elsewhere: {external}");
    }

    let mut browser = Browser::open(&format!("http://{admin}/"));
    assert!(
        wait_until(WAIT, || ready_pids(&mut browser) == before),
        "rows {:?}, workers {before:?}",
        rows(&mut browser)
    );

    // Traffic shows in the last minute's rate and latency.
    let report = runtime().block_on(Load::get("/").clients(4).total(400).deadline(WAIT).run(rip.addr()));
    assert_eq!(report.failed, 0);
    assert!(
        wait_until(WAIT, || text(&mut browser, "rps").replace(',', "").parse::<u64>().is_ok_and(|r| r > 0)),
        "requests/s: {}",
        text(&mut browser, "rps")
    );
    assert!(text(&mut browser, "latency").ends_with(" ms"), "{}", text(&mut browser, "latency"));

    // A reload replaces both workers; the open page follows.
    let reloaded = control.run(&["reload", "--wait"]);
    assert!(reloaded.status.success(), "{reloaded:?}");
    let after = settle(&control, rip.pid(), 2);
    assert!(before.is_disjoint(&after));
    assert!(
        wait_until(WAIT, || ready_pids(&mut browser) == after),
        "rows {:?}, workers {after:?}",
        rows(&mut browser)
    );
    assert!(
        wait_until(WAIT, || text(&mut browser, "recycles") == "2"),
        "recycles: {}",
        text(&mut browser, "recycles")
    );
    let events = text(&mut browser, "events");
    for pid in &before {
        assert!(events.contains(&format!("(pid {pid})")), "the page did not see {pid} go: {events}");
    }
    assert!(events.contains("started"), "{events}");
}
