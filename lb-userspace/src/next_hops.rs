//! Keeping backends' next hops resolved, on a thread of its own: adding and removing
//! neighbour entries (route and neighbour dumps, netlink round trips) is slow next to a map
//! write, and must not hold up the controller's commands. Requests are carried out in the
//! order they are sent; an entry still resolving when a backend's first packet comes is
//! no different from one the kernel has not resolved yet (the packet is dropped, counted
//! as `no_neighbor`, and the client retries).
use std::{net::Ipv4Addr, sync::mpsc, thread::JoinHandle};

use crate::net::Neighbors;

enum Request {
    Add(Vec<Ipv4Addr>),
    Remove(Vec<Ipv4Addr>),
    KeepOnExit,
    /// Answered once everything sent before it is done.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Sends [`Neighbors`] its work. Dropping it waits for the work sent so far, then drops
/// the entries (unless [`NextHops::keep_on_exit`] was called).
pub struct NextHops {
    requests: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Default for NextHops {
    fn default() -> Self {
        let (requests, inbox) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("lb-next-hops".into())
            .spawn(move || {
                crate::privileges::keep_only_in_thread(crate::privileges::RUNNING);
                let mut neighbors = Neighbors::default();
                for request in inbox {
                    match request {
                        Request::Add(ips) => neighbors.add(ips),
                        Request::Remove(ips) => neighbors.remove(ips),
                        Request::KeepOnExit => neighbors.keep_on_exit(),
                        Request::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .expect("spawning the next-hop thread");
        Self {
            requests: Some(requests),
            thread: Some(thread),
        }
    }
}

impl NextHops {
    fn send(&self, request: Request) {
        if let Some(requests) = &self.requests
            && requests.send(request).is_err()
        {
            tracing::error!("the next-hop thread has stopped; backends' next hops are not kept");
        }
    }

    /// Starts keeping the next hops of `backends` resolved.
    pub fn add(&self, backends: impl IntoIterator<Item = Ipv4Addr>) {
        let ips: Vec<Ipv4Addr> = backends.into_iter().collect();
        if !ips.is_empty() {
            self.send(Request::Add(ips));
        }
    }

    /// Stops keeping the next hops that only `backends` used.
    pub fn remove(&self, backends: impl IntoIterator<Item = Ipv4Addr>) {
        let ips: Vec<Ipv4Addr> = backends.into_iter().collect();
        if !ips.is_empty() {
            self.send(Request::Remove(ips));
        }
    }

    /// Leaves the entries in place when this is dropped.
    pub fn keep_on_exit(&self) {
        self.send(Request::KeepOnExit);
    }

    /// Resolves once everything sent so far is done (or the thread has stopped): an API
    /// write answers after its backends' next hops are in, without the controller
    /// waiting for them.
    pub fn done(&self) -> NextHopsDone {
        let (done, finished) = tokio::sync::oneshot::channel();
        self.send(Request::Flush(done));
        NextHopsDone(finished)
    }
}

impl Drop for NextHops {
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// See [`NextHops::done`].
pub struct NextHopsDone(tokio::sync::oneshot::Receiver<()>);

impl NextHopsDone {
    pub async fn wait(self) {
        let _ = self.0.await;
    }
}
