//! Recycling: replacing workers for requests, memory, age or a reload, scaling the pool,
//! and backing off restarts, all within one surge budget.
//!
//! Invariant: a replacement is probed ready before the worker it replaces leaves, and at
//! most `surge` replacements run at once, so capacity never dips below the configured
//! number of workers and memory never doubles.

use tracing::{info, warn};

use super::machine::{Action, Machine};
use super::table::{Slot, SlotState, WorkerState};
use super::{backoff, Settings};
use crate::discovery::WorkerId;
use crate::telemetry::metrics::RecycleReason;

impl Machine {
    pub(super) fn want_recycle(&mut self, id: WorkerId, reason: RecycleReason) {
        let slot = &mut self.slots[id.slot];
        if slot.current == Some(id) && slot.next.is_none() && slot.recycle_reason.is_none() {
            slot.recycle_reason = Some(reason);
            self.start_replacements();
        }
    }

    /// Memory and age limits, checked every [`CHECK_INTERVAL`](super::CHECK_INTERVAL) with
    /// the ready workers' resident memory in `rss`.
    pub(super) fn check_limits(&mut self, rss: &[(WorkerId, u64)]) {
        if self.is_stopping() || (self.settings.max_memory.is_none() && self.settings.max_age.is_none()) {
            return;
        }
        let mut due = Vec::new();
        for (id, w) in &self.workers {
            if w.state != WorkerState::Ready {
                continue;
            }
            if let Some(limit) = self.settings.max_memory {
                let rss = rss.iter().find(|(of, _)| of == id).map_or(0, |(_, rss)| *rss);
                if rss > limit {
                    info!(worker = %id, rss, limit, "worker over its memory limit");
                    due.push((*id, RecycleReason::Memory));
                    continue;
                }
            }
            if self.settings.max_age.is_some_and(|max| self.now.saturating_duration_since(w.started) > max) {
                due.push((*id, RecycleReason::Age));
            }
        }
        for (id, reason) in due {
            self.want_recycle(id, reason);
        }
    }

    pub(super) fn reload(&mut self, settings: Option<Settings>) {
        if self.is_stopping() {
            self.act(Action::ReloadFinished { result: Err("shutting down".into()) });
            return;
        }
        if let Some(settings) = settings {
            let workers = settings.workers;
            self.settings = settings;
            self.scale(workers);
        }
        self.epoch += 1;
        info!(epoch = self.epoch, workers = self.active_slots(), "reload started");
        self.reloading = true;
        self.start_replacements();
        self.finish_reload_if_done();
    }

    /// A replacement never became ready. For a recycle, the old worker keeps serving and the
    /// replacement is retried with backoff. For a reload, the roll stops: workers not yet
    /// replaced keep serving (an old worker leaves only after its replacement is ready), and
    /// a broken deploy is not retried in a loop.
    pub(super) fn replacement_failed(&mut self, slot: usize, reason: String) {
        let s = &mut self.slots[slot];
        s.failures += 1;
        if s.recycle_reason != Some(RecycleReason::Reload) {
            self.schedule_respawn(slot);
            return;
        }
        warn!(reason, "reload failed, workers not yet replaced keep serving");
        let epoch = self.epoch;
        for w in self.workers.values_mut() {
            w.epoch = epoch;
        }
        for s in &mut self.slots {
            if s.recycle_reason == Some(RecycleReason::Reload) {
                s.recycle_reason = None;
            }
        }
        if std::mem::take(&mut self.reloading) {
            self.act(Action::ReloadFinished { result: Err(reason) });
        }
    }

