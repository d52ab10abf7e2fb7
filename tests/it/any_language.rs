//! `rip serve -- CMD`: workers that are not rip, the Node and Python examples of examples/.
//! Requests spread over every worker; a killed worker, `--max-requests` recycling and a
//! reload after a code change fail no request under load; a command that cannot start backs
//! off and `reload --wait` says why; SIGTERM lets in-flight requests finish; nothing a
//! worker started outlives rip, killed or not; the three ways of passing the socket, the
//! health path and the stop signal do what they say.
//!
//! Node.js and Python 3 must be installed (the machine image has both); a test that needs
//! one fails, saying which, rather than skipping.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use nix::sys::signal::Signal;

use crate::harness::{
    is_running, lines_after, log_field, no_failures, runtime, settle, wait_gone, wait_until, Client, Control,
    Load, Rip, TempDir, WhoAmI, AFTERWARDS, SETTLE, WAIT,
};

#[derive(Debug, Clone, Copy)]
enum Lang {
    Node,
    Python,
}

impl Lang {
    fn program(self) -> &'static str {
        match self {
            Lang::Node => "node",
            Lang::Python => "python3",
        }
    }

    /// The example app of examples/.
    fn example(self) -> PathBuf {
        let file = match self {
            Lang::Node => "examples/node/server.js",
            Lang::Python => "examples/python/app.py",
        };
        Path::new(env!("CARGO_MANIFEST_DIR")).join(file)
    }

    /// `-- PROGRAM SCRIPT`, after checking that PROGRAM is installed.
    fn command(self, script: &Path) -> Vec<String> {
        need(self.program());
        vec!["--".into(), self.program().into(), script.display().to_string()]
    }
}

/// Fails the test, saying what to install, when `program` is not on PATH.
fn need(program: &str) {
    let found =
        std::process::Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{program} is not installed: the any-language tests drive real Node.js and Python workers \
         (Debian: apt install nodejs python3)"
    );
}

/// `rip serve ARGS -- <lang> <script>`, every worker ready.
fn serve(lang: Lang, script: &Path, args: &[&str]) -> Rip {
    let rip = Rip::builder().args(args).args(&lang.command(script)).start();
    rip.wait_all_ready();
    rip
}

/// `GET /whoami` `n` times on one connection: the pids that answered.
fn pids_answering(rip: &Rip, n: usize) -> BTreeSet<i32> {
    runtime().block_on(async {
        let mut client = Client::new(rip.addr());
        let mut pids = BTreeSet::new();
        for _ in 0..n {
            let reply = client.get("/whoami").await.expect("GET /whoami");
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            pids.insert(WhoAmI::parse(&reply.body).expect("a /whoami answer").pid);
        }
        pids
    })
}

/// Every process whose process group is `group`.
fn group_members(group: i32) -> Vec<i32> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("reading /proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let Some((_, fields)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = fields.split_whitespace().collect();
        let zombie = fields.first() == Some(&"Z");
        if !zombie && fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(group) {
            members.push(pid);
        }
    }
    members
}

#[test]
fn requests_spread_over_every_node_and_python_worker() {
    for lang in [Lang::Node, Lang::Python] {
        let rip = serve(lang, &lang.example(), &["--workers", "3"]);
        let control = Control::of(&rip);
        let workers = settle(&control, rip.pid(), 3);
        let report =
            runtime().block_on(Load::get("/whoami").clients(8).total(300).deadline(WAIT).run(rip.addr()));
        no_failures(&report);
        assert_eq!(report.pids(), workers, "{lang:?}: workers answering vs ready");
        // Each worker's stdout is in rip's log, tagged with the worker.
        let line = rip
            .wait_for_log(|l| l.contains(" listening") && log_field(l, "stream") == Some("stdout"), WAIT)
            .unwrap_or_else(|| panic!("{lang:?}: a worker's stdout line in rip's log"));
        assert!(log_field(&line, "worker").is_some(), "{line}");
        // A request body goes through as sent.
        let echoed =
            runtime().block_on(async { Client::new(rip.addr()).post("/echo", "a body").await.unwrap() });
        assert_eq!((echoed.status, echoed.text().as_str()), (StatusCode::OK, "a body"), "{lang:?}");
    }
}

