//! A small fork-join thread pool for the CPU backend's hot loops.
//!
//! Decode runs a few hundred matmuls per token, each only tens of microseconds long, so the
//! cost of waking threads matters as much as the arithmetic: workers spin on a generation
//! counter for a while after each job (like llama.cpp's threadpool) and only then back off to
//! sleeping. A job is a closure called once per task index; the caller works too and returns
//! when every task has finished.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    generation: AtomicU64,
    /// Written by the caller before `generation` is bumped; read by workers after.
    job: UnsafeCell<Option<Job>>,
    n_tasks: AtomicUsize,
    next_task: AtomicUsize,
    /// Workers that finished the current generation.
    finished: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    /// Spins before an idle worker starts yielding (FLEA_POOL_SPIN overrides SPIN_LIMIT:
    /// hybrid decode leaves the CPU idle for milliseconds while the GPU computes, and a
    /// worker that went to sleep joins the next CPU layer late).
    spin_limit: u32,
}

// SAFETY: `job` is only written by the thread that owns the pool while no job is running
// (all workers have reported `finished` for the previous generation), and only read by
// workers between observing a new generation and reporting `finished`.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw closure pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

/// Spins before a worker starts yielding, then sleeping.
const SPIN_LIMIT: u32 = 1 << 16;
const YIELD_LIMIT: u32 = 1 << 10;
const IDLE_SLEEP: Duration = Duration::from_micros(200);

impl ThreadPool {
    /// A pool whose jobs run on `threads` threads in all: the caller and `threads - 1` workers.
    pub fn new(threads: usize) -> std::io::Result<ThreadPool> {
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            n_tasks: AtomicUsize::new(0),
            next_task: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            spin_limit: std::env::var("FLEA_POOL_SPIN")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(SPIN_LIMIT),
        });
        let mut workers = Vec::new();
        for i in 1..threads.max(1) {
            let s = Arc::clone(&shared);
            workers.push(
                std::thread::Builder::new()
                    .name(format!("flea-cpu-{i}"))
                    .spawn(move || worker(&s))?,
            );
        }
        Ok(ThreadPool { shared, workers })
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Call `f(i)` for every `i` in `0..n_tasks`, spread over the pool; returns when all
    /// calls have returned. Panics if a task panicked (after every task has finished).
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        if self.workers.is_empty() || n_tasks == 1 {
            (0..n_tasks).for_each(f);
            return;
        }
        let s = &*self.shared;
        // Erase the closure's lifetime: it outlives every use, because this function does
        // not return before all workers reported `finished` for this generation.
        // SAFETY: only the trait object's lifetime bound changes; see above for why the
        // pointee outlives every dereference.
        let job: Job = unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), Job>(f) };
        // SAFETY: no job is running (the previous `run` waited for all workers), so no worker
        // reads `job` now; the Release bump below publishes the write.
        unsafe { *s.job.get() = Some(job) };
        s.n_tasks.store(n_tasks, Ordering::Relaxed);
        s.next_task.store(0, Ordering::Relaxed);
        s.finished.store(0, Ordering::Relaxed);
        s.generation.fetch_add(1, Ordering::Release);
        let caller_panicked =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drain(s, f))).is_err();
        let n_workers = self.workers.len();
        let mut spins = 0u32;
        while s.finished.load(Ordering::Acquire) < n_workers {
            spins = spins.saturating_add(1);
            if spins < SPIN_LIMIT {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if caller_panicked || s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a CPU backend task panicked");
        }
    }
}

fn drain(s: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let n = s.n_tasks.load(Ordering::Relaxed);
    loop {
        let i = s.next_task.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        f(i);
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        let mut idle = 0u32;
        loop {
            if s.shutdown.load(Ordering::Relaxed) {
                return;
            }
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            idle = idle.saturating_add(1);
            if idle < s.spin_limit {
                std::hint::spin_loop();
            } else if idle < s.spin_limit.saturating_add(YIELD_LIMIT) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(IDLE_SLEEP);
            }
        }
        // SAFETY: the Acquire load of the new generation synchronises with the caller's
        // Release bump, after which `job` holds a closure that stays alive until this worker
        // reports `finished`.
        let job = unsafe { *s.job.get() };
        if let Some(job) = job {
            // SAFETY: see above — the pointee outlives this generation.
            let f = unsafe { &*job };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drain(s, f))).is_err() {
                s.panicked.store(true, Ordering::Relaxed);
            }
        }
        s.finished.fetch_add(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A mutable slice shared by tasks that write disjoint parts of it.
pub struct Disjoint<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: tasks only access disjoint ranges (the caller of `range` guarantees it).
unsafe impl<T: Send> Sync for Disjoint<T> {}

impl<T> Disjoint<T> {
    pub fn new(s: &mut [T]) -> Disjoint<T> {
        Disjoint {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    /// # Safety
    /// No two live references returned by this function may overlap, and the slice passed to
    /// `new` must outlive them.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range(&self, start: usize, len: usize) -> &mut [T] {
        assert!(
            start <= self.len && len <= self.len - start,
            "Disjoint::range out of bounds"
        );
        // SAFETY: in bounds (asserted); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once() {
        let pool = ThreadPool::new(3).unwrap();
        for n in [0usize, 1, 2, 7, 100, 1000] {
            let counts: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|i| {
                counts[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn disjoint_writes() {
        let pool = ThreadPool::new(4).unwrap();
        let mut v = vec![0usize; 1000];
        let d = Disjoint::new(&mut v);
        pool.run(10, &|i| {
            // SAFETY: task i owns elements 100*i .. 100*(i+1).
            let s = unsafe { d.range(i * 100, 100) };
            s.iter_mut().enumerate().for_each(|(j, x)| *x = i * 100 + j);
        });
        assert!(v.iter().enumerate().all(|(i, &x)| i == x));
    }

    #[test]
    #[should_panic(expected = "task panicked")]
    fn a_panicking_task_is_reported_not_hung() {
        let pool = ThreadPool::new(2).unwrap();
        pool.run(8, &|i| assert!(i != 5, "boom"));
    }
}
