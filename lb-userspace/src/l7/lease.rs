//! Choosing a backend for a request, and the lease that counts the request in that
//! backend's outstanding requests while it is in flight.
use std::sync::{Arc, atomic::Ordering};

use super::{
    backend::Backend,
    routes::{Balance, Table, Target},
};

/// A request in flight to a backend: counted in its outstanding requests until dropped.
/// It holds the worker's route table that the request was routed with (whose reference
/// count only that worker touches) rather than a handle on the shared backend.
pub(crate) struct Lease {
    table: Arc<Table>,
    target: usize,
    backend: usize,
}

impl Lease {
    pub fn new(table: Arc<Table>, target: usize, backend: usize) -> Self {
        let lease = Self {
            table,
            target,
            backend,
        };
        lease.backend().request_started();
        lease
    }

    pub fn backend(&self) -> &Backend {
        &self.table.target(self.target).backends[self.backend]
    }

    pub fn service(&self) -> &str {
        &self.table.target(self.target).service
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend().request_finished();
    }
}

/// Picks the backend (its index) for one request of `target`; None when it has none.
pub(crate) fn pick(target: &Target) -> Option<usize> {
    let backends = &target.backends;
    let n = backends.len();
    if n == 0 {
        return None;
    }
    let turn = target.cursor.fetch_add(1, Ordering::Relaxed);
    Some(match target.balance {
        Balance::RoundRobin => turn % n,
        Balance::LeastOutstanding => {
            // Scan from a rotating start so that ties (an idle pool) still take turns.
            let start = turn % n;
            (0..n)
                .map(|i| (start + i) % n)
                .min_by_key(|&b| backends[b].outstanding())
                .expect("n > 0")
        }
    })
}