#[test]
fn rip_scale_starts_and_stops_command_workers() {
    let rip = serve(Lang::Python, &Lang::Python.example(), &["--workers", "2"]);
    let control = Control::of(&rip);
    let two = settle(&control, rip.pid(), 2);
    let scaled = control.run(&["scale", "3"]);
    assert!(scaled.status.success(), "{scaled:?}");
    let three = settle(&control, rip.pid(), 3);
    assert!(two.is_subset(&three), "{two:?} then {three:?}");
    assert_eq!(pids_answering(&rip, 30), three);
    assert!(control.run(&["scale", "1"]).status.success());
    let one = settle(&control, rip.pid(), 1);
    let gone: Vec<i32> = three.difference(&one).copied().collect();
    assert!(wait_gone(&gone, WAIT).is_empty(), "scaled-away workers still run: {gone:?}");
}

#[test]
fn a_sigkilled_node_worker_is_replaced_without_a_failed_request() {
    let rt = runtime();
    let rip = serve(Lang::Node, &Lang::Node.example(), &["--workers", "2", "--access-log", "off"]);
    let control = Control::of(&rip);
    let before = settle(&control, rip.pid(), 2);

    let load = Load::get("/whoami").clients(8).total(usize::MAX).deadline(Duration::from_secs(60));
    let traffic = load.handle();
    let running = rt.spawn(load.run(rip.addr()));
    assert!(wait_until(WAIT, || traffic.done() >= AFTERWARDS), "load did not get going");
    let victim = *before.first().unwrap();
    let mark = rip.log_mark();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    rip.wait_for_log_from(mark, |l| l.contains(" worker ready "), SETTLE)
        .expect("a replacement became ready");
    let replaced = traffic.done();
    assert!(wait_until(WAIT, || traffic.done() >= replaced + AFTERWARDS), "load stalled after the kill");
    traffic.stop();
    let report = rt.block_on(running).unwrap();

    no_failures(&report);
    let after = settle(&control, rip.pid(), 2);
    assert!(!after.contains(&victim), "{after:?}");
    let exited = lines_after(&rip, mark, " worker exited unexpectedly ");
    assert!(exited.iter().any(|l| log_field(l, "status") == Some("signal 9 (SIGKILL)")), "{exited:#?}");
}

#[test]
fn max_requests_5_recycles_node_and_python_workers_under_load_without_a_failed_request() {
    for lang in [Lang::Python, Lang::Node] {
        let rt = runtime();
        let rip =
            serve(lang, &lang.example(), &["--workers", "2", "--max-requests", "5", "--access-log", "off"]);
        let load = Load::get("/whoami").clients(4).total(20_000).deadline(Duration::from_secs(90));
        let traffic = load.handle();
        let running = rt.spawn(load.run(rip.addr()));
        // Each recycle starts a fresh interpreter; under load, ten of them in a row.
        let recycled = wait_until(SETTLE, || lines_after(&rip, 0, " worker recycled ").len() >= 10);
        traffic.stop();
        let report = rt.block_on(running).unwrap();
        no_failures(&report);
        assert!(
            recycled,
            "{lang:?}: fewer than 10 recycles: {:#?}",
            lines_after(&rip, 0, " worker recycled ")
        );
        assert!(report.pids().len() >= 10, "{lang:?}: {} workers answered", report.pids().len());
    }
}

