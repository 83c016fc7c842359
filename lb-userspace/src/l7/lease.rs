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

    pub fn index(&self) -> usize {
        self.backend
    }

    pub fn target(&self) -> &Target {
        self.table.target(self.target)
    }

    pub fn service(&self) -> &str {
        &self.table.target(self.target).service
    }

    /// A lease on another backend of the same route, for a request this one's backend
    /// could not take; None when the route has no other.
    pub fn redispatch(&self) -> Option<Lease> {
        let other = pick_other(self.table.target(self.target), self.backend)?;
        Some(Lease::new(self.table.clone(), self.target, other))
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

/// Picks a backend of `target` other than `failed`, by the route's own rule among the
/// others; None when there is no other.
pub(crate) fn pick_other(target: &Target, failed: usize) -> Option<usize> {
    let backends = &target.backends;
    let n = backends.len();
    if n < 2 {
        return None;
    }
    let turn = target.cursor.fetch_add(1, Ordering::Relaxed);
    // The others, from a rotating start: redispatches spread over them.
    let mut others = (0..n - 1).map(|i| (failed + 1 + (turn + i) % (n - 1)) % n);
    Some(match target.balance {
        Balance::RoundRobin => others.next().expect("n > 1"),
        Balance::LeastOutstanding => others
            .min_by_key(|&b| backends[b].outstanding())
            .expect("n > 1"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l7::routes::{Registry, Route};

    fn table(backends: usize, balance: Balance) -> Table {
        let route = Route {
            service: "s".into(),
            backends: (0..backends)
                .map(|i| format!("10.0.0.{}:80", i + 1).parse().unwrap())
                .collect(),
            balance,
            ..Route::default()
        };
        Registry::new(1, 0).tables(&[route]).remove(0)
    }

    #[test]
    fn a_redispatch_goes_to_every_other_backend_in_turn() {
        for balance in [Balance::RoundRobin, Balance::LeastOutstanding] {
            let t = table(4, balance);
            let target = t.target(0);
            let picked: std::collections::BTreeSet<usize> =
                (0..30).map(|_| pick_other(target, 2).unwrap()).collect();
            assert_eq!(picked, [0, 1, 3].into(), "{balance:?}");
        }
        let t = table(1, Balance::RoundRobin);
        assert_eq!(pick_other(t.target(0), 0), None);
        let t = table(2, Balance::LeastOutstanding);
        assert_eq!(pick_other(t.target(0), 1), Some(0));
    }

    #[test]
    fn least_outstanding_redispatches_to_the_least_busy_other() {
        let t = Arc::new(table(3, Balance::LeastOutstanding));
        let busy = Lease::new(t.clone(), 0, 0);
        let _busier = [Lease::new(t.clone(), 0, 1), Lease::new(t.clone(), 0, 1)];
        drop(busy);
        for _ in 0..5 {
            assert_eq!(pick_other(t.target(0), 2), Some(0));
        }
    }
}
