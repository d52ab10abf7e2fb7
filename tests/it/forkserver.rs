//! Workers that replace others are forked from `rip forkserver` rather than executed, and are
//! still rip serve's own children: in their own process group, shown by `ps` as workers,
//! gone with a killed rip. The fork server dying costs no request (that worker is executed,
//! the next comes from a new server), and a reload forks from a server started anew from the
//! binary on disk.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::harness::{
    example, is_running, lines_after, log_field, no_failures, parent_of, runtime, summary, wait_gone,
    wait_until, worker_processes, Load, Rip, WorkerEvent, WAIT,
};

/// The children of `parent` that are a fork server (not workers).
fn fork_servers(parent: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            parent_of(pid) == Some(parent)
                && is_running(pid)
                && args(pid).get(1).map(String::as_str) == Some("forkserver")
        })
        .collect()
}

/// The command line of `pid`, as `ps` shows it, split into its arguments.
fn args(pid: i32) -> Vec<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// `(pid, how)` of every `worker spawned` line from `mark` on.
fn spawned(rip: &Rip, mark: usize) -> Vec<(i32, String)> {
    lines_after(rip, mark, " worker spawned ")
        .iter()
        .filter_map(|l| {
            Some((WorkerEvent::parse(l)?.pid, log_field(l, "how")?.trim_matches('"').to_string()))
        })
        .collect()
}

fn process_group(pid: i32) -> Option<i32> {
    nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))).ok().map(|p| p.as_raw())
}

#[test]
fn replacement_workers_are_forked_children_of_rip_and_a_killed_fork_server_costs_no_request() {
    let rt = runtime();
    let mut rip = Rip::start(&["--workers", "2", "--max-requests", "5", "--access-log", "off"]);
    rip.wait_all_ready();
    let at_start = spawned(&rip, 0);
    assert_eq!(at_start.len(), 2, "{at_start:?}");
    assert!(at_start.iter().all(|(_, how)| how == "executed"), "the first workers: {at_start:?}");
    assert!(fork_servers(rip.pid()).is_empty(), "a fork server before any worker was replaced");

    let load = Load::get("/whoami").clients(8).total(usize::MAX).deadline(Duration::from_secs(60));
    let traffic = load.handle();
    let running = rt.spawn(load.run(rip.addr()));

    // Recycling every 5 requests under 8 clients: workers are forked one after another.
    let mut server = Vec::new();
    assert!(
        wait_until(WAIT, || {
            server = fork_servers(rip.pid());
            spawned(&rip, 0).iter().filter(|(_, how)| how == "forked").count() >= 20 && server.len() == 1
        }),
        "no fork server forking workers: {:?}, servers {server:?}",
        spawned(&rip, 0)
    );
    // Each forked worker is rip's own child, in a group of its own, and shown as a worker. A
    // worker serves its five requests in milliseconds: one listed may have exited by the time
    // it is read (an exited process shows no command line), so those are passed over and the
    // listing taken again until a forked worker has been seen whole.
    let mut seen = Vec::new();
    assert!(
        wait_until(WAIT, || {
            let workers = worker_processes(rip.pid());
            let forked: Vec<i32> =
                spawned(&rip, 0).iter().filter(|(_, how)| how == "forked").map(|(p, _)| *p).collect();
            for pid in workers.iter().copied().filter(|p| forked.contains(p)) {
                let shown = args(pid);
                if shown.is_empty() {
                    continue;
                }
                assert_eq!(shown.get(1).map(String::as_str), Some("worker"), "worker {pid} shows {shown:?}");
                assert!(shown.iter().any(|a| a == "--socket"), "worker {pid} shows {shown:?}");
                // Read after the command line: a worker reaped in between has neither.
                if let (Some(parent), Some(group)) = (parent_of(pid), process_group(pid)) {
                    assert_eq!(parent, rip.pid(), "worker {pid}'s parent");
                    assert_eq!(group, pid, "worker {pid}'s process group");
                    seen.push(pid);
                }
            }
            !seen.is_empty()
        }),
        "no forked worker could be looked at while it ran"
    );

    // The fork server killed: the next worker is executed, then a new server forks again.
    let mark = rip.log_mark();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server[0]), Signal::SIGKILL).unwrap();
    assert!(
        wait_until(WAIT, || {
            let after = spawned(&rip, mark);
            let servers = fork_servers(rip.pid());
            after.iter().any(|(_, how)| how == "executed")
                && after.iter().filter(|(_, how)| how == "forked").count() >= 10
                && servers.len() == 1
                && servers[0] != server[0]
        }),
        "after the fork server was killed: {:?}, servers {:?}",
        spawned(&rip, mark),
        fork_servers(rip.pid())
    );
    let failed = lines_after(&rip, mark, "the fork server failed");
    assert!(!failed.is_empty(), "no word of the fork server failing");

    traffic.stop();
    let report = rt.block_on(running).unwrap();
    no_failures(&report);
    assert!(report.ok >= 300, "{}", summary(&report));

    // Killed, rip takes every worker with it, forked or not, and the fork server.
    let mut left: Vec<i32> = worker_processes(rip.pid()).into_iter().collect();
    left.extend(fork_servers(rip.pid()));
    assert!(left.len() >= 3, "{left:?}");
    rip.signal(Signal::SIGKILL);
    rip.wait_exit(WAIT);
    assert_eq!(wait_gone(&left, WAIT), Vec::<i32>::new(), "outlived a killed rip");
}