#[test]
fn sighup_after_a_code_change_serves_the_new_code_without_a_failed_request() {
    let rt = runtime();
    let builder = Rip::builder();
    let script = builder.dir().join("server.js");
    let original = std::fs::read_to_string(Lang::Node.example()).unwrap();
    std::fs::write(&script, &original).unwrap();
    let rip =
        builder.args(&["--workers", "2", "--access-log", "off"]).args(&Lang::Node.command(&script)).start();
    rip.wait_all_ready();
    let greeting = |rip: &Rip| rt.block_on(async { Client::new(rip.addr()).get("/").await.unwrap().text() });
    assert!(greeting(&rip).starts_with("Hello from Node:"), "{}", greeting(&rip));

    let load = Load::get("/whoami").clients(4).total(usize::MAX).deadline(Duration::from_secs(90));
    let traffic = load.handle();
    let running = rt.spawn(load.run(rip.addr()));
    assert!(wait_until(WAIT, || traffic.done() >= AFTERWARDS), "load did not get going");
    // A deploy: new code on disk, then a reload.
    std::fs::write(&script, original.replace("Hello from Node", "Hello from the new deploy")).unwrap();
    let mark = rip.log_mark();
    rip.signal(Signal::SIGHUP);
    rip.wait_for_log_from(mark, |l| l.contains(" reload finished"), SETTLE).expect("the reload finished");
    let reloaded = traffic.done();
    assert!(wait_until(WAIT, || traffic.done() >= reloaded + AFTERWARDS), "load stalled after the reload");
    traffic.stop();
    no_failures(&rt.block_on(running).unwrap());

    for _ in 0..10 {
        let text = greeting(&rip);
        assert!(text.starts_with("Hello from the new deploy:"), "old code still answering: {text}");
    }
}

