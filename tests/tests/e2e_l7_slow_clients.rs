//! Slow clients against lb's HTTP listener, in namespaces: 2,000 connections trickling a
//! request head a byte a second, POSTs whose bodies stop, and requests for large answers
//! that are never read, all at once and reconnecting as they are closed, while wrk runs its
//! normal load. wrk keeps its rate, lb never runs out of file descriptors, and each slow
//! connection is closed within its timeout.
use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{
    lbproc::LbProcess,
    topology::Topology,
    wrk::{Wrk, WrkOptions},
};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
    time::sleep,
};

/// lb's HTTP listener in the two-armed topology: its client-side address.
fn listener() -> SocketAddr {
    SocketAddr::from(([10, 202, 1, 1], 80))
}

/// The timeouts lb runs with here: short, to keep the test short.
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
const BODY_TIMEOUT: Duration = Duration::from_secs(3);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Closed on time: within the timeout and this (lb looks at its connections four times
/// per timeout, and the machine is shared).
const MARGIN: Duration = Duration::from_secs(2);

const SLOW_HEADERS: usize = 2000;
const SLOW_BODIES: usize = 20;
const UNREAD: usize = 20;
/// The slow clients come from addresses of their own, so that lb's per-client cap (256 by
/// default) admits them all: 10 addresses, 200 connections each at most.
const SLOW_ADDRESSES: u8 = 10;

fn slow_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 202, 1, 100 + (i % SLOW_ADDRESSES as usize) as u8)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Header,
    Body,
    Unread,
}

/// One slow connection ended: what it was and how long lb took, from the moment its
/// timeout started (the first byte of the head; the last byte of the body). An unread
/// answer is read once its timeout and the margin are over, and tells whether lb had cut
/// it by then.
#[derive(Debug)]
struct Closed {
    kind: Kind,
    after: Duration,
    /// Ended by lb (an unread answer: short of its length).
    cut: bool,
}

/// The size of the answer asked for and never read.
const BIG: usize = 64 << 20;

/// Holds one slow connection of `kind` from `from` open at all times, until `stop`: a
/// new one each time lb closes the last. Reports each close.
async fn slow_client(
    kind: Kind,
    from: Ipv4Addr,
    stop: Arc<AtomicBool>,
    open: Arc<AtomicUsize>,
    closed: tokio::sync::mpsc::UnboundedSender<Closed>,
) {
    while !stop.load(Ordering::Relaxed) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((from, 0))).unwrap();
        let Ok(mut s) = socket.connect(listener()).await else {
            sleep(Duration::from_millis(100)).await;
            continue;
        };
        open.fetch_add(1, Ordering::Relaxed);
        let mut buf = vec![0u8; 65536];
        let since;
        let mut cut = true;
        match kind {
            Kind::Header => {
                // "GET /web/x HTTP/1.1\r\nX-A: aaaa..." a byte a second, never ending.
                since = Instant::now();
                let head = b"GET /web/x HTTP/1.1\r\nHost: lb\r\nX-Slow: ";
                let mut i = 0;
                loop {
                    let byte = head.get(i).copied().unwrap_or(b'a');
                    i += 1;
                    if s.write_all(&[byte]).await.is_err() {
                        break;
                    }
                    // Wait a second, or less if lb closes meanwhile.
                    match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                        Err(_) => {}
                        Ok(_) => break,
                    }
                }
            }
            Kind::Body => {
                // The head and 10 bytes of a 1 MB body, then nothing.
                let _ = s
                    .write_all(b"POST /web/upload HTTP/1.1\r\nHost: lb\r\nContent-Length: 1000000\r\n\r\n0123456789")
                    .await;
                since = Instant::now();
                // lb answers 408, then closes.
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            }
            Kind::Unread => {
                let _ = s
                    .write_all(format!("GET /web/big/{BIG} HTTP/1.1\r\nHost: lb\r\n\r\n").as_bytes())
                    .await;
                since = Instant::now();
                // Not read for the timeout and the margin; then read at full speed. Cut by
                // lb meanwhile, the answer ends short; not, it all comes.
                sleep(RESPONSE_TIMEOUT + MARGIN).await;
                let mut got = 0;
                let drained = tokio::time::timeout(Duration::from_secs(10), async {
                    while let Ok(n) = s.read(&mut buf).await
                        && n > 0
                    {
                        got += n;
                    }
                })
                .await;
                cut = drained.is_ok() && got < BIG;
            }
        }
        let after = since.elapsed();
        open.fetch_sub(1, Ordering::Relaxed);
        if !stop.load(Ordering::Relaxed) {
            let _ = closed.send(Closed { kind, after, cut });
        }
    }
}
