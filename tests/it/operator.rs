//! What an operator is told: every command and message says what is true and what to do.
//! A reload that cannot apply a change refuses it; `rip config` shows the configuration and
//! where each value came from; sockets are the user's alone; help shows each default once;
//! `rip status` has totals since start; with several rips running, the hint lists them.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use crate::harness::{runtime, Client, Control, Rip};

#[test]
fn a_reload_that_changes_what_only_a_new_process_applies_is_refused_and_nothing_changes() {
    let builder = Rip::builder();
    let file = builder.dir().join("rip.toml");
    std::fs::write(&file, "workers = 1\nhost = \"127.0.0.1\"\nbalance = \"least-pending\"\n").unwrap();
    let rip = builder.arg("--config").arg(&file).start_all_ready();
    let control = Control::of(&rip);
    let before = rip.worker_pids();

    std::fs::write(&file, "workers = 1\nhost = \"0.0.0.0\"\nbalance = \"round-robin\"\n").unwrap();
    let out = control.run(&["reload", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = out.stderr.trim();
    assert_eq!(said.lines().count(), 1, "one line: {said}");
    assert!(said.contains("host changed") && said.contains("restart"), "{said}");
    assert!(said.contains("balance changed") && said.contains("rip upgrade"), "{said}");
    assert!(said.contains("nothing was reloaded"), "{said}");
    assert_eq!(rip.worker_pids(), before, "workers were replaced by a refused reload");
    let reply = runtime().block_on(async { Client::new(rip.addr()).get("/").await }).expect("still serving");
    assert!(reply.status.is_success());

    // Changes a reload can apply still reload.
    std::fs::write(
        &file,
        "workers = 1\nhost = \"127.0.0.1\"\nbalance = \"least-pending\"\nmax_requests = 50\n",
    )
    .unwrap();
    let out = control.run(&["reload", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("the old ones exited"), "{out:?}");
}

#[test]
fn rip_config_prints_every_key_with_its_source_and_checks_without_starting() {
    let dir = crate::harness::TempDir::new();
    let file = dir.path().join("rip.toml");
    std::fs::write(&file, "# workers\nworkers = 3\nmax_requests = 100\n").unwrap();
    let file_arg = file.to_str().unwrap();
    let out = Control::cli()
        .run_with_env(&["config", "-c", file_arg, "--max-requests", "200"], &[("RIP_PORT", "0")]);
    assert!(out.status.success(), "{out:?}");
    let line = |key: &str| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in:\n{}", out.stdout))
            .to_string()
    };
    assert!(
        line("workers").contains("\"3\"") && line("workers").contains(&format!("# {file_arg}:2")),
        "{}",
        line("workers")
    );
    assert!(line("max_requests").contains("\"200\"") && line("max_requests").ends_with("# --max-requests"));
    assert!(line("port").contains("\"0\"") && line("port").ends_with("# RIP_PORT"));
    assert!(line("timeout").contains("\"30s\"") && line("timeout").ends_with("# default"));
    // What it prints is a rip.toml rip reads back to the same configuration.
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &out.stdout).unwrap();
    let again = Control::cli().run(&["config", "-c", printed.to_str().unwrap()]);
    assert!(again.status.success(), "{again:?}");
    let values = |text: &str| {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split('#').next().unwrap().trim().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(values(&again.stdout), values(&out.stdout));

    let check = Control::cli().run(&["config", "-c", file_arg, "--check"]);
    assert!(check.status.success() && check.stdout.is_empty() && check.stderr.is_empty(), "{check:?}");

    std::fs::write(&file, "workers = 3\nmax_requests = 10 20\n").unwrap();
    let bad = Control::cli().run(&["config", "-c", file_arg, "--check"]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(bad.stderr.contains(&format!("{file_arg}:2:19:")), "no file:line:column in {:?}", bad.stderr);

    // A bad value is refused even where a flag overrides it.
    std::fs::write(&file, "port = \"not-a-number\"\n").unwrap();
    let overridden = Control::cli().run(&["config", "-c", file_arg, "--port", "0", "--check"]);
    assert_eq!(overridden.status.code(), Some(1), "{overridden:?}");
    assert!(
        overridden.stderr.contains("port") && overridden.stderr.contains(&format!("{file_arg}:1")),
        "{:?}",
        overridden.stderr
    );
}

#[test]
fn sockets_are_for_their_user_alone() {
    let rip = Rip::start(&["--workers", "2"]);
    rip.wait_all_ready();
    let dir = rip.runtime_dir().join(rip.pid().to_string());
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    let mut sockets = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        if entry.file_type().unwrap().is_socket() {
            sockets += 1;
            assert_eq!(mode(&entry.path()), 0o600, "{}", entry.path().display());
        }
    }
    assert!(sockets >= 3, "the control socket and two workers' sockets, found {sockets}");
}

#[test]
fn help_shows_each_default_once() {
    for command in ["reload", "upgrade", "status", "serve", "config"] {
        let out = Control::cli().run(&[command, "--help"]);
        assert!(out.status.success(), "{out:?}");
        for line in out.stdout.lines() {
            assert!(line.matches("[default:").count() <= 1, "rip {command} --help: {line}");
        }
    }
    let serve = Control::cli().run(&["serve", "--help"]).stdout;
    for shown in ["--port <PORT>", "--timeout <DURATION>", "--request-timeout <DURATION>"] {
        let line = serve.lines().find(|l| l.contains(shown)).unwrap_or_else(|| panic!("no {shown}"));
        assert!(line.contains("[default: "), "{line}");
    }
}

#[test]
fn status_has_totals_since_start_beside_the_current_workers() {
    let rip = Rip::start(&["--workers", "2", "--max-requests", "5"]);
    rip.wait_all_ready();
    runtime().block_on(async {
        let mut client = Client::new(rip.addr());
        for _ in 0..40 {
            assert!(client.get("/").await.expect("GET /").status.is_success());
        }
    });
    let control = Control::of(&rip);
    let status = || -> serde_json::Value {
        serde_json::from_str(&control.run(&["status", "--json"]).stdout).expect("rip status --json")
    };
    // 40 requests at 5 each: at least 4 recycles, the last counted once its replacement is ready.
    assert!(
        crate::harness::wait_until(crate::harness::WAIT, || status()["lifetime"]["recycles"].as_u64()
            >= Some(4)),
        "{}",
        status()
    );
    let status = status();
    assert!(status["lifetime"]["requests"].as_u64().unwrap() >= 40, "{status}");
    assert!(status["requests"].as_u64().unwrap() < 40, "the current workers served them all? {status}");
    let table = control.run(&["status"]).stdout;
    assert!(table.contains("since start"), "{table}");
}

#[test]
fn with_several_rips_running_the_hint_lists_each_with_its_address_and_socket() {
    let base = crate::harness::TempDir::new();
    let one = Rip::builder().runtime_dir(base.path()).args(&["--workers", "1"]).start();
    let two = Rip::builder().runtime_dir(base.path()).args(&["--workers", "1"]).start();
    let out = Control::under(base.path()).run(&["status"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = out.stderr.trim();
    assert_eq!(said.lines().count(), 1, "{said}");
    for rip in [&one, &two] {
        assert!(said.contains(&format!("pid {} on {}", rip.pid(), rip.addr())), "{said}");
        let socket = base.path().join(rip.pid().to_string()).join("control.sock");
        assert!(said.contains(&format!("--control {}", socket.display())), "{said}");
    }
}

#[test]
fn version_names_the_commit_and_completions_and_man_page_come_from_the_same_definitions() {
    let version = Control::cli().run(&["--version"]);
    assert!(version.status.success(), "{version:?}");
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=7", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        Some(hash) => {
            assert!(version.stdout.contains(&format!("({hash}")), "{} is not {hash}", version.stdout)
        }
        None => assert!(version.stdout.contains("(unknown commit)"), "{}", version.stdout),
    }

    let bash = Control::cli().run(&["completions", "bash"]);
    assert!(bash.status.success() && bash.stdout.contains("complete -F"), "{bash:?}");
    for command in ["serve", "reload", "config", "upgrade"] {
        assert!(bash.stdout.contains(command), "no {command} in the bash completions");
    }
    assert!(bash.stdout.contains("--max-requests"), "serve's flags are completed");
    let man = Control::cli().run(&["man"]);
    assert!(man.status.success() && man.stdout.contains(".TH rip 1"), "{man:?}");
    assert!(man.stdout.contains("process manager"), "the page has rip's description");
    let unknown = Control::cli().run(&["completions", "nosh"]);
    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");
    assert_eq!(unknown.stderr.trim().lines().count(), 1, "{unknown:?}");
}

/// A burst of large uploads grows the front-end; once traffic pauses, it gives the memory
/// back and settles near its idle size rather than keeping its peak for good.
#[test]
fn after_a_burst_of_large_bodies_the_front_end_settles_back_near_its_idle_size() {
    const CLIENTS: usize = 20;
    const BODY: usize = 5 << 20;
    let rip = Rip::start(&["--workers", "2", "--access-log", "off"]);
    rip.wait_all_ready();
    let rss = || crate::harness::memory(rip.pid()).expect("reading the front-end's memory");
    let idle = rss().resident;
    let body = bytes::Bytes::from(vec![b'm'; BODY]);
    let rt = runtime();
    rt.block_on(async {
        let echoes: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (addr, body) = (rip.addr(), body.clone());
                tokio::spawn(async move {
                    let reply = Client::new(addr).post("/echo", body.clone()).await.expect("POST /echo");
                    assert!(reply.status.is_success() && reply.body.len() == BODY);
                })
            })
            .collect();
        for echo in echoes {
            echo.await.expect("an echo client");
        }
    });
    let peak = rss().peak;
    let settled =
        crate::harness::wait_until(std::time::Duration::from_secs(10), || rss().resident < idle + (8 << 20));
    let after = rss().resident;
    println!(
        "faults: memory_after_burst clients={CLIENTS} body_mib=5 idle_mib={:.1} peak_mib={:.1} settled_mib={:.1}",
        idle as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    assert!(settled, "front-end at {} MiB after the burst, {} MiB idle", after >> 20, idle >> 20);
}

#[test]
fn a_bad_duration_for_a_command_names_the_value_and_the_flag() {
    for command in ["reload", "upgrade"] {
        let out = Control::cli().run(&[command, "--timeout", "soon"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let said = out.stderr.trim();
        assert_eq!(said.lines().count(), 1, "{said}");
        assert!(said.contains("'soon'") && said.contains("--timeout") && said.contains("30s"), "{said}");
    }
}
