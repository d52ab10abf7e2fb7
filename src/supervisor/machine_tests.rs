//! The supervisor's transitions as a table: each test drives [`Machine`] with a fake child
//! (events made up by the test, time moved by hand) and compares the actions it answers with,
//! written out as short words. No process, no socket, no sleep.

use std::time::Duration;

use super::*;

const GRACE: Duration = Duration::from_secs(30);

fn settings(workers: usize) -> Settings {
    Settings {
        workers,
        start_timeout: Duration::from_secs(5),
        grace: GRACE,
        surge: 1,
        max_memory: None,
        max_age: None,
        liveness: None,
    }
}

fn id(slot: usize, generation: u64) -> WorkerId {
    WorkerId { slot, generation }
}

/// The machine with a clock of its own and a fake child per worker: pid = 1000 + slot * 100 +
/// generation.
struct Fake {
    machine: Machine,
    now: Instant,
}

fn pid(id: WorkerId) -> Pid {
    Pid::from_raw(1000 + id.slot as i32 * 100 + id.generation as i32)
}

impl Fake {
    /// Starts `settings.workers` workers and brings each to ready.
    fn ready(settings: Settings) -> Fake {
        let now = Instant::now();
        let workers = settings.workers;
        let mut fake = Fake { machine: Machine::new(settings, now), now };
        let started = words(fake.machine.start(now));
        assert_eq!(started, (0..workers).map(|s| format!("spawn {s}/0")).collect::<Vec<_>>());
        for slot in 0..workers {
            fake.becomes_ready(id(slot, 0));
        }
        fake
    }

