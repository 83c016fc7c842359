//! Which worker thread the current thread is: what picks a worker's own route table,
//! backend pools and counter parts. Set once by each worker thread as it starts.
use std::cell::Cell;

thread_local! {
    /// The index of the worker this thread is.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Makes the current thread worker `index`.
pub(crate) fn set_index(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// The worker the current thread is (0 outside workers).
pub(crate) fn index() -> usize {
    WORKER.with(Cell::get)
}