#[test]
fn a_command_that_exits_at_start_backs_off_and_reload_wait_says_why() {
    const WHY: &str = "boom: DATABASE_URL is not set";
    need("node");
    // A deploy that breaks: the old workers keep serving, `reload --wait` fails with the
    // new workers' own words.
    let builder = Rip::builder();
    let script = builder.dir().join("server.js");
    std::fs::copy(Lang::Node.example(), &script).unwrap();
    let rip = builder.args(&["--workers", "2"]).args(&Lang::Node.command(&script)).start();
    rip.wait_all_ready();
    let control = Control::of(&rip);
    let serving = settle(&control, rip.pid(), 2);
    std::fs::write(&script, format!("console.error({WHY:?});\nprocess.exit(3);\n")).unwrap();
    let failed = control.run(&["reload", "--wait", "--timeout", "60s"]);
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    assert!(failed.stderr.contains(WHY), "the reason lacks the worker's stderr: {failed:?}");
    assert_eq!(pids_answering(&rip, 10), serving, "the old workers keep serving");

    // Started broken: each slot's restarts back off, each exit logged with the reason.
    let builder = Rip::builder();
    let script = builder.dir().join("broken.js");
    std::fs::write(&script, format!("console.error({WHY:?});\nprocess.exit(3);\n")).unwrap();
    let rip = builder
        .args(&["--workers", "1", "--queue-timeout", "100ms"])
        .args(&Lang::Node.command(&script))
        .start_listening();
    let mut delays = Default::default();
    let backed_off = wait_until(WAIT, || {
        delays = crate::harness::backoff_delays(&rip, 0);
        delays.values().any(|d: &Vec<u64>| d.len() >= 3)
    });
    assert!(backed_off, "fewer than 3 backoffs: {delays:?}");
    let slot = delays.values().find(|d| d.len() >= 3).unwrap();
    assert!(slot.windows(2).all(|w| w[1] > w[0]), "backoff does not grow: {slot:?}");
    let exit = rip.wait_for_log(|l| l.contains(" worker exited unexpectedly ") && l.contains(WHY), WAIT);
    assert_eq!(exit.as_deref().and_then(|l| log_field(l, "status")), Some("exit code 3"), "{exit:?}");
    let answer = runtime().block_on(async { Client::new(rip.addr()).get("/").await.unwrap() });
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[test]
fn sigterm_lets_in_flight_requests_of_node_and_python_workers_finish() {
    for lang in [Lang::Node, Lang::Python] {
        let rt = runtime();
        let mut rip = serve(lang, &lang.example(), &["--workers", "2"]);
        let control = Control::of(&rip);
        let addr = rip.addr();
        let slow: Vec<_> = (0..4)
            .map(|_| {
                rt.spawn(
                    async move { Client::new(addr).get("/slow?ms=1500").await.map(|r| (r.status, r.text())) },
                )
            })
            .collect();
        assert!(wait_until(WAIT, || control.status().in_flight == 4), "{lang:?}: 4 requests in flight");
        rip.signal(Signal::SIGTERM);
        for request in slow {
            let (status, text) = rt.block_on(request).unwrap().expect("an answer, not a dropped connection");
            assert_eq!(status, StatusCode::OK, "{lang:?}: {text}");
            assert!(text.starts_with("slept 1500 ms"), "{lang:?}: {text}");
        }
        let status = rip.wait_exit(WAIT);
        assert!(status.success(), "{lang:?}: rip exited with {status}");
    }
}

#[test]
fn no_process_of_a_workers_group_outlives_rip_even_when_rip_is_killed() {
    for (lang, signal) in
        [(Lang::Python, Signal::SIGKILL), (Lang::Node, Signal::SIGKILL), (Lang::Node, Signal::SIGTERM)]
    {
        need(lang.program());
        // The app leaves a child of its own behind, as `npm start` or a shell would.
        let script = lang.example().display().to_string();
        let command = format!("sleep 600 & exec {} {script}", lang.program());
        let mut rip = Rip::builder().args(&["--workers", "2", "--", "sh", "-c", &command]).start();
        rip.wait_all_ready();
        let groups = settle(&Control::of(&rip), rip.pid(), 2);
        let sleeper = |group: &i32| group_members(*group).into_iter().any(|p| p != *group);
        assert!(wait_until(WAIT, || groups.iter().all(sleeper)), "each worker's group holds its sleep");
        let members: Vec<i32> = groups.iter().flat_map(|g| group_members(*g)).collect();

        rip.signal(signal);
        rip.wait_exit(WAIT);
        let left = wait_gone(&members, WAIT);
        assert!(left.is_empty(), "{lang:?} after {signal}: still running {left:?} of {members:?}");
        assert!(!is_running(rip.pid()));
    }
}

#[test]
fn sockets_by_path_and_by_port_and_any_health_answer_below_500() {
    // Python binds $RIP_SOCKET itself; Node listens on $PORT; neither has /ready, and a 404
    // there still means the app is up.
    let cases: [(Lang, &[&str]); 2] = [
        (Lang::Python, &["--app-socket", "path", "--health-path", "/ready"]),
        (Lang::Node, &["--app-socket", "port", "--health-path", "/ready"]),
    ];
    for (lang, args) in cases {
        let mut all = vec!["--workers", "2"];
        all.extend_from_slice(args);
        let rip = serve(lang, &lang.example(), &all);
        let workers = settle(&Control::of(&rip), rip.pid(), 2);
        let report =
            runtime().block_on(Load::get("/whoami").clients(4).total(100).deadline(WAIT).run(rip.addr()));
        no_failures(&report);
        assert_eq!(report.pids(), workers, "{lang:?} {args:?}");
    }
    // An app that answers 503 is not ready: the start timeout runs out and says why.
    need("python3");
    let builder = Rip::builder();
    let script = builder.dir().join("unready.py");
    std::fs::write(
        &script,
        "import os, socket\nfrom http.server import BaseHTTPRequestHandler, HTTPServer\n\
         class H(BaseHTTPRequestHandler):\n    def log_message(self, *_):\n        pass\n    def do_GET(self):\n        self.send_error(503)\n\
         s = HTTPServer(('', 0), H, bind_and_activate=False)\ns.socket = socket.socket(fileno=3)\ns.serve_forever()\n",
    )
    .unwrap();
    let rip = builder
        .args(&["--workers", "1", "--start-timeout", "1s"])
        .args(&Lang::Python.command(&script))
        .start_listening();
    let failed =
        rip.wait_for_log(|l| l.contains(" 503"), WAIT).expect("the failed start names the 503 the probe got");
    assert!(failed.contains("not ready after 1000 ms"), "{failed}");
}

#[test]
fn the_stop_signal_is_what_the_app_drains_on() {
    need("python3");
    // An app that ignores SIGTERM and exits cleanly on SIGQUIT.
    let dir = TempDir::new();
    let script = dir.path().join("quits.py");
    std::fs::write(
        &script,
        "import signal, socket, sys\nfrom http.server import BaseHTTPRequestHandler, HTTPServer\n\
         signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
         signal.signal(signal.SIGQUIT, lambda *_: sys.exit(0))\n\
         class H(BaseHTTPRequestHandler):\n    def log_message(self, *_):\n        pass\n    def do_GET(self):\n        self.send_response(200)\n        \
         self.send_header('content-length', '0')\n        self.end_headers()\n\
         s = HTTPServer(('', 0), H, bind_and_activate=False)\ns.socket = socket.socket(fileno=3)\ns.serve_forever()\n",
    )
    .unwrap();
    let command = Lang::Python.command(&script);
    // With SIGQUIT the worker exits at once, well within a long grace; with the default
    // SIGTERM it ignores the request and is killed when a short grace runs out.
    for (stop, grace, expected) in
        [("SIGQUIT", "30s", "exit code 0"), ("SIGTERM", "1s", "signal 9 (SIGKILL)")]
    {
        let mut rip = Rip::builder()
            .args(&["--workers", "1", "--stop-signal", stop, "--graceful-timeout", grace])
            .args(&command)
            .start();
        rip.wait_all_ready();
        let started = Instant::now();
        rip.signal(Signal::SIGTERM);
        rip.wait_exit(WAIT);
        let exited =
            rip.logs().into_iter().find(|l| l.contains(" worker exited ")).expect("the worker's exit");
        assert_eq!(log_field(&exited, "status"), Some(expected), "--stop-signal {stop}: {exited}");
        if stop == "SIGQUIT" {
            assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
        }
    }
}

/// `--root` in front of an app: the front-end answers what names a file, under load from
/// several clients, and the app gets everything else — its own routes, and a missing file,
/// which it answers as it likes.
#[test]
fn a_root_in_front_of_a_node_app_serves_files_and_passes_the_rest() {
    let public = TempDir::new();
    std::fs::write(public.path().join("style.css"), "body { color: teal }").unwrap();
    let root = public.path().display().to_string();
    let rip = serve(Lang::Node, &Lang::Node.example(), &["--workers", "2", "--root", &root]);
    let (css, app) = runtime().block_on(async {
        let css = Load::get("/style.css").clients(6).total(300).run(rip.addr());
        let app = Load::get("/whoami").clients(2).total(100).run(rip.addr());
        tokio::join!(css, app)
    });
    no_failures(&css);
    no_failures(&app);
    assert!(css.bodies.iter().all(|b| &b[..] == b"body { color: teal }"));
    assert_eq!(app.pids().len(), 2, "the app's requests spread over both Node workers");
    runtime().block_on(async {
        let mut client = Client::new(rip.addr());
        let reply = client.get("/style.css").await.unwrap();
        assert_eq!(reply.headers["content-type"], "text/css; charset=utf-8");
        assert!(reply.headers.contains_key("etag"));
        let missing = client.get("/missing.css").await.unwrap();
        assert_eq!(
            (missing.status, missing.text().as_str()),
            (StatusCode::NOT_FOUND, "not found\n"),
            "Node's 404"
        );
        let hello = client.get("/").await.unwrap();
        assert!(hello.text().contains("worker"), "/ has no index.html: the app's: {}", hello.text());
    });
}