    fn step(&mut self, event: Event) -> Vec<String> {
        words(self.machine.step(event, self.now))
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    fn becomes_ready(&mut self, id: WorkerId) -> Vec<String> {
        assert_eq!(self.step(Event::Spawned { id, pid: pid(id), forked: false }), Vec::<String>::new());
        self.step(Event::Probed { id, result: Ok(()) })
    }

    fn exits(&mut self, id: WorkerId, status: &str) -> Vec<String> {
        self.step(Event::Exited { id, status: status.into(), stderr: "last words".into() })
    }

    fn state(&self, id: WorkerId) -> Option<WorkerState> {
        self.machine.workers.get(&id).map(|w| w.state)
    }
}

/// Actions as short words; the ready count is left out (it follows every change).
fn words(actions: Vec<Action>) -> Vec<String> {
    actions
        .into_iter()
        .filter_map(|a| {
            Some(match a {
                Action::Spawn { id, .. } => format!("spawn {id}"),
                Action::Signal { id, signal, pid: p } => {
                    assert_eq!(p, pid(id), "signalled the wrong process");
                    format!("{} {id}", signal.as_str())
                }
                Action::DrainNotice { id, pid: p } => {
                    assert_eq!(p, pid(id), "told the wrong process");
                    format!("SIGUSR1 {id}")
                }
                Action::CancelProbes { id } => format!("cancel probes {id}"),
                Action::Admit { id } => format!("admit {id}"),
                Action::Leave { id, drain: Some(_) } => format!("leave {id} when drained"),
                Action::Leave { id, drain: None } => format!("leave {id}"),
                Action::KillAfter { id, after } => format!("kill {id} after {}s", after.as_secs()),
                Action::RespawnAfter { slot, after } => {
                    format!("respawn {slot} after {}ms", after.as_millis())
                }
                Action::ProbeLiveness { id, .. } => format!("probe {id}"),
                Action::StopAfter { after } => format!("stop after {}s", after.as_secs()),
                Action::Forget { id } => format!("forget {id}"),
                Action::PublishReady { .. } => return None,
                Action::Recycled { reason } => format!("recycled for {}", reason.as_str()),
                Action::Restarted => "restarted".into(),
                Action::ReloadFinished { result: Ok(()) } => "reload done".into(),
                Action::ReloadFinished { result: Err(e) } => format!("reload failed: {e}"),
                Action::Stopped => "stopped".into(),
            })
        })
        .collect()
}

fn w(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_worker_joins_the_rotation_only_once_probed_ready() {
    let now = Instant::now();
    let mut machine = Machine::new(settings(1), now);
    assert_eq!(words(machine.start(now)), w(&["spawn 0/0"]));
    assert_eq!(
        words(machine.step(Event::Spawned { id: id(0, 0), pid: pid(id(0, 0)), forked: false }, now)),
        w(&[])
    );
    assert_eq!(words(machine.step(Event::Probed { id: id(0, 0), result: Ok(()) }, now)), w(&["admit 0/0"]));
}

#[test]
fn a_recycle_starts_the_replacement_first_then_drains_and_stops_the_old_worker() {
    let mut fake = Fake::ready(settings(2));
    assert_eq!(fake.step(Event::Exhausted { id: id(0, 0) }), w(&["spawn 0/1"]));
    assert_eq!(fake.step(Event::Exhausted { id: id(0, 0) }), w(&[]), "reported twice, replaced once");
    assert_eq!(fake.state(id(0, 0)), Some(WorkerState::Ready), "serves until its replacement is ready");
    assert_eq!(
        fake.becomes_ready(id(0, 1)),
        w(&["admit 0/1", "recycled for requests", "leave 0/0 when drained", "SIGUSR1 0/0"])
    );
    assert_eq!(
        fake.step(Event::Drained { id: id(0, 0) }),
        w(&["cancel probes 0/0", "SIGTERM 0/0", "kill 0/0 after 30s"])
    );
    assert_eq!(fake.exits(id(0, 0), "exit code 0"), w(&["forget 0/0"]), "an expected exit is no restart");
}

#[test]
fn a_replacement_whose_worker_crashed_while_it_started_is_its_successor_and_not_recycled() {
    let mut fake = Fake::ready(settings(1));
    fake.step(Event::Exhausted { id: id(0, 0) });
    fake.step(Event::Spawned { id: id(0, 1), pid: pid(id(0, 1)), forked: false });
    fake.exits(id(0, 0), "signal 9 (SIGKILL)");
    assert_eq!(fake.step(Event::Probed { id: id(0, 1), result: Ok(()) }), w(&["admit 0/1"]));
    assert_eq!(fake.step(Event::Tick { rss: Vec::new() }), w(&[]));
}

#[test]
fn a_reload_rolls_one_worker_at_a_time_within_the_surge_and_reports_when_done() {
    let mut fake = Fake::ready(settings(3));
    assert_eq!(fake.step(Event::Reload { settings: None }), w(&["spawn 0/1"]));
    assert_eq!(
        fake.becomes_ready(id(0, 1)),
        w(&["admit 0/1", "recycled for reload", "leave 0/0 when drained", "SIGUSR1 0/0"])
    );
    // The old worker counts against the surge while it drains requests; once they are done,
    // what is left (its WebSockets, closing within its grace) does not hold up the roll.
    assert_eq!(
        fake.step(Event::Drained { id: id(0, 0) }),
        w(&["cancel probes 0/0", "SIGTERM 0/0", "kill 0/0 after 30s", "spawn 1/1"])
    );
    assert_eq!(fake.exits(id(0, 0), "exit code 0"), w(&["forget 0/0"]));
    assert_eq!(
        fake.becomes_ready(id(1, 1)),
        w(&["admit 1/1", "recycled for reload", "leave 1/0 when drained", "SIGUSR1 1/0"])
    );
    fake.step(Event::Drained { id: id(1, 0) });
    fake.becomes_ready(id(2, 1));
    fake.step(Event::Drained { id: id(2, 0) });
    assert_eq!(fake.exits(id(2, 0), "exit code 0"), w(&["forget 2/0"]));
    // Done only once the old code is gone: the last old worker has exited.
    assert_eq!(fake.exits(id(1, 0), "exit code 0"), w(&["forget 1/0", "reload done"]));

    let mut fake = Fake::ready(settings(1));
    fake.step(Event::Reload { settings: None });
    fake.becomes_ready(id(0, 1));
    fake.step(Event::Drained { id: id(0, 0) });
    assert_eq!(fake.exits(id(0, 0), "exit code 0"), w(&["forget 0/0", "reload done"]));
}

#[test]
fn a_reload_whose_new_worker_dies_before_ready_stops_and_the_old_ones_keep_serving() {
    let mut fake = Fake::ready(settings(2));
    fake.step(Event::Reload { settings: None });
    fake.step(Event::Spawned { id: id(0, 1), pid: pid(id(0, 1)), forked: false });
    assert_eq!(
        fake.exits(id(0, 1), "exit code 3"),
        w(&[
            "forget 0/1",
            "leave 0/1",
            "reload failed: new worker 0/1 exited before ready: exit code 3; stderr: last words"
        ])
    );
    assert_eq!(fake.state(id(0, 0)), Some(WorkerState::Ready));
    assert_eq!(fake.state(id(1, 0)), Some(WorkerState::Ready));
    assert_eq!(
        fake.step(Event::Tick { rss: Vec::new() }),
        w(&[]),
        "no further replacement after a failed roll"
    );
}

#[test]
fn a_worker_that_crashes_before_ready_backs_off_doubling_each_time() {
    let mut fake = Fake::ready(settings(1));
    fake.advance(Duration::from_secs(10));
    assert_eq!(
        fake.exits(id(0, 0), "signal 9 (SIGKILL)"),
        w(&["forget 0/0", "leave 0/0", "restarted", "spawn 0/1"])
    );
    let mut expected_ms = 100;
    for generation in 1..5 {
        let worker = id(0, generation);
        fake.step(Event::Spawned { id: worker, pid: pid(worker), forked: false });
        let exited = fake.exits(worker, "exit code 1");
        assert_eq!(
            exited,
            w(&[
                &format!("forget {worker}"),
                &format!("leave {worker}"),
                "restarted",
                &format!("respawn 0 after {expected_ms}ms")
            ])
        );
        assert_eq!(fake.step(Event::RespawnDue { slot: 0 }), w(&[&format!("spawn 0/{}", generation + 1)]));
        expected_ms *= 2;
    }
}

#[test]
fn a_worker_killed_right_after_it_became_ready_is_replaced_at_once_every_time() {
    let mut fake = Fake::ready(settings(2));
    for generation in 0..5 {
        let worker = id(1, generation);
        let replacement = format!("spawn 1/{}", generation + 1);
        let exited = fake.exits(worker, "signal 9 (SIGKILL)");
        assert_eq!(
            exited,
            w(&[&format!("forget {worker}"), &format!("leave {worker}"), "restarted", &replacement])
        );
        fake.becomes_ready(id(1, generation + 1));
    }
}

#[test]
fn a_hung_worker_is_killed_and_replaced_at_once_without_backoff() {
    let mut fake = Fake::ready(settings(2));
    assert_eq!(fake.step(Event::Hung { id: id(0, 0) }), w(&["leave 0/0", "SIGKILL 0/0"]));
    assert_eq!(fake.exits(id(0, 0), "signal 9 (SIGKILL)"), w(&["forget 0/0", "restarted", "spawn 0/1"]));
}

#[test]
fn a_worker_that_fails_its_readiness_probe_is_killed_and_its_exit_says_why() {
    let now = Instant::now();
    let mut machine = Machine::new(settings(1), now);
    machine.start(now);
    machine.step(Event::Spawned { id: id(0, 0), pid: pid(id(0, 0)), forked: false }, now);
    let probed = machine.step(Event::Probed { id: id(0, 0), result: Err("no answer".into()) }, now);
    assert_eq!(words(probed), w(&["SIGKILL 0/0"]));
    machine.step(
        Event::Exited { id: id(0, 0), status: "signal 9 (SIGKILL)".into(), stderr: String::new() },
        now,
    );
    let last_exit = machine.slots[0].last_exit.clone().unwrap();
    assert_eq!(last_exit, "signal 9 (SIGKILL) after failing its health probe (no answer)");
}

#[test]
fn stop_signals_every_worker_then_kills_stragglers_after_the_grace() {
    let mut fake = Fake::ready(settings(2));
    assert_eq!(
        fake.step(Event::Stop),
        w(&[
            "leave 0/0",
            "leave 1/0",
            "cancel probes 0/0",
            "SIGTERM 0/0",
            "cancel probes 1/0",
            "SIGTERM 1/0",
            "stop after 30s"
        ])
    );
    assert_eq!(fake.exits(id(0, 0), "exit code 0"), w(&["forget 0/0"]));
    assert_eq!(fake.step(Event::Exhausted { id: id(1, 0) }), w(&[]), "nothing is replaced while stopping");
    assert_eq!(fake.step(Event::StopDue), w(&["SIGKILL 1/0", "stop after 5s"]));
    assert_eq!(fake.exits(id(1, 0), "signal 9 (SIGKILL)"), w(&["forget 1/0", "stopped"]));
}

#[test]
fn stop_gives_up_on_exits_the_kernel_never_reports() {
    let mut fake = Fake::ready(settings(1));
    fake.step(Event::Stop);
    fake.step(Event::StopDue);
    assert_eq!(fake.step(Event::StopDue), w(&["stopped"]));
}

#[test]
fn a_reload_asked_for_while_stopping_is_refused() {
    let mut fake = Fake::ready(settings(1));
    fake.step(Event::Stop);
    assert_eq!(fake.step(Event::Reload { settings: None }), w(&["reload failed: shutting down"]));
}

#[test]
fn scaling_up_starts_workers_and_scaling_down_drains_the_highest_slots() {
    let mut fake = Fake::ready(settings(2));
    assert_eq!(fake.step(Event::Scale { workers: 4 }), w(&["spawn 2/0", "spawn 3/0"]));
    fake.becomes_ready(id(2, 0));
    fake.becomes_ready(id(3, 0));
    assert_eq!(
        fake.step(Event::Scale { workers: 1 }),
        w(&[
            "leave 1/0 when drained",
            "SIGUSR1 1/0",
            "leave 2/0 when drained",
            "SIGUSR1 2/0",
            "leave 3/0 when drained",
            "SIGUSR1 3/0"
        ])
    );
    assert_eq!(fake.state(id(0, 0)), Some(WorkerState::Ready));
    assert_eq!(
        fake.step(Event::Drained { id: id(3, 0) }),
        w(&["cancel probes 3/0", "SIGTERM 3/0", "kill 3/0 after 30s"])
    );
    assert_eq!(fake.exits(id(3, 0), "exit code 0"), w(&["forget 3/0"]), "a scaled-down slot is not refilled");
}

#[test]
fn memory_and_age_limits_recycle_on_the_periodic_check() {
    let mut fake = Fake::ready(Settings {
        max_memory: Some(100),
        max_age: Some(Duration::from_secs(60)),
        ..settings(2)
    });
    assert_eq!(fake.step(Event::Tick { rss: vec![(id(0, 0), 50), (id(1, 0), 50)] }), w(&[]));
    assert_eq!(fake.step(Event::Tick { rss: vec![(id(0, 0), 50), (id(1, 0), 150)] }), w(&["spawn 1/1"]));
    fake.advance(Duration::from_secs(61));
    // Only one replacement at a time: the age recycle of 0/0 waits for the surge.
    assert_eq!(fake.step(Event::Tick { rss: Vec::new() }), w(&[]));
    assert_eq!(
        fake.becomes_ready(id(1, 1)),
        w(&["admit 1/1", "recycled for memory", "leave 1/0 when drained", "SIGUSR1 1/0"])
    );
}

#[test]
fn liveness_probes_go_one_at_a_time_and_a_failure_kills_the_worker() {
    let mut fake = Fake::ready(Settings { liveness: Some(Duration::from_secs(1)), ..settings(1) });
    assert_eq!(fake.step(Event::Tick { rss: Vec::new() }), w(&["probe 0/0"]));
    assert_eq!(fake.step(Event::Tick { rss: Vec::new() }), w(&[]), "one probe in flight at a time");
    assert_eq!(fake.step(Event::Alive { id: id(0, 0), result: Ok(()) }), w(&[]));
    assert_eq!(fake.step(Event::Tick { rss: Vec::new() }), w(&["probe 0/0"]));
    assert_eq!(
        fake.step(Event::Alive { id: id(0, 0), result: Err("silent".into()) }),
        w(&["leave 0/0", "SIGKILL 0/0"])
    );
}

#[test]
fn a_worker_retired_while_still_being_started_is_signalled_once_its_pid_is_known() {
    let now = Instant::now();
    let mut machine = Machine::new(settings(2), now);
    machine.start(now);
    let retired = machine.step(Event::Scale { workers: 1 }, now);
    assert_eq!(words(retired), w(&["cancel probes 1/0", "kill 1/0 after 30s"]), "no pid to signal yet");
    let spawned = machine.step(Event::Spawned { id: id(1, 0), pid: pid(id(1, 0)), forked: false }, now);
    assert_eq!(words(spawned), w(&["SIGTERM 1/0"]));
}

#[test]
fn a_slot_scaled_away_while_backing_off_starts_at_once_when_scaled_back_and_its_timer_is_ignored() {
    let mut fake = Fake::ready(settings(2));
    assert_eq!(
        fake.exits(id(1, 0), "signal 9 (SIGKILL)"),
        w(&["forget 1/0", "leave 1/0", "restarted", "spawn 1/1"])
    );
    fake.step(Event::Spawned { id: id(1, 1), pid: pid(id(1, 1)), forked: false });
    let failed_start = fake.exits(id(1, 1), "exit code 1");
    assert_eq!(failed_start, w(&["forget 1/1", "leave 1/1", "restarted", "respawn 1 after 100ms"]));
    assert_eq!(fake.step(Event::Scale { workers: 1 }), w(&[]));
    assert_eq!(fake.step(Event::RespawnDue { slot: 1 }), w(&[]), "nothing starts in a slot scaled away");
    assert_eq!(fake.step(Event::Scale { workers: 2 }), w(&["spawn 1/2"]));
    assert_eq!(fake.step(Event::RespawnDue { slot: 1 }), w(&[]), "a stale timer starts nothing more");
}
