//! The guard for a real `rip serve`: port 0, a private runtime dir, the address from the
//! `rip started` line, `/healthz` before the test goes on, kill on drop, stderr shown when the
//! test failed. The private dir outlives the process, so rip never sees it vanish.

use std::ffi::{OsStr, OsString};
use std::fs::DirBuilder;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::logs::{log_addr, spawned_pids, WorkerEvent};
use super::process::{isolate, send_signal, Process};
use super::raw::blocking_get_status;
use super::{TempDir, POLL, START_TIMEOUT, WAIT};

/// How to run `rip serve`. Get one from [`Rip::builder`].
#[derive(Debug)]
pub struct RipBuilder {
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    current_dir: Option<PathBuf>,
    runtime_dir: Option<PathBuf>,
    program: Option<PathBuf>,
    dir: TempDir,
}

impl RipBuilder {
    /// The test's private directory: the default current dir of rip, and a place for files
    /// such as a rip.toml to write before starting.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<S: AsRef<OsStr>>(mut self, args: &[S]) -> Self {
        self.args.extend(args.iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs.push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs `exe` (a user's binary built on `rip::main_with`) instead of the stock `rip`.
    pub fn program(mut self, exe: impl Into<PathBuf>) -> Self {
        self.program = Some(exe.into());
        self
    }

    /// Where rip runs (it reads ./rip.toml there when present). Default: [`Self::dir`].
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.current_dir = Some(dir.into());
        self
    }

    /// The base given as `--runtime-dir`. Default: `<dir>/run`, created with mode 0700.
    pub fn runtime_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.runtime_dir = Some(dir.into());
        self
    }

    /// Starts rip and returns at once, before it has bound anything; for tests that expect
    /// it to fail, or that wait on their own conditions.
    pub fn spawn(self) -> Rip {
        let has = |flags: &[&str]| {
            self.args.iter().any(|a| {
                let a = a.to_string_lossy();
                flags.iter().any(|f| a == *f || a.starts_with(&format!("{f}=")))
            })
        };
        let runtime_dir = match &self.runtime_dir {
            Some(dir) => dir.clone(),
            None => {
                let dir = self.dir.path().join("run");
                DirBuilder::new()
                    .mode(0o700)
                    .create(&dir)
                    .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
                dir
            }
        };
        let mut args: Vec<OsString> = vec!["serve".into()];
        if !has(&["--port", "-p"]) {
            args.extend(["--port".into(), "0".into()]);
        }
        if !has(&["--runtime-dir"]) {
            args.extend(["--runtime-dir".into(), runtime_dir.clone().into()]);
        }
        args.extend(self.args.iter().cloned());

        let program = self.program.clone().unwrap_or_else(|| env!("CARGO_BIN_EXE_rip").into());
        let mut cmd = Command::new(&program);
        cmd.args(&args).current_dir(self.current_dir.as_deref().unwrap_or(self.dir.path()));
        isolate(&mut cmd);
        for (key, value) in &self.envs {
            cmd.env(key, value);
        }
        let command = format!(
            "{}{} {}",
            self.envs
                .iter()
                .map(|(k, v)| format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()))
                .collect::<String>(),
            program.file_name().unwrap_or_default().to_string_lossy(),
            args.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
        );
        let process = Process::spawn_isolated(cmd, command);
        Rip { process, addr: None, runtime_dir, dir: self.dir }
    }

    /// Starts rip and waits until it logged its address and answers `GET /healthz` with 200
    /// (at least one worker is ready).
    pub fn start(self) -> Rip {
        let mut rip = self.start_listening();
        rip.wait_healthy(START_TIMEOUT);
        rip
    }

    /// Starts rip and waits until it logged its address, not for any worker: for workers
    /// that are expected to fail, while the front-end answers.
    pub fn start_listening(self) -> Rip {
        let mut rip = self.spawn();
        let started = rip
            .wait_for_log(|l| l.contains(" rip started "), START_TIMEOUT)
            .unwrap_or_else(|| panic!("rip did not log `rip started` within {START_TIMEOUT:?}"));
        let addr = log_addr(&started).unwrap_or_else(|| panic!("no addr in {started:?}"));
        rip.addr = Some(addr);
        rip
    }

    /// Starts rip and waits until it logged its address and `all workers ready`, without a
    /// request of its own through the front-end: the test's requests are the first.
    pub fn start_all_ready(self) -> Rip {
        let rip = self.start_listening();
        rip.wait_all_ready();
        rip
    }
}

