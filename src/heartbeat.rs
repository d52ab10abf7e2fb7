//! A worker's heartbeat: a few bytes of memory shared between `rip serve` and one worker
//! process. The worker's runtime bumps a counter every [`BEAT_EVERY`] from a task on the
//! thread that runs its app, and writes the id of the request it is polling while it polls
//! one; the front-end's watcher (`proxy::watch`) samples both. So a worker whose event loop has
//! stopped turning — a handler blocking its thread — is seen within [`STALL_AFTER`] without a
//! byte on any socket, and the request that was running when it stopped is known by name.
//!
//! Shared memory rather than a message: the worker pays one relaxed store per beat and per
//! poll of a request, and the front-end one load per sample, with no syscall, no wakeup and
//! nothing on the request path (`benches/compare.sh` measures it against the build before
//! it). The alternatives cost more or answer a different question: a byte per beat on a pipe
//! is a syscall on each side and a wakeup of the front-end per beat per worker; a probe over
//! the worker's socket (what `--upstream handoff` also does) is a connection per probe, queues
//! behind the requests it is meant to judge, and cannot say which request is stuck.
//!
//! The memory is a sealed memfd: the parent creates it, fixes its size and seals it, so a
//! worker (whatever it runs) cannot shrink it and turn the parent's next read into SIGBUS.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

/// How often a worker's runtime beats.
pub const BEAT_EVERY: Duration = Duration::from_millis(10);

/// Silence after which a worker counts as stalled and leaves the rotation: ten missed beats.
/// Long enough that a worker starved of CPU on a loaded machine (the kernel's scheduling
/// delay stays in single milliseconds even at full load) or one running a handler that
/// computes for a few tens of milliseconds is not taken out; short enough that the requests
/// queued behind a stuck thread wait about a tenth of a second before they move, below what a
/// person notices. Leaving the rotation costs nothing: the worker is back on its next beat.
pub const STALL_AFTER: Duration = Duration::from_millis(100);

/// How often the front-end samples every worker's heartbeat.
pub const WATCH_EVERY: Duration = Duration::from_millis(10);

/// One counter on a cache line of its own: the worker writes `current` on every poll of a
/// request, and the front-end's reads of `beats` should not share its line.
#[repr(C, align(64))]
struct Line(AtomicU64);

/// What the page holds.
#[repr(C)]
struct Page {
    beats: Line,
    current: Line,
}

const LEN: usize = 4096;

/// One worker's heartbeat page, mapped in this process.
#[derive(Debug)]
pub struct Heartbeat {
    page: NonNull<Page>,
}

// SAFETY: the mapping is only ever accessed through atomics and lives until drop.
unsafe impl Send for Heartbeat {}
unsafe impl Sync for Heartbeat {}

impl Heartbeat {
    /// Creates a new page (in `rip serve`), with the fd to hand to the worker.
    pub fn create() -> io::Result<(Heartbeat, OwnedFd)> {
        let fd = memfd_create(
            c"rip-heartbeat",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )?;
        nix::unistd::ftruncate(&fd, LEN as i64)?;
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))?;
        Ok((Heartbeat::map(&fd)?, fd))
    }

    /// Maps the page the parent created (in a worker).
    pub fn open(fd: OwnedFd) -> io::Result<Heartbeat> {
        let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS)?;
        if seals & SealFlag::F_SEAL_SHRINK.bits() == 0 {
            return Err(io::Error::other("the heartbeat fd is not a sealed rip heartbeat"));
        }
        Heartbeat::map(&fd)
    }

    fn map(fd: &OwnedFd) -> io::Result<Heartbeat> {
        let len = NonZeroUsize::new(LEN).expect("non-zero");
        // SAFETY: a fresh shared mapping of a sealed memfd of exactly LEN bytes; nothing else
        // in this process aliases it, and it is unmapped only on drop.
        let ptr = unsafe {
            mmap(None, len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, fd, 0)?
        };
        Ok(Heartbeat { page: ptr.cast() })
    }

    fn page(&self) -> &Page {
        // SAFETY: mapped in `map` for the whole life of `self`; every field is an atomic, so
        // writes by the other process are never a data race in this one.
        unsafe { self.page.as_ref() }
    }

    /// One beat (the worker's runtime).
    pub fn beat(&self) {
        self.page().beats.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Beats so far (the front-end).
    pub fn beats(&self) -> u64 {
        self.page().beats.0.load(Ordering::Relaxed)
    }

    /// The request now being polled, 0 for none (the worker, around every poll).
    pub fn set_current(&self, request: u64) {
        self.page().current.0.store(request, Ordering::Relaxed);
    }

    /// The request the worker was polling at its last write, 0 for none.
    pub fn current(&self) -> u64 {
        self.page().current.0.load(Ordering::Relaxed)
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        // SAFETY: the pointer and length are the ones `map` got from mmap.
        let _ = unsafe { munmap(self.page.cast(), LEN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_mappings_of_one_page_see_each_others_writes() {
        let (parent, fd) = Heartbeat::create().unwrap();
        let child = Heartbeat::open(fd.try_clone().unwrap()).unwrap();
        child.beat();
        child.beat();
        child.set_current(42);
        assert_eq!(parent.beats(), 2);
        assert_eq!(parent.current(), 42);
    }

    #[test]
    fn a_worker_cannot_shrink_the_page_under_the_parent() {
        let (_parent, fd) = Heartbeat::create().unwrap();
        assert!(nix::unistd::ftruncate(&fd, 0).is_err(), "sealed against shrinking");
    }

    #[test]
    fn any_other_fd_is_refused() {
        let fd = memfd_create(c"other", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, LEN as i64).unwrap();
        assert!(Heartbeat::open(fd).is_err());
    }
}
