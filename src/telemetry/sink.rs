//! stderr without waiting on whoever reads it. Every line rip writes to stderr — its own log,
//! the access log when it goes to stderr, the lines it copies from its workers — goes through
//! one bounded queue to one writer thread. Invariant: no task ever blocks on stderr; when the
//! reader (a terminal paused with Ctrl-S, a pipe nobody drains, journald applying
//! backpressure) falls [`BACKLOG`] lines behind, new lines are dropped and counted, and once
//! the writer gets through again it says how many were lost.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, OnceLock};

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

/// A cheap handle to the stderr writer.
#[derive(Debug, Clone)]
pub struct Sink {
    /// Unbounded, so that its memory is taken as lines come (a bounded channel allocates and
    /// writes every slot up front: 320 KiB, 80 page faults, in every worker that logs a
    /// line); `queued` is the bound.
    lines: Sender<Message>,
    queued: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
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

impl Sink {
    /// The process's one stderr sink, started on first use.
    pub fn stderr() -> &'static Sink {
        static STDERR: OnceLock<Sink> = OnceLock::new();
        STDERR.get_or_init(|| Sink::start(std::io::stderr()))
    }

    fn start<W: Write + Send + 'static>(out: W) -> Sink {
        let (lines, queue) = channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let (taken, counted) = (queued.clone(), dropped.clone());
        // Without a thread (the process is out of them) the queue only fills: lines are then
        // dropped and counted rather than written on the caller's thread.
        let _ = std::thread::Builder::new()
            .name("rip-stderr".into())
            .spawn(move || write_lines(queue, out, &taken, &counted));
        Sink { lines, queued, dropped }
    }

    /// Queues one whole line (with its newline); drops it if the queue is full.
    pub fn write_line(&self, line: Vec<u8>) {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= BACKLOG
            || self.lines.send(Message::Line(line)).is_err()
        {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits (up to [`FLUSH_WAIT`]) until every line queued so far is written: at exit, so
    /// that a process's last words are not lost with its writer thread.
    pub fn flush(&self) {
        let (done, written) = sync_channel(1);
        // Not waited on when the queue is full of lines nobody reads: then no wait would help.
        if self.queued.load(Ordering::Relaxed) < BACKLOG && self.lines.send(Message::Flush(done)).is_ok() {
            let _ = written.recv_timeout(FLUSH_WAIT);
        }
    }

    /// Lines dropped so far because stderr was not being read.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn write_lines<W: Write>(queue: Receiver<Message>, mut out: W, queued: &AtomicUsize, dropped: &AtomicU64) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut reported = 0;
    while let Ok(message) = queue.recv() {
        let mut flushed = Vec::new();
        let mut take = |message: Message, batch: &mut Vec<u8>| match message {
            Message::Line(line) => {
                queued.fetch_sub(1, Ordering::Relaxed);
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