#[test]
fn a_reload_forks_from_a_fork_server_started_anew_and_the_old_one_exits() {
    let mut rip = Rip::start(&["--workers", "2", "--access-log", "off"]);
    rip.wait_all_ready();
    // A worker killed is replaced by a fork: the first fork server starts.
    let first = rip.worker_pids()[0];
    let mark = rip.log_mark();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first), Signal::SIGKILL).unwrap();
    assert!(
        wait_until(WAIT, || spawned(&rip, mark).iter().any(|(_, how)| how == "forked")),
        "the killed worker's replacement: {:?}",
        spawned(&rip, mark)
    );
    let old = fork_servers(rip.pid());
    assert_eq!(old.len(), 1, "{old:?}");

    let mark = rip.log_mark();
    rip.signal(Signal::SIGHUP);
    assert!(
        rip.wait_for_log_from(mark, |l| l.contains("reload finished"), WAIT).is_some(),
        "the reload did not finish"
    );
    let after = spawned(&rip, mark);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(after.iter().all(|(_, how)| how == "forked"), "{after:?}");
    let new = fork_servers(rip.pid());
    assert_eq!(new.len(), 1, "{new:?}");
    assert_ne!(new, old, "the reload forked from the server started before it");
    assert_eq!(wait_gone(&old, WAIT), Vec::<i32>::new(), "the old fork server stayed");

    rip.signal(Signal::SIGTERM);
    assert!(rip.wait_exit(WAIT).success());
    assert_eq!(wait_gone(&new, WAIT), Vec::<i32>::new(), "the fork server outlived rip");
}

#[test]
fn with_spawn_exec_every_replacement_is_executed_and_no_fork_server_runs() {
    let rt = runtime();
    let rip =
        Rip::start(&["--workers", "2", "--max-requests", "5", "--spawn", "exec", "--access-log", "off"]);
    rip.wait_all_ready();
    let report = rt.block_on(
        Load::get("/whoami").clients(4).total(200).deadline(Duration::from_secs(60)).run(rip.addr()),
    );
    assert_eq!((report.ok, report.failed), (200, 0), "{}", summary(&report));
    let all = spawned(&rip, 0);
    assert!(all.len() >= 20, "{all:?}");
    assert!(all.iter().all(|(_, how)| how == "executed"), "{all:?}");
    assert!(fork_servers(rip.pid()).is_empty(), "a fork server with --spawn exec");
}

/// A binary whose `main` starts a thread before `Rip::run` (examples/agent_thread.rs): its
/// fork server refuses to fork, and every worker is executed, with one warning.
#[test]
fn a_main_that_starts_a_thread_gets_every_worker_executed_and_one_warning() {
    let rt = runtime();
    let rip = example("agent_thread")
        .args(&["--workers", "2", "--max-requests", "5", "--access-log", "off"])
        .start_all_ready();
    let report =
        rt.block_on(Load::get("/").clients(4).total(200).deadline(Duration::from_secs(60)).run(rip.addr()));
    assert_eq!((report.ok, report.failed), (200, 0), "{}", summary(&report));
    let all = spawned(&rip, 0);
    assert!(all.len() >= 20, "{all:?}");
    assert!(all.iter().all(|(_, how)| how == "executed"), "{all:?}");
    let warned = lines_after(&rip, 0, "the fork server has more than one thread");
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(
        wait_until(WAIT, || fork_servers(rip.pid()).is_empty()),
        "a fork server stayed: {:?}",
        fork_servers(rip.pid())
    );
}
