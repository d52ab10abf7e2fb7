//! The long-lived tasks of `rip serve` (discovery, the control socket, the admin listener,
//! the front-end, the supervisor), each owned here. Invariant: none of them ends unnoticed —
//! one that ends before shutdown, or panics, is logged and stops rip with a non-zero exit,
//! so the rotation never silently freezes (systemd, or whatever runs rip, then restarts it).

use std::future::Future;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::error;

/// A task that ended before it was asked to, and how.
#[derive(Debug)]
pub struct Ended {
    pub task: &'static str,
    pub panicked: bool,
}

/// Aborts a task when its watcher goes.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The owner: spawns essential tasks and hears when one ends early.
pub struct Tasks {
    tracker: TaskTracker,
    ended_tx: mpsc::UnboundedSender<Ended>,
    ended: mpsc::UnboundedReceiver<Ended>,
}

impl Tasks {
    pub fn new() -> Tasks {
        let (ended_tx, ended) = mpsc::unbounded_channel();
        Tasks { tracker: TaskTracker::new(), ended_tx, ended }
    }

    /// Runs `task`, which must not end before shutdown; returns its handle for the owner to
    /// await when it does stop it. An end (or a panic) before that is reported by
    /// [`first_ended`](Self::first_ended).
    pub fn essential<T: Send + 'static>(
        &self,
        task: &'static str,
        future: impl Future<Output = T> + Send + 'static,
    ) -> JoinHandle<Option<T>> {
        let ended = self.ended_tx.clone();
        let inner = tokio::spawn(future);
        // Aborting the returned handle aborts the task itself, not only its watcher.
        let abort = AbortOnDrop(inner.abort_handle());
        self.tracker.spawn(async move {
            let _abort = abort;
            match inner.await {
                Ok(value) => {
                    let _ = ended.send(Ended { task, panicked: false });
                    Some(value)
                }
                Err(e) => {
                    let _ = ended.send(Ended { task, panicked: e.is_panic() });
                    None
                }
            }
        })
    }

    /// The first essential task that ended, logged; waits for ever while none has.
    pub async fn first_ended(&mut self) -> Ended {
        match self.ended.recv().await {
            Some(ended) => {
                if ended.panicked {
                    error!(task = ended.task, "task panicked, rip stops");
                } else {
                    error!(task = ended.task, "task ended unexpectedly, rip stops");
                }
                ended
            }
            None => std::future::pending().await,
        }
    }

    /// Stops listening for ends: from now on tasks end because they were told to.
    pub fn shutting_down(&mut self) {
        self.ended.close();
        self.tracker.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_ends_or_panics_early_is_reported_with_its_name() {
        let mut tasks = Tasks::new();
        let _forever = tasks.essential("forever", std::future::pending::<()>());
        let _quits = tasks.essential("quits", async {});
        let ended = tasks.first_ended().await;
        assert_eq!((ended.task, ended.panicked), ("quits", false));
        let _panics = tasks.essential("panics", async { panic!("on purpose") });
        let ended = tasks.first_ended().await;
        assert_eq!((ended.task, ended.panicked), ("panics", true));
    }
}
