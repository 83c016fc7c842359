//! Slow clients against lb's HTTP listener, in namespaces: 2,000 connections trickling a
//! request head a byte every few seconds, POSTs whose bodies stop, and requests for large
//! answers that are never read, all open while wrk runs its normal load. wrk keeps its
//! rate, lb never runs out of file descriptors, and each slow connection is closed within
//! its timeout.
//!
//! The generator is one thread and one task a connection, each waking every few seconds,
//! so that on a small machine it takes little CPU from wrk, lb and the backends.
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
/// Longer than a wrk run, so that every slow connection is there through it.
const HEADER_TIMEOUT: Duration = Duration::from_secs(9);
const BODY_TIMEOUT: Duration = Duration::from_secs(9);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(9);
/// Closed on time: within the timeout and this (lb looks at its connections four times
/// per timeout, and the machine is shared).
const MARGIN: Duration = Duration::from_secs(3);
/// Rounds of wrk alone and wrk with a wave of slow clients.
const ROUNDS: usize = 5;
/// From the slow clients connected to wrk's start.
const SETTLE: Duration = Duration::from_secs(1);
/// Between two bytes of a slow head.
const TRICKLE: Duration = Duration::from_secs(3);

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

/// One slow connection of `kind` from `from`, until lb ends it; counted in `open`
/// meanwhile. None if it could not connect.
async fn slow_client(kind: Kind, from: Ipv4Addr, open: Arc<AtomicUsize>) -> Option<Closed> {
    {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((from, 0))).unwrap();
        let mut s = socket.connect(listener()).await.ok()?;
        open.fetch_add(1, Ordering::Relaxed);
        let mut buf = vec![0u8; 65536];
        let since;
        let mut cut = true;
        match kind {
            Kind::Header => {
                // "GET /web/x HTTP/1.1\r\nHost: lb\r\nX-Slow: aaaa..." a byte every few
                // seconds, never ending.
                since = Instant::now();
                let head = b"GET /web/x HTTP/1.1\r\nHost: lb\r\nX-Slow: ";
                let mut i = 0;
                loop {
                    let byte = head.get(i).copied().unwrap_or(b'a');
                    i += 1;
                    if s.write_all(&[byte]).await.is_err() {
                        break;
                    }
                    // Wait, or less if lb closes meanwhile.
                    match tokio::time::timeout(TRICKLE, s.read(&mut buf)).await {
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
                    .write_all(
                        format!("GET /web/big/{BIG} HTTP/1.1\r\nHost: lb\r\n\r\n").as_bytes(),
                    )
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
        Some(Closed { kind, after, cut })
    }
}

/// lb's open file descriptors and its limit on them.
fn fds(pid: u32) -> (usize, u64) {
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let max = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    (open, max)
}

/// lb's CPU time so far (user and system), from /proc: the cost of a phase, which the
/// shared machine does not blur as it does a rate.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // In USER_HZ, 100 a second on every Linux.
    Duration::from_millis(ticks * 10)
}

/// Lets this process open the client sockets (2,000 and more).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    assert!(
        hard >= 8192,
        "this test needs 8192 file descriptors, the hard limit is {hard}"
    );
}

/// A wave of slow clients, on a runtime of their own inside the namespace at `ns`: one
/// task a connection, all on one thread. What they were and when each was closed comes
/// back once all are; the count of those open meanwhile.
fn slow_wave(ns: String) -> (std::thread::JoinHandle<Vec<Closed>>, Arc<AtomicUsize>) {
    let open = Arc::new(AtomicUsize::new(0));
    let counted = open.clone();
    let wave = std::thread::spawn(move || {
        lb_tests::netns::in_netns(&ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let kinds = std::iter::repeat_n(Kind::Header, SLOW_HEADERS)
                    .chain(std::iter::repeat_n(Kind::Body, SLOW_BODIES))
                    .chain(std::iter::repeat_n(Kind::Unread, UNREAD));
                let tasks: Vec<_> = kinds
                    .enumerate()
                    .map(|(i, kind)| {
                        tokio::spawn(slow_client(kind, slow_address(i), counted.clone()))
                    })
                    .collect();
                let mut closed = Vec::new();
                for t in tasks {
                    closed.extend(t.await.unwrap());
                }
                closed
            })
        })
    });
    (wave, open)
}

