//! A SYN flood from spoofed sources through lb, end to end: a bounded flooder in the client
//! namespace sends SYNs from random addresses at several rates, one far above what the SNAT
//! ports could hold without cookies, while a real client keeps opening connections and a
//! long-lived one keeps talking. Real clients get at least 99 % of their connections, the
//! long-lived one never breaks, cookie mode turns on and off again, and once the flood is
//! over nothing of it is left in the maps.
use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use lb_tests::{
    flood::syn_flood,
    lbproc::LbProcess,
    servers::{ClientLoad, http_get_once},
    topology::Topology,
};
use serde_json::json;

/// The spoofed sources: 10.203.0.0/16, routed from lb back towards the client side.
const SPOOFED: [u8; 2] = [10, 203];

/// Entries in a pinned map of lb's.
fn entries(lb: &LbProcess, map: &str) -> usize {
    serde_json::from_str::<Vec<serde_json::Value>>(&dump(lb, map)).map_or(usize::MAX, |v| v.len())
}

/// A pinned map of lb's as bpftool shows it (pretty JSON, with the fields' names).
fn dump(lb: &LbProcess, map: &str) -> String {
    let out = std::process::Command::new("bpftool")
        .args(["-p", "map", "dump", "pinned"])
        .arg(lb.bpffs.join(map))
        .output()
        .expect("bpftool");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every connection through a cookie, one after another, as a real client makes them, in
/// both topologies: each opens at once, with no segment sent twice. (lb's answers once
/// waited on a veth for the peer's next packet, and the client for a zero-window probe.)
#[test]
fn connections_opened_through_cookies_need_no_retransmission() {
    for (name, topo) in [
        ("two-armed", Topology::two_armed(1).unwrap()),
        ("one-armed", Topology::one_armed(1).unwrap()),
    ] {
        let _backends = topo.start_backends(1, 8080, false).unwrap();
        let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &["--syn-cookies", "always"]).unwrap();
        lb.put_service(
            "web",
            &json!({"vip": topo.vip(80).to_string(), "protocol": "tcp", "backends": [topo.backend(0, 8080).to_string()]}),
        )
        .unwrap();
        let retrans_before = topo.client.tcp_counter("RetransSegs").unwrap();
        let started = Instant::now();
        const CONNECTIONS: u64 = 50;
        for i in 0..CONNECTIONS {
            let answer = http_get_once(&topo.client, topo.vip(80).into(), Duration::from_secs(3));
            assert!(answer.is_ok(), "{name}: connection {i}: {answer:?}");
        }
        let elapsed = started.elapsed();
        let (_, stats) = lb.request("GET", "/v1/stats", None).unwrap();
        let retransmitted = topo.client.tcp_counter("RetransSegs").unwrap() - retrans_before;
        println!(
            "{name}: {CONNECTIONS} connections in {elapsed:?}, {retransmitted} segments retransmitted; lb: {stats}"
        );
        assert_eq!(
            stats["syn_flood"]["cookies_valid"], CONNECTIONS,
            "{name}: {stats}"
        );
        assert_eq!(
            retransmitted, 0,
            "{name}: the client had to send segments again"
        );
        // A zero-window probe costs 200 ms; 50 of them would take 10 s.
        assert!(
            elapsed < Duration::from_secs(5),
            "{name}: {CONNECTIONS} connections took {elapsed:?}"
        );
    }
}

/// A server that speaks first (as SMTP or SSH do) behind a cookie: the client sends
/// nothing, so lb completes the backend's handshake itself when the backend sends its
/// SYN-ACK again (after a second on Linux), and the banner arrives.
#[test]
fn a_server_that_speaks_first_is_reached_through_a_cookie() {
    let topo = Topology::two_armed(1).unwrap();
    let addr = topo.backend(0, 2525);
    let listener = topo.backends[0]
        .run(move || TcpListener::bind(addr))
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.write_all(b"220 banner\r\n").unwrap();
        // Holds the connection until the client has read the banner and closed.
        let mut rest = String::new();
        let _ = BufReader::new(conn).read_line(&mut rest);
    });
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &["--syn-cookies", "always"]).unwrap();
    lb.put_service(
        "smtp",
        &json!({"vip": topo.vip(25).to_string(), "protocol": "tcp", "backends": [addr.to_string()]}),
    )
    .unwrap();
    let vip = topo.vip(25);
    let (banner, took) = topo
        .client
        .run(move || {
            let started = Instant::now();
            let stream = TcpStream::connect_timeout(&vip.into(), Duration::from_secs(3)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut line = String::new();
            BufReader::new(stream)
                .read_line(&mut line)
                .map(|_| (line, started.elapsed()))
        })
        .unwrap();
    assert_eq!(banner, "220 banner\r\n");
    println!("the banner came after {took:?}");
    assert!(took < Duration::from_secs(4), "the banner took {took:?}");
    server.join().unwrap();
}

