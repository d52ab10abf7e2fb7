//! stderr without waiting on whoever reads it. Every line rip writes to stderr — its own log,
//! the access log when it goes to stderr, the lines it copies from its workers — goes through
//! one bounded queue to one writer thread. Invariant: no task ever blocks on stderr; when the
//! reader (a terminal paused with Ctrl-S, a pipe nobody drains, journald applying
//! backpressure) falls [`BACKLOG`] lines behind, new lines are dropped and counted, and once
//! the writer gets through again it says how many were lost.
//!
//! A worker's stderr is a pipe to `rip serve`, which always reads it, and most workers log
//! nothing until they drain, then a line or two as they exit. A worker that reaches its drain
//! with no line logged writes its lines straight into the pipe when nothing is queued ahead of
//! them, with a write that returns rather than waits when the pipe is full (`RWF_NOWAIT`; the
//! pipe's file description stays blocking for everything else that writes stderr); the writer
//! thread starts only for a line the pipe has no room for. A thread started to write one line
//! at exit was a tenth of what a worker's end costs under `--max-requests`
//! (`benches/recycle_phases.sh`). One whose app logs as it serves has its writer thread by
//! then, and keeps it: batched writes cost less than a system call per line.

use std::io::Write;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, Once, OnceLock};

/// Lines queued for stderr at most; past this they are dropped. Enough for a burst of a few
/// thousand requests' access lines while a reader catches up, under a MiB.
pub const BACKLOG: usize = 8_192;
/// Bytes gathered into one write(2), so that a busy log costs few system calls.
const BATCH_BYTES: usize = 64 * 1024;
/// How long the writer lets lines gather after a write before it looks again. While it
/// sleeps, a new line costs its sender a queue push and nothing else; a writer that waited on
/// the queue instead would be woken (a futex call and a context switch) for nearly every line,
/// which measured as a fifth of the throughput with the access log on. A line reaches stderr
/// at most this late.
const LINGER: std::time::Duration = std::time::Duration::from_millis(10);
/// A write this size or smaller to a pipe goes in whole or not at all (pipe(7)).
const PIPE_BUF: usize = libc::PIPE_BUF;

/// A cheap handle to the stderr writer.
#[derive(Debug, Clone)]
pub struct Sink {
    /// Unbounded, so that its memory is taken as lines come (a bounded channel allocates and
    /// writes every slot up front: 320 KiB, 80 page faults, in every worker that logs a
    /// line); `queued` is the bound.
    lines: Sender<Message>,
    shared: Arc<Shared>,
}

struct Shared {
    /// Lines sent to the writer and not yet written.
    queued: AtomicUsize,
    dropped: AtomicU64,
    /// The writer thread's start, on the first line that has to be queued.
    started: Once,
    writer: Mutex<Option<Writer>>,
    /// A pipe to write lines into straight, never waiting: see the module's notes.
    direct: Option<RawFd>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("queued", &self.queued)
            .field("dropped", &self.dropped)
            .field("direct", &self.direct)
            .finish_non_exhaustive()
    }
}

/// What the writer thread is started with.
struct Writer {
    queue: Receiver<Message>,
    out: Box<dyn Write + Send>,
}

#[derive(Debug)]
enum Message {
    Line(Vec<u8>),
    /// Answered once everything queued before it is written.
    Flush(SyncSender<()>),
}

/// How long the process waits at exit for its last lines to be written: a reader that is not
/// reading gets no more than this.
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Set by a worker as it drains: its stderr is rip's pipe (see the module's notes).
static STRAIGHT_TO_PIPE: AtomicBool = AtomicBool::new(false);

/// Lets this process write lines straight into stderr when stderr is a pipe, if it has not
/// logged yet (the sink is made by the first line): for a worker that drains, whose pipe
/// `rip serve` always reads and which has a few lines left to log.
pub fn write_straight_to_a_pipe() {
    STRAIGHT_TO_PIPE.store(true, Ordering::Relaxed);
}

