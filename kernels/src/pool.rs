//! A bounded, reusable thread pool for kernels.
//!
//! The pool owns `threads - 1` workers; the calling thread is the last one.
//! [`ThreadPool::run`] splits task indices `0..n_tasks` into one contiguous
//! range per thread, each handed out through its own atomic counter; a
//! thread that finishes its range takes the next tasks of the others'
//! (work stealing), and `run` returns when every task has finished. Kernels
//! number their tasks in memory order (rows, pixel chunks), so a thread
//! works on the same part of the image layer after layer and mostly reads
//! what it wrote itself, from its own cache; stealing keeps the threads
//! busy when one is slowed. Nothing is allocated per
//! call: the job is a borrowed closure published through the pool's shared
//! state, workers spin briefly for new work (the next layer usually follows
//! within microseconds) and then sleep on a condition variable.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// A task body: called with (task index, thread slot). The thread slot is in
/// `0..threads()` and is unique among tasks running at the same time, so it can
/// index per-thread scratch memory.
pub type Task<'a> = dyn Fn(usize, usize) + Sync + 'a;

/// Pointer to the job being run; only dereferenced between publication and
/// the end of [`ThreadPool::run`].
#[derive(Clone, Copy)]
struct JobPtr(*const Task<'static>);
// SAFETY: the pointee is `Sync` and outlives every access (see `run`).
unsafe impl Send for JobPtr {}

struct State {
    job: Option<JobPtr>,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    generation: AtomicU64,
    /// One task range per thread slot.
    ranges: Box<[Range]>,
    busy_workers: AtomicUsize,
    panicked: AtomicBool,
    /// Set when the pool is dropped, so spinning workers leave at once.
    closing: AtomicBool,
    /// Workers that have entered their loop (thread start-up done).
    started: AtomicUsize,
    /// Workers asleep on `wake` (changed only under `state`'s lock), so
    /// `run` makes the wake-up system call only when one is.
    sleepers: AtomicUsize,
}

/// A fixed set of worker threads shared by all kernels of an execution context.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    threads: usize,
    /// Serialises `run` calls from several threads on the same pool.
    running: Mutex<()>,
}

/// Spin iterations between clock checks while waiting.
const SPIN_ITERATIONS: u32 = 20_000;

impl ThreadPool {
    /// A pool that runs tasks on `threads` threads in total (the caller
    /// included). `threads` is clamped to at least 1.
    pub fn new(threads: usize) -> ThreadPool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                job: None,
                shutdown: false,
            }),
            wake: Condvar::new(),
            generation: AtomicU64::new(0),
            ranges: (0..threads).map(|_| Range::default()).collect(),
            busy_workers: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            started: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
        });
        // Spinning only pays when every thread has a core: oversubscribed,
        // a spinning worker steals the core the thread it waits for needs.
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let spin = if threads <= cores {
            crate::knobs::pool_spin()
        } else {
            std::time::Duration::ZERO
        };
        // Slots must stay contiguous: stop at the first refused thread.
        let workers = (1..threads)
            .map_while(|slot| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("osprey-k{slot}"))
                    .spawn(move || worker_loop(&shared, slot - 1, spin))
                    .ok()
            })
            .collect::<Vec<_>>();
        // If the OS refused some threads, run with the ones we got.
        let threads = workers.len() + 1;
        // Wait until every worker runs: thread start-up allocates (names,
        // stack guards), and that must happen here, not during the first
        // frames after warm-up.
        while shared.started.load(Ordering::Acquire) < workers.len() {
            std::thread::yield_now();
        }
        ThreadPool {
            shared,
            workers,
            threads,
            running: Mutex::new(()),
        }
    }

    /// Total threads (workers plus the caller).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `task(i, slot)` for every `i` in `0..n_tasks` and waits for all.
    ///
    /// # Panics
    /// Re-raises (on the calling thread) a panic raised by a task.
    pub fn run(&self, n_tasks: usize, task: &Task<'_>) {
        if n_tasks == 0 {
            return;
        }
        if self.threads == 1 || n_tasks == 1 {
            for i in 0..n_tasks {
                task(i, 0);
            }
            return;
        }
        let _serial = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let sh = &*self.shared;
        // SAFETY: we erase the closure's lifetime to publish it to the workers.
        // `run` does not return before every worker that picked the job up has
        // decremented `busy_workers` (after its last call), and the job is
        // withdrawn from `state` before returning, so no worker can call it after
        // the borrow ends.
        let ptr: *const Task<'static> = unsafe { std::mem::transmute(task as *const Task<'_>) };
        // Only the threads that exist take ranges (the OS may have refused
        // some workers).
        let t = self.threads;
        for (s, r) in sh.ranges.iter().enumerate() {
            let (a, b) = if s < t {
                (n_tasks * s / t, n_tasks * (s + 1) / t)
            } else {
                (0, 0)
            };
            r.next.store(a, Ordering::Relaxed);
            r.end.store(b, Ordering::Relaxed);
        }
        sh.busy_workers.store(self.workers.len(), Ordering::Relaxed);
        {
            let mut st = sh.state.lock().unwrap_or_else(|p| p.into_inner());
            st.job = Some(JobPtr(ptr));
            sh.generation.fetch_add(1, Ordering::Release);
        }
        // A worker goes to sleep only after seeing the old generation and
        // counting itself as a sleeper, both under the lock taken above; so
        // either it saw the new generation, or its count is visible here.
        // Spinning workers (the usual case between layers) need no system
        // call.
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            sh.wake.notify_all();
        }

        // The caller works too, as the last slot.
        let caller_slot = self.threads - 1;
        let caller = catch_unwind(AssertUnwindSafe(|| drain(sh, task, caller_slot)));
        if caller.is_err() {
            sh.stop();
        }

        let mut spins = 0u32;
        while sh.busy_workers.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < SPIN_ITERATIONS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        {
            let mut st = sh.state.lock().unwrap_or_else(|p| p.into_inner());
            st.job = None;
        }
        if let Err(payload) = caller {
            sh.panicked.store(false, Ordering::Relaxed);
            std::panic::resume_unwind(payload);
        }
        if sh.panicked.swap(false, Ordering::AcqRel) {
            panic!("a kernel task panicked on a worker thread");
        }
    }
}