    pub(super) fn finish_reload_if_done(&mut self) {
        if !self.reloading {
            return;
        }
        let replaced = self.slots.iter().filter(|s| s.is_active()).all(|s| {
            s.next.is_none()
                && s.current
                    .and_then(|id| self.workers.get(&id))
                    .is_some_and(|w| w.epoch >= self.epoch && w.state == WorkerState::Ready)
        });
        // Finished means the old code is gone: every worker of an earlier epoch has exited.
        let old_gone = self.workers.values().all(|w| w.epoch >= self.epoch);
        let done = replaced && old_gone;
        if done {
            info!(epoch = self.epoch, "reload finished");
            self.reloading = false;
            self.act(Action::ReloadFinished { result: Ok(()) });
        }
    }

    fn active_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.is_active()).count()
    }

    /// Grows or shrinks the pool to `n` workers. New slots start at once; removed slots'
    /// workers leave the rotation and drain.
    pub(super) fn scale(&mut self, n: usize) {
        let n = n.clamp(1, crate::telemetry::metrics::MAX_SLOTS);
        let before = self.active_slots();
        for slot in 0..n.max(self.slots.len()) {
            if slot >= self.slots.len() {
                self.slots.push(Slot::default());
            }
            let want = slot < n;
            if want == self.slots[slot].is_active() {
                continue;
            }
            self.slots[slot].state = if want { SlotState::Active } else { SlotState::Inactive };
            if want {
                self.slots[slot].failures = 0;
                if self.slots[slot].current.is_none() {
                    self.spawn(slot);
                }
            } else {
                let s = &mut self.slots[slot];
                let leaving: Vec<WorkerId> = s.current.take().into_iter().chain(s.next.take()).collect();
                s.recycle_reason = None;
                for id in leaving {
                    self.retire(id);
                }
            }
        }
        if before != 0 && before != n {
            info!(from = before, to = n, "workers scaled");
        }
        self.settings.workers = n;
        self.publish_ready();
        self.finish_reload_if_done();
    }

    /// Starts replacements for slots that want one, within the surge budget.
    pub(super) fn start_replacements(&mut self) {
        if self.is_stopping() {
            return;
        }
        for slot in 0..self.slots.len() {
            if self.replacements_in_progress() >= self.settings.surge {
                return;
            }
            let s = &self.slots[slot];
            if s.state != SlotState::Active || s.next.is_some() {
                continue;
            }
            let Some(current) = s.current.and_then(|id| self.workers.get(&id)) else { continue };
            if current.state != WorkerState::Ready {
                continue;
            }
            let outdated = current.epoch < self.epoch;
            if outdated && self.slots[slot].recycle_reason.is_none() {
                self.slots[slot].recycle_reason = Some(RecycleReason::Reload);
            }
            if outdated || self.slots[slot].recycle_reason.is_some() {
                self.spawn(slot);
            }
        }
    }

    /// Replacements starting, plus replaced workers still draining requests. A replaced
    /// worker that is past its requests and only exiting (closing its WebSockets, within its
    /// grace) no longer holds up the roll: a pool of long-lived connections would otherwise
    /// take one grace period per worker to reload.
    fn replacements_in_progress(&self) -> usize {
        let starting = self.slots.iter().filter(|s| s.next.is_some()).count();
        let leaving = self
            .workers
            .iter()
            .filter(|(id, w)| w.state == WorkerState::Draining && !self.is_slot_member(**id))
            .count();
        starting + leaving
    }

    pub(super) fn schedule_respawn(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        if s.state != SlotState::Active {
            return;
        }
        let delay = backoff::delay(s.failures);
        if delay.is_zero() {
            if s.current.is_none() {
                self.spawn(slot);
            }
            return;
        }
        s.state = SlotState::BackingOff;
        warn!(slot, failures = s.failures, delay_ms = delay.as_millis() as u64, "worker restart backed off");
        self.act(Action::RespawnAfter { slot, after: delay });
    }

    pub(super) fn on_respawn_due(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        if s.is_backing_off() {
            s.state = SlotState::Active;
        }
        if self.is_stopping() || !self.slots[slot].is_active() {
            return;
        }
        if self.slots[slot].current.is_none() {
            self.spawn(slot);
        } else {
            self.start_replacements();
        }
    }
}
