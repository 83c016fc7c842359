//! The HTTP listeners routes have on ports of their own (`http.port`, DFP's `srcPort`):
//! one is opened, on the `--http` listener's address, when a route first asks for its
//! port, and closed when no route does any more. The proxy's workers follow the set.
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use tokio::sync::watch;

use crate::l7::PortListeners;

pub struct HttpPorts {
    ip: IpAddr,
    /// Listening sockets are registered with a runtime, even those handed on at once.
    runtime: tokio::runtime::Handle,
    open: watch::Sender<PortListeners>,
    /// Ports that could not be opened, said once until they are.
    failing: Mutex<BTreeSet<u16>>,
}

impl HttpPorts {
    /// Listeners on `ip`, and what the proxy's workers accept on.
    pub fn new(
        ip: IpAddr,
        runtime: tokio::runtime::Handle,
    ) -> (Self, watch::Receiver<PortListeners>) {
        let (open, workers) = watch::channel(PortListeners::new());
        let ports = Self {
            ip,
            runtime,
            open,
            failing: Mutex::default(),
        };
        (ports, workers)
    }

    /// Opens a listener on each of `wanted` that has none (one that cannot be opened is
    /// logged, and tried again on the next call) and closes those not wanted any more.
    pub fn follow(&self, wanted: &BTreeSet<u16>) {
        let mut failing = self.failing.lock().unwrap();
        failing.retain(|port| wanted.contains(port));
        self.open.send_if_modified(|open| {
            let before: BTreeSet<u16> = open.keys().copied().collect();
            open.retain(|port, _| wanted.contains(port));
            for &port in wanted.iter().filter(|p| !before.contains(p)) {
                let addr = SocketAddr::new(self.ip, port);
                let _runtime = self.runtime.enter();
                match crate::listen::listen(addr).and_then(tokio::net::TcpListener::into_std) {
                    Ok(listener) => {
                        open.insert(port, Arc::new(listener));
                        failing.remove(&port);
                        tracing::info!(%addr, "serving the HTTP routes on this port");
                    }
                    Err(e) => {
                        if failing.insert(port) {
                            tracing::error!(%addr, error = %e, "cannot listen for the HTTP routes on this port (http.port); tried again on the next change of routes");
                        }
                    }
                }
            }
            for port in before.iter().filter(|p| !open.contains_key(p)) {
                tracing::info!(addr = %SocketAddr::new(self.ip, *port), "no HTTP route on this port any more: closed");
            }
            open.keys().copied().ne(before.iter().copied())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_loopback() -> (HttpPorts, watch::Receiver<PortListeners>) {
        HttpPorts::new(
            IpAddr::from([127, 0, 0, 1]),
            tokio::runtime::Handle::current(),
        )
    }

    #[tokio::test]
    async fn a_port_opens_with_its_first_route_and_closes_with_its_last() {
        let (ports, workers) = on_loopback();
        // A port the kernel picks, known free.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        ports.follow(&BTreeSet::from([port]));
        let open = workers.borrow().get(&port).cloned().expect("opened");
        assert_eq!(open.local_addr().unwrap().port(), port);
        let connected = std::net::TcpStream::connect(("127.0.0.1", port));
        assert!(connected.is_ok(), "{connected:?}");
        // Asked again: the same listener, no change sent.
        let mut seen = workers.clone();
        seen.mark_unchanged();
        ports.follow(&BTreeSet::from([port]));
        assert!(!seen.has_changed().unwrap());
        assert!(Arc::ptr_eq(&open, &workers.borrow()[&port]));
        ports.follow(&BTreeSet::new());
        assert!(workers.borrow().is_empty());
        drop(open);
        let refused = std::net::TcpStream::connect(("127.0.0.1", port));
        assert!(refused.is_err(), "{refused:?}");
    }

    #[tokio::test]
    async fn a_port_that_cannot_be_opened_is_left_out_and_tried_again() {
        let (ports, workers) = on_loopback();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        ports.follow(&BTreeSet::from([port]));
        assert!(workers.borrow().is_empty());
        drop(taken);
        ports.follow(&BTreeSet::from([port]));
        assert!(workers.borrow().contains_key(&port));
    }
}