/// A running `rip serve`, killed (with its workers) on drop, its stderr printed if the test
/// failed: a [`Process`] that knows its address.
#[derive(Debug)]
pub struct Rip {
    process: Process,
    addr: Option<SocketAddr>,
    runtime_dir: PathBuf,
    // Dropped after `process`, which kills rip, so rip never sees its directory vanish.
    dir: TempDir,
}

impl Rip {
    /// `rip serve --port 0 <args>` with its own runtime dir, ready to serve.
    pub fn start(args: &[&str]) -> Rip {
        Rip::builder().args(args).start()
    }

    pub fn builder() -> RipBuilder {
        RipBuilder {
            args: Vec::new(),
            envs: Vec::new(),
            current_dir: None,
            runtime_dir: None,
            program: None,
            dir: TempDir::new(),
        }
    }

    /// The front-end's address, as logged at start.
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("the address is known once started with start()")
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// The test's private directory (see [`RipBuilder::dir`]), removed after rip is killed.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The base passed as `--runtime-dir`; rip keeps `<it>/<pid>/` with the sockets inside.
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    pub fn signal(&self, signal: Signal) {
        send_signal(self.pid(), signal);
    }

    /// Waits for rip to exit, then for its stderr to close so that [`Self::logs`] is whole.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let status =
            self.process.wait_exit(timeout).unwrap_or_else(|| panic!("rip did not exit within {timeout:?}"));
        self.process.logs.wait_closed(WAIT);
        status
    }

    /// Every stderr line so far.
    pub fn logs(&self) -> Vec<String> {
        self.process.logs()
    }

    /// How many lines were logged so far; pass it to [`Self::wait_for_log_from`] to wait for a
    /// line logged after this point.
    pub fn log_mark(&self) -> usize {
        self.process.logs.len()
    }

    /// The first line (ever logged) matching `pred`, waiting up to `timeout`. `None` on timeout
    /// or when rip closed its stderr without such a line.
    pub fn wait_for_log(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        self.wait_for_log_from(0, pred, timeout)
    }

    /// Like [`Self::wait_for_log`], among the lines logged from index `mark` on.
    pub fn wait_for_log_from(
        &self,
        mark: usize,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        self.process.logs.wait_for(mark, &pred, timeout)
    }

    /// Waits for the `all workers ready` line.
    pub fn wait_all_ready(&self) {
        self.wait_for_log(|l| l.contains(" all workers ready "), START_TIMEOUT)
            .unwrap_or_else(|| panic!("not all workers ready within {START_TIMEOUT:?}"));
    }

    /// Pids of every worker rip logged as spawned, in order.
    pub fn worker_pids(&self) -> Vec<i32> {
        spawned_pids(&self.logs())
    }

    /// The first `worker ready` line logged from `mark` on for a worker in `slot`: the
    /// replacement of the worker that left it.
    #[track_caller]
    pub fn wait_for_replacement(&self, mark: usize, slot: usize, timeout: Duration) -> WorkerEvent {
        let line = self
            .wait_for_log_from(
                mark,
                |l| WorkerEvent::parse(l).is_some_and(|e| e.is("worker ready") && e.slot() == slot),
                timeout,
            )
            .expect("a replacement became ready");
        WorkerEvent::parse(&line).expect("a worker event")
    }

    /// Polls `GET /healthz` until it answers 200.
    fn wait_healthy(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self.process.child.try_wait().expect("checking on rip") {
                panic!("rip exited with {status} before it was healthy");
            }
            match blocking_get_status(self.addr(), "/healthz") {
                Ok(200) => return,
                Ok(status) => last = format!("status {status}"),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(POLL);
        }
        panic!("GET /healthz not 200 within {timeout:?}; last: {last}");
    }
}