#[test]
fn slow_clients_cost_wrk_little_and_are_closed_on_time() {
    raise_fd_limit();
    let topo = Topology::two_armed(2).unwrap();
    for i in 0..SLOW_ADDRESSES as usize {
        topo.client
            .ip(&format!("addr add {}/24 dev eth0", slow_address(i)))
            .unwrap();
    }
    let _backends = topo.start_backends(2, 8080, false).unwrap();
    let secs = |d: Duration| format!("{}s", d.as_secs());
    let lb = LbProcess::start(
        &topo.lb,
        &topo.lb_ifaces,
        &[
            "--http",
            &listener().to_string(),
            "--http-header-timeout",
            &secs(HEADER_TIMEOUT),
            "--http-body-timeout",
            &secs(BODY_TIMEOUT),
            "--http-response-timeout",
            &secs(RESPONSE_TIMEOUT),
        ],
    )
    .unwrap();
    let be = |i: usize| topo.backend(i, 8080).to_string();
    lb.put_service(
        "web",
        &json!({"http": {"paths": ["/web"]}, "backends": [be(0), be(1)]}),
    )
    .unwrap();
    let wrk = Wrk::new(&["/web/x"]).unwrap();
    let load = WrkOptions {
        threads: 1,
        connections: 32,
        duration: Duration::from_secs(3),
        close: false,
        tls: false,
    };
    // wrk's rate and lb's CPU time for it.
    let measure = || {
        let cpu = cpu_time(lb.pid());
        let report = wrk.run(&topo.client, listener(), &load).unwrap();
        assert_eq!(report.errors.total(), 0, "{}", report.errors);
        (
            report.rps(),
            (cpu_time(lb.pid()) - cpu).as_secs_f64() * 1e6 / report.requests.max(1) as f64,
        )
    };

    // lb's descriptors, sampled throughout.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (pid, sampling) = (lb.pid(), sampling.clone());
        std::thread::spawn(move || {
            let mut most = (0, 0);
            while sampling.load(Ordering::Relaxed) {
                let (open, max) = fds(pid);
                most = (most.0.max(open), max);
                std::thread::sleep(Duration::from_millis(200));
            }
            most
        })
    };
    // Rounds of wrk alone, then wrk with a wave of slow clients: the machine is shared,
    // and one run of each can differ by more than the 10 % measured; the median of
    // several rounds, taken in turn, does not.
    // The first run after lb starts fills its pools and the caches: not counted.
    let _ = measure();
    let (mut alone, mut with) = (Vec::new(), Vec::new());
    let mut closed = Vec::new();
    let all = SLOW_HEADERS + SLOW_BODIES + UNREAD;
    for _ in 0..ROUNDS {
        alone.push(measure());
        let (wave, open) = slow_wave(topo.client.path());
        // All connected before wrk starts, and settled: the unread answers have filled
        // the socket buffers between backend, lb and client (some 20 MB each), a one-off
        // cost that is not the load being measured.
        let connecting = Instant::now();
        lb_tests::eventually(Duration::from_secs(5), || {
            open.load(Ordering::Relaxed) == all
        });
        let connected = connecting.elapsed();
        assert!(
            open.load(Ordering::Relaxed) >= all * 9 / 10,
            "only {} slow connections opened",
            open.load(Ordering::Relaxed)
        );
        // The burst fits lb's accept queue: a SYN dropped for a full queue is sent again
        // only a second later.
        assert!(
            connected < Duration::from_secs(1),
            "{all} connections took {connected:?}: SYNs were dropped"
        );
        std::thread::sleep(SETTLE);
        with.push(measure());
        let still_open = open.load(Ordering::Relaxed);
        assert!(
            still_open >= all * 9 / 10,
            "the slow clients were gone before wrk was done: {still_open} left"
        );
        closed.extend(wave.join().unwrap());
    }
    alone.push(measure());
    sampling.store(false, Ordering::Relaxed);
    let (most_fds, fd_limit) = sampler.join().unwrap();

    let median = |runs: &[(f64, f64)], i: usize| {
        let mut v: Vec<f64> = runs
            .iter()
            .map(|r| if i == 0 { r.0 } else { r.1 })
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let show = |runs: &[(f64, f64)]| {
        runs.iter()
            .map(|(rps, cpu)| format!("{rps:.0} ({cpu:.1} us)"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    eprintln!(
        "wrk's req/s (lb's CPU a request) alone: {}; with {all} slow clients: {}; lb held \
         at most {most_fds} fds of {fd_limit}; {} slow connections closed",
        show(&alone),
        show(&with),
        closed.len()
    );
    // wrk keeps 90 % of its rate: each run with slow clients against the mean of the
    // runs alone just before and after it (the host's speed drifts), the median of those.
    let mut kept: Vec<f64> = with
        .iter()
        .enumerate()
        .map(|(i, w)| w.0 / ((alone[i].0 + alone[i + 1].0) / 2.0))
        .collect();
    kept.sort_by(f64::total_cmp);
    let kept = kept[kept.len() / 2];
    assert!(
        kept >= 0.9,
        "wrk kept {:.0} % of its rate (median of the rounds; medians {:.0} req/s with, {:.0} alone)",
        kept * 100.0,
        median(&with, 0),
        median(&alone, 0)
    );
    // Descriptors: well under the limit, and no accept failed for want of one.
    assert!(
        fd_limit > 0 && (most_fds as u64) < fd_limit,
        "{most_fds} of {fd_limit}"
    );
    assert!(
        most_fds >= SLOW_HEADERS,
        "the slow clients were not held: {most_fds} fds"
    );
    let log = lb.log_text();
    assert!(
        !log.contains("Too many open files") && !log.contains("EMFILE"),
        "lb ran out of descriptors"
    );

    // Every kind was closed, each connection within its timeout and the margin.
    for (kind, timeout, least) in [
        (Kind::Header, HEADER_TIMEOUT, SLOW_HEADERS * ROUNDS),
        (Kind::Body, BODY_TIMEOUT, SLOW_BODIES * ROUNDS),
        (Kind::Unread, RESPONSE_TIMEOUT, UNREAD * ROUNDS),
    ] {
        let of_kind: Vec<_> = closed.iter().filter(|c| c.kind == kind).collect();
        assert!(
            of_kind.len() * 10 >= least * 9,
            "{kind:?}: only {} connected",
            of_kind.len()
        );
        let late: Vec<&&Closed> = of_kind
            .iter()
            .filter(|c| !c.cut || (kind != Kind::Unread && c.after > timeout + MARGIN))
            .collect();
        assert!(
            late.is_empty(),
            "{kind:?}: {} late, like {:?}",
            late.len(),
            late[0]
        );
        let early = of_kind
            .iter()
            .filter(|c| kind != Kind::Unread && c.after + Duration::from_millis(500) < timeout)
            .count();
        assert_eq!(early, 0, "{kind:?}: closed before its timeout");
    }
    let (_, stats) = lb.request("GET", "/v1/stats", None).unwrap();
    let refused = &stats["http"]["refused"];
    assert!(
        refused["header_timeout"].as_u64().unwrap() >= (SLOW_HEADERS * ROUNDS * 9 / 10) as u64,
        "{refused}"
    );
    assert!(
        refused["body_timeout"].as_u64().unwrap() >= (SLOW_BODIES * ROUNDS * 9 / 10) as u64,
        "{refused}"
    );
    assert!(
        refused["response_timeout"].as_u64().unwrap() >= (UNREAD * ROUNDS * 9 / 10) as u64,
        "{refused}"
    );
    assert_eq!(refused["client_connections"], 0, "{refused}");
}