#[test]
fn a_spoofed_syn_flood_holds_nothing_and_real_clients_get_through() {
    let topo = Topology::two_armed(3).unwrap();
    let _backends = topo.start_backends(3, 8080, false).unwrap();
    // Cookie mode from 5,000 SYNs a second (the default, 50,000, is more than this
    // machine's flooder sends and the veth pair towards the client carries back as lb's
    // SYN-ACKs); closed connections leave the maps 2 s after the backend's close.
    let lb = LbProcess::start(
        &topo.lb,
        &topo.lb_ifaces,
        &[
            "--syn-cookies",
            "auto",
            "--syn-cookie-rate",
            "5000",
            "--backend-time-wait",
            "2",
        ],
    )
    .unwrap();
    let backends: Vec<String> = (0..3).map(|i| topo.backend(i, 8080).to_string()).collect();
    lb.put_service(
        "web",
        &json!({"vip": topo.vip(80).to_string(), "protocol": "tcp", "backends": backends}),
    )
    .unwrap();
    topo.lb
        .ip("route add 10.203.0.0/16 via 10.202.1.10")
        .unwrap();

    let load = ClientLoad::start(&topo.client, topo.vip(80).into()).unwrap();
    let mut sent = Vec::new();
    // Below the cookie threshold; far above it (without cookies, 10 s of pending ports each:
    // more than the 95,232 ports towards the three backends); below again.
    for (rate, secs) in [(1_000u64, 3u64), (15_000, 8), (1_000, 3)] {
        let n = syn_flood(
            &topo.client,
            topo.vip(80),
            SPOOFED,
            rate,
            Duration::from_secs(secs),
        )
        .unwrap();
        sent.push((rate, n));
    }
    let (_, stats) = lb.request("GET", "/v1/stats", None).unwrap();
    let report = load.stop();
    let flood = &stats["syn_flood"];
    println!("flood sent {sent:?}; lb: {stats}");
    println!(
        "real client: {} answered, {} failed {:?}, long-lived: {} answered by {:?}",
        report.answered,
        report.failures.len(),
        report.failures,
        report.kept_answered,
        report.kept_backends
    );
    let tried = report.answered + report.failures.len();
    assert!(
        report.failures.len() * 100 <= tried,
        "{} of {tried} failed: {:?}\n{stats}",
        report.failures.len(),
        &report.failures[..report.failures.len().min(5)]
    );
    assert!(report.answered > 100, "{report:?}");
    assert!(
        report.failures.iter().all(|f| !f.kept),
        "the long-lived connection broke: {:?}",
        report.failures
    );
    assert_eq!(
        report.kept_backends.len(),
        1,
        "the long-lived connection moved"
    );
    assert!(
        flood["entered"].as_u64().unwrap() >= 1,
        "cookie mode never turned on: {stats}"
    );
    assert!(flood["cookies_sent"].as_u64().unwrap() > 1000, "{stats}");
    assert_eq!(stats["drops"]["snat_exhausted"], 0, "{stats}");

    // Once the flood is over: cookie mode turns off, and the maps empty, swept by the
    // daemon: pending entries after 10 s, closed connections after their hold, and a
    // connection left half closed (a client that gave up) after the closing timeout.
    let hold = lb_common::flow::CLOSING_TIMEOUT_S as u64 + 10;
    let deadline = Instant::now() + Duration::from_secs(hold);
    loop {
        let tracked_flows = lb_tests::flowtab::live_flows(&lb.bpffs.join("conntrack")).unwrap();
        let (reverse, tracked) = (entries(&lb, "nat_reverse"), tracked_flows.len());
        let (_, stats) = lb.request("GET", "/v1/stats", None).unwrap();
        let cookies = stats["syn_flood"]["cookies"].as_bool().unwrap();
        if reverse == 0 && tracked == 0 && !cookies {
            assert!(stats["syn_flood"]["left"].as_u64().unwrap() >= 1, "{stats}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{hold} s after the flood: {reverse} reverse entries, {tracked} tracked flows, cookies {cookies}:\n{}\n{:?}",
            dump(&lb, "nat_reverse"),
            tracked_flows
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}