impl Sink {
    /// The process's one stderr sink, started on first use.
    pub fn stderr() -> &'static Sink {
        static STDERR: OnceLock<Sink> = OnceLock::new();
        STDERR.get_or_init(|| {
            let straight = STRAIGHT_TO_PIPE.load(Ordering::Relaxed) && stderr_is_a_pipe();
            Sink::new(std::io::stderr(), straight.then_some(libc::STDERR_FILENO))
        })
    }

    #[cfg(test)]
    fn start<W: Write + Send + 'static>(out: W) -> Sink {
        Sink::new(out, None)
    }

    fn new<W: Write + Send + 'static>(out: W, direct: Option<RawFd>) -> Sink {
        let (lines, queue) = channel();
        let shared = Shared {
            queued: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            started: Once::new(),
            writer: Mutex::new(Some(Writer { queue, out: Box::new(out) })),
            direct,
        };
        Sink { lines, shared: Arc::new(shared) }
    }

    /// Writes one whole line (with its newline): straight into a worker's pipe when it can,
    /// else through the queue; drops it if the queue is full.
    pub fn write_line(&self, mut line: Vec<u8>) {
        let shared = &*self.shared;
        // Nothing is queued that this line could overtake: the writer counts a line as
        // queued until it is written.
        if let Some(fd) = shared.direct {
            if line.len() <= PIPE_BUF && shared.queued.load(Ordering::Acquire) == 0 {
                match write_nowait(fd, &line) {
                    Ok(n) if n == line.len() => return,
                    Ok(n) => drop(line.drain(..n)),
                    // Full, gone (the writer thread finds that out, too), or a kernel whose
                    // pipes cannot be asked not to wait.
                    Err(_) => {}
                }
            }
        }
        if shared.queued.fetch_add(1, Ordering::AcqRel) >= BACKLOG || {
            self.start_writer();
            self.lines.send(Message::Line(line)).is_err()
        } {
            shared.queued.fetch_sub(1, Ordering::AcqRel);
            shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn start_writer(&self) {
        let shared = self.shared.clone();
        self.shared.started.call_once(move || {
            let Some(Writer { queue, out }) = shared.writer.lock().unwrap_or_else(|e| e.into_inner()).take()
            else {
                return;
            };
            let counts = shared.clone();
            // Without a thread (the process is out of them) the queue only fills: lines are
            // then dropped and counted rather than written on the caller's thread.
            let _ = std::thread::Builder::new()
                .name("rip-stderr".into())
                .spawn(move || write_lines(queue, out, &counts.queued, &counts.dropped));
        });
    }

    /// Waits (up to [`FLUSH_WAIT`]) until every line queued so far is written: at exit, so
    /// that a process's last words are not lost with its writer thread.
    pub fn flush(&self) {
        // No writer: every line went straight out.
        if !self.shared.started.is_completed() {
            return;
        }
        let (done, written) = sync_channel(1);
        // Not waited on when the queue is full of lines nobody reads: then no wait would help.
        if self.shared.queued.load(Ordering::Relaxed) < BACKLOG
            && self.lines.send(Message::Flush(done)).is_ok()
        {
            let _ = written.recv_timeout(FLUSH_WAIT);
        }
    }

    /// Lines dropped so far because stderr was not being read.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// Whether stderr is a pipe.
fn stderr_is_a_pipe() -> bool {
    nix::sys::stat::fstat(libc::STDERR_FILENO).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFIFO)
}

/// One write(2) to `fd` that fails with `EAGAIN` instead of waiting for room.
fn write_nowait(fd: RawFd, bytes: &[u8]) -> std::io::Result<usize> {
    let iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: one iovec over `bytes`, which outlives the call; offset -1 (low word -1, high
    // word 0) is the file's own position, as write(2) uses.
    let n = unsafe {
        // Every argument a full register wide, as the kernel reads them.
        let (fd, count, flags) = (fd as libc::c_long, 1 as libc::c_long, libc::RWF_NOWAIT as libc::c_long);
        libc::syscall(
            libc::SYS_pwritev2,
            fd,
            &iov as *const libc::iovec,
            count,
            -1 as libc::c_long,
            0 as libc::c_long,
            flags,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn write_lines(
    queue: Receiver<Message>,
    mut out: Box<dyn Write + Send>,
    queued: &AtomicUsize,
    dropped: &AtomicU64,
) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut reported = 0;
    while let Ok(message) = queue.recv() {
        let mut flushed = Vec::new();
        let mut lines = 0;
        let mut take = |message: Message, batch: &mut Vec<u8>| match message {
            Message::Line(line) => {
                lines += 1;
                batch.extend_from_slice(&line);
            }
            Message::Flush(done) => flushed.push(done),
        };
        take(message, &mut batch);
        while batch.len() < BATCH_BYTES {
            match queue.try_recv() {
                Ok(message) => take(message, &mut batch),
                Err(_) => break,
            }
        }
        // Blocking here is this thread's job: it holds up nobody but the queue.
        let _ = out.write_all(&batch);
        let _ = out.flush();
        // Only now: a line written straight out must not overtake these (see `write_line`).
        queued.fetch_sub(lines, Ordering::AcqRel);
        let full = batch.len() >= BATCH_BYTES;
        batch.clear();
        let flushing = !flushed.is_empty();
        for done in flushed {
            let _ = done.try_send(());
        }
        let lost = dropped.load(Ordering::Relaxed);
        if lost > reported {
            let note = format!(
                "rip: {} log lines were dropped because stderr was not being read ({lost} since start)\n",
                lost - reported
            );
            let _ = out.write_all(note.as_bytes());
            reported = lost;
        }
        // A full batch means more is waiting; a flush means the process is about to exit.
        if !full && !flushing {
            std::thread::sleep(LINGER);
        }
    }
}

/// What tracing writes an event through: the event's bytes, queued as one line when the
/// event is done.
pub struct EventWriter {
    sink: &'static Sink,
    buf: Vec<u8>,
}

impl Write for EventWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.sink.write_line(std::mem::take(&mut self.buf));
        }
    }
}

/// The `MakeWriter` for rip's tracing subscriber.
#[derive(Debug, Clone, Copy, Default)]
pub struct StderrWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for StderrWriter {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter { sink: Sink::stderr(), buf: Vec::with_capacity(256) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A writer that blocks until the test lets it go, as a paused terminal does.
    struct Paused(Arc<Mutex<()>>, Arc<Mutex<Vec<u8>>>);

    impl Write for Paused {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let _open = self.0.lock().unwrap();
            self.1.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A pipe as a worker's stderr is: its read end, and its write end as the writer thread
    /// writes it (blocking) with its descriptor for the writes that do not wait.
    fn pipe() -> (std::fs::File, std::fs::File, RawFd) {
        let (read, write) = nix::unistd::pipe().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&write);
        (read.into(), write.into(), fd)
    }

    fn read_all(mut read: std::fs::File) -> String {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut read, &mut text).unwrap();
        text
    }

    #[test]
    fn lines_a_pipe_has_room_for_go_straight_in_and_start_no_thread() {
        let (read, write, direct) = pipe();
        let sink = Sink::new(write, Some(direct));
        for i in 0..100 {
            sink.write_line(format!("line {i}\n").into_bytes());
        }
        assert!(!sink.shared.started.is_completed(), "a writer thread was started");
        sink.flush();
        drop(sink);
        let expected: String = (0..100).map(|i| format!("line {i}\n")).collect();
        assert_eq!(read_all(read), expected);
    }

    #[test]
    fn a_full_pipe_sends_lines_through_the_writer_and_none_is_lost_or_out_of_order() {
        // A few rounds: whether a line would overtake depends on how the threads interleave.
        for _ in 0..4 {
            let (read, write, direct) = pipe();
            let sink = Sink::new(write, Some(direct));
            // 280 KB, four times what a pipe holds: the first lines go straight in, the rest wait
            // in the queue (under its bound) behind a writer blocked on the pipe...
            let line = |i: usize| format!("line {i:>34}\n").into_bytes();
            let started = std::time::Instant::now();
            for i in 0..7_000 {
                sink.write_line(line(i));
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(2), "a full pipe blocked a caller");
            assert!(sink.shared.started.is_completed(), "the writer thread never started");
            // ...and while the pipe drains, room in it must not let a new line overtake them.
            let reader = std::thread::spawn(move || read_all(read));
            // Fewer in all than the queue's bound, so that no scheduling of the threads can
            // make the test drop one.
            let lines = 8_000;
            for i in 7_000..lines {
                sink.write_line(line(i));
                if i % 50 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            sink.flush();
            let sink_dropped = sink.dropped();
            // The reader sees the end of the pipe once every copy of its write end is closed: the
            // writer thread's goes when the queue's last sender is dropped.
            drop(sink);
            let text = reader.join().unwrap();
            let expected: Vec<u8> = (0..lines).flat_map(line).collect();
            assert!(sink_dropped == 0, "{sink_dropped} lines dropped");
            assert!(
                text.as_bytes() == expected,
                "{} of {} bytes, or out of order",
                text.len(),
                expected.len()
            );
        }
    }

    #[test]
    fn a_reader_that_stops_costs_dropped_lines_never_a_blocked_writer_and_the_loss_is_said() {
        let gate = Arc::new(Mutex::new(()));
        let written = Arc::new(Mutex::new(Vec::new()));
        let closed = gate.lock().unwrap();
        let sink = Sink::start(Paused(gate.clone(), written.clone()));
        let started = std::time::Instant::now();
        // The queue's worth, a batch the writer took before it blocked, and more.
        for i in 0..BACKLOG * 3 {
            sink.write_line(format!("line {i}\n").into_bytes());
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "the writer side waited on the reader"
        );
        assert!(sink.dropped() >= BACKLOG as u64, "dropped {}", sink.dropped());
        drop(closed);
        sink.write_line(b"after\n".to_vec());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let text = String::from_utf8_lossy(&written.lock().unwrap()).into_owned();
            if text.contains("log lines were dropped") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the loss was never reported");
            std::thread::yield_now();
        }
    }
}
