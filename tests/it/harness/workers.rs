//! Finding a serve's workers and what they are doing: which are ready (from the supervisor's
//! log), which processes are its children (from /proc), whether a worker's thread sleeps in a
//! handler, and how much a serve wrote to its workers that they have not read (from `ss`).

use std::collections::{BTreeMap, BTreeSet};

use super::logs::WorkerEvent;
use super::process::is_running;
use super::Rip;

/// Pids of the workers ready now: logged ready, not logged gone, and still running.
pub fn ready_workers(rip: &Rip) -> Vec<i32> {
    let mut ready: BTreeMap<String, i32> = BTreeMap::new();
    for line in rip.logs() {
        let Some(event) = WorkerEvent::parse(&line) else { continue };
        match event.event.as_str() {
            "worker ready" => {
                ready.insert(event.worker, event.pid);
            }
            "worker exited" | "worker exited unexpectedly" | "worker hung, killed" => {
                ready.remove(&event.worker);
            }
            _ => {}
        }
    }
    ready.into_values().filter(|pid| is_running(*pid)).collect()
}

/// The running (not zombie) children of `parent`: a serve's workers, and not the `rip guard`
/// that a serve with a command's workers also starts, nor the `rip forkserver` that recycled
/// workers are forked from.
pub fn worker_processes(parent: i32) -> BTreeSet<i32> {
    let mut children = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").expect("reading /proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if parent_of(pid) == Some(parent) && is_running(pid) && !is_helper(pid) {
            children.insert(pid);
        }
    }
    children
}

fn is_helper(pid: i32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    matches!(cmdline.split(|&b| b == 0).nth(1), Some(b"guard" | b"forkserver"))
}

pub fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may hold spaces; the fields follow the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// True while the main (and, in a worker with one runtime thread, only) thread of `pid` sleeps
/// in `nanosleep`, as a blocking handler makes it; an idle worker waits in `epoll` instead.
pub fn thread_sleeps(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/wchan")).is_ok_and(|w| w.contains("nanosleep"))
}

/// Bytes that the process `pid` wrote to Unix sockets and that no peer has read yet (the
/// Send-Q of `ss`), or `None` when `ss` cannot be run. For `rip serve`, these are requests
/// written to a worker that is not reading.
pub fn unread_bytes_to_workers(pid: i32) -> Option<u64> {
    let out = std::process::Command::new("ss").args(["-x", "-H", "-p", "-n"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let owner = format!("pid={pid},");
    let unread = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&owner))
        .filter_map(|l| {
            // Netid State Recv-Q Send-Q Local Port Peer Port Process
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.get(1) == Some(&"ESTAB")).then(|| fields.get(3)?.parse::<u64>().ok()).flatten()
        })
        .sum();
    Some(unread)
}
