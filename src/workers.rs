//! Worker threads: one single-threaded tokio runtime per core (thread-per-core).
//!
//! Every TCP listener has one socket per worker (SO_REUSEPORT: the kernel spreads new
//! connections across them), so a client connection, its hyper tasks and the pooled
//! upstream connection it borrows all run on one thread: a request never wakes another
//! thread, and no work-stealing scheduler moves tasks between cores. Pools keep idle
//! connections per worker for the same reason (`pool::Server`).
//!
//! The main thread is worker 0: it runs signals, reloads and the admin listener beside its
//! share of clients. A program that never starts workers (the demo, tests using the library)
//! runs everything on its own runtime as a single worker (`Workers::one`).

use std::cell::Cell;
use std::io;
use std::time::Duration;

use tokio::time::Instant;

use tokio::runtime::{Handle, Runtime};

/// The runtimes a proxy spreads its listeners over, and so how many idle lists each pool
/// keeps. Handed to `Proxy::start`; never a process-wide value, so two proxies in one process
/// (the demo's, a test's) each have their own.
#[derive(Debug, Clone)]
pub struct Workers {
    /// One per worker, worker 0 first; never empty.
    handles: Vec<Handle>,
}

thread_local! {
    /// This thread's worker index; 0 on threads that are not workers.
    static INDEX: Cell<usize> = const { Cell::new(0) };
    /// A collection of freed memory is already scheduled on this thread.
    static TIDYING: Cell<bool> = const { Cell::new(false) };
    /// When this thread last collected.
    static TIDIED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// How long after memory was freed it is handed back, so that a burst of releases shares
/// one collection.
const TIDY_AFTER: Duration = Duration::from_millis(50);
/// The least time between two collections on one worker: each walks the worker's heap.
const TIDY_GAP: Duration = Duration::from_millis(200);

// === impl Workers ===

impl Workers {
    /// One worker: the runtime `handle` belongs to, for programs that run the library on a
    /// runtime of their own (its tasks may run on any of that runtime's threads).
    pub fn one(handle: Handle) -> Workers {
        Workers {
            handles: vec![handle],
        }
    }

    /// The runtimes, worker 0 first.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// How many workers there are (at least 1).
    pub fn count(&self) -> usize {
        self.handles.len()
    }
}

/// Starts `n` workers (0 = one per core) and returns worker 0's runtime, which the calling
/// thread must drive (`block_on`) for as long as the proxy runs, with the workers to hand to
/// the proxy. The other workers run on their own threads until the process exits.
pub fn start(n: usize) -> io::Result<(Runtime, Workers)> {
    let n = if n == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        n
    };
    let main = runtime()?;
    let mut handles = vec![main.handle().clone()];
    for i in 1..n {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("waitless-{i}"))
            .spawn(move || {
                INDEX.with(|c| c.set(i));
                match runtime() {
                    Ok(rt) => {
                        let _ = tx.send(Ok(rt.handle().clone()));
                        // Drives this worker's tasks, timers and sockets until exit.
                        rt.block_on(std::future::pending::<()>());
                    }
                    Err(e) => drop(tx.send(Err(e))),
                }
            })?;
        let handle = rx
            .recv()
            .map_err(|_| io::Error::other("a worker thread died while starting"))??;
        handles.push(handle);
    }
    Ok((main, Workers { handles }))
}

/// The index of the worker running the caller (0 outside workers).
pub fn current() -> usize {
    INDEX.with(|c| c.get())
}

/// Hands the memory this worker freed back to the OS soon (call it inside a runtime).
///
/// mimalloc keeps freed pages for reuse and purges them only on later allocations; a worker
/// whose clients all went idle allocates nothing more and would keep the buffers they
/// released in its RSS (about 5 KB per idle keep-alive connection). A forced collection,
/// at most one per `TIDY_GAP` per worker and only after releases, costs the request path
/// nothing.
pub fn tidy_soon() {
    if TIDYING.with(|t| t.replace(true)) {
        return;
    }
    let now = Instant::now();
    let at = match TIDIED.with(Cell::get) {
        Some(last) => (now + TIDY_AFTER).max(last + TIDY_GAP),
        None => now + TIDY_AFTER,
    };
    tokio::spawn(async move {
        tokio::time::sleep_until(at).await;
        TIDYING.with(|t| t.set(false));
        TIDIED.with(|t| t.set(Some(Instant::now())));
        // SAFETY: mi_collect only purges memory that mimalloc's own heap no longer uses.
        unsafe { libmimalloc_sys::mi_collect(true) };
    });
}

fn runtime() -> io::Result<Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