/// One thread's share of a job's tasks: `next..end`, on its own cache line
/// (two, for CPUs that fetch lines in pairs), so the counters of different
/// threads do not contend.
#[derive(Default)]
#[repr(align(128))]
struct Range {
    next: AtomicUsize,
    end: AtomicUsize,
}

impl Shared {
    /// Leaves no task to take (after a panic).
    fn stop(&self) {
        for r in self.ranges.iter() {
            r.next.store(usize::MAX / 2, Ordering::Relaxed);
        }
    }
}

/// Takes the tasks of this slot's range, then the ones left in the others'
/// (in slot order from the next one), until none are left anywhere.
fn drain(sh: &Shared, task: &Task<'_>, slot: usize) {
    let n = sh.ranges.len();
    for k in 0..n {
        let r = &sh.ranges[(slot + k) % n];
        let end = r.end.load(Ordering::Relaxed);
        loop {
            let i = r.next.fetch_add(1, Ordering::Relaxed);
            if i >= end {
                break;
            }
            task(i, slot);
        }
    }
}

fn worker_loop(sh: &Shared, slot: usize, spin: std::time::Duration) {
    sh.started.fetch_add(1, Ordering::Release);
    let mut seen = 0u64;
    loop {
        // Spin first: in a network the next layer's job usually arrives
        // within microseconds, far sooner than a sleep/wake round trip (which
        // costs tens of microseconds, more in a VM). `OSPREY_POOL_SPIN_US`
        // bounds the spinning so an idle daemon does not burn a core.
        let start = std::time::Instant::now();
        'spin: while sh.generation.load(Ordering::Acquire) == seen {
            for _ in 0..64 {
                std::hint::spin_loop();
                if sh.generation.load(Ordering::Acquire) != seen {
                    break 'spin;
                }
            }
            if start.elapsed() >= spin || sh.closing.load(Ordering::Relaxed) {
                break;
            }
        }
        let job = {
            let mut st = sh.state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if st.shutdown {
                    return;
                }
                let gen = sh.generation.load(Ordering::Acquire);
                if gen != seen {
                    seen = gen;
                    break st.job;
                }
                sh.sleepers.fetch_add(1, Ordering::SeqCst);
                st = sh.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                sh.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
        };
        if let Some(JobPtr(ptr)) = job {
            // SAFETY: `run` keeps the closure alive until `busy_workers`
            // reaches zero, which happens only after this call returns.
            let task: &Task<'_> = unsafe { &*ptr };
            if catch_unwind(AssertUnwindSafe(|| drain(sh, task, slot))).is_err() {
                sh.panicked.store(true, Ordering::Release);
                // Consume the remaining tasks so the caller is not left waiting.
                sh.stop();
            }
            sh.busy_workers.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Relaxed);
        {
            let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            st.shutdown = true;
        }
        self.shared.wake.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("threads", &self.threads)
            .finish()
    }
}

/// A raw pointer that may be shared between the pool's threads.
///
/// Kernels use it to let tasks write disjoint parts of one output buffer.
#[derive(Clone, Copy, Debug)]
pub struct SyncPtr<T>(pub *mut T);
// SAFETY: users guarantee that concurrent tasks touch disjoint elements.
unsafe impl<T> Send for SyncPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// Wraps a mutable slice's pointer.
    pub fn new(s: &mut [T]) -> Self {
        SyncPtr(s.as_mut_ptr())
    }
    /// The pointer `offset` elements further.
    ///
    /// # Safety
    /// `offset` must stay within the allocation the pointer came from.
    pub unsafe fn add(self, offset: usize) -> *mut T {
        // SAFETY: forwarded to the caller.
        unsafe { self.0.add(offset) }
    }
}

/// An output as a kernel's epilogue writes it: f32, or INT8 requantized.
#[derive(Clone, Copy)]
pub(crate) enum Dst {
    F32(SyncPtr<f32>),
    /// Pointer and the reciprocal of the output scale.
    I8(SyncPtr<i8>, f32),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_task_runs_once() {
        for threads in 1..=4 {
            let pool = ThreadPool::new(threads);
            for n in [0usize, 1, 2, 7, 100] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(n, &|i, slot| {
                    assert!(slot < pool.threads());
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn reusable_many_times() {
        let pool = ThreadPool::new(3);
        let total = AtomicUsize::new(0);
        for _ in 0..2000 {
            pool.run(5, &|i, _| {
                total.fetch_add(i, Ordering::Relaxed);
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 2000 * 10);
    }

    #[test]
    fn worker_panic_is_reported_not_hung() {
        let pool = ThreadPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(64, &|i, _| {
                if i == 3 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        // The pool still works afterwards.
        let n = AtomicUsize::new(0);
        pool.run(10, &|_, _| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 10);
    }
}
