//! Sustained connection churn end to end: wrk opens one connection per request
//! (`Connection: close`, so nginx closes first and its TIME_WAIT sits on lb's SNAT tuples)
//! through lb to three nginx backends, for long enough that every SNAT port is reused many
//! times over, also with every handshake through SYN cookies. No connection may fail or
//! wait for a SYN's retransmission, also across a `kill -9` of lb and its restart.
use std::time::Duration;

use lb_tests::{
    lbproc::{LbProcess, temp_store},
    peers::Nginx,
    topology::Topology,
    wrk::{Wrk, WrkOptions, WrkReport},
};
use serde_json::{Value, json};

/// Starts nginx on every backend and lb (with `flags` besides the store) with service "web"
/// on VIP:80 over them.
fn setup(topo: &Topology, store: &str, flags: &[&str]) -> (Vec<Nginx>, LbProcess) {
    let nginx = (0..topo.backends.len())
        .map(|i| {
            Nginx::start(
                &topo.backends[i],
                topo.backend(i, 80).into(),
                &format!("be{i}"),
            )
            .unwrap()
        })
        .collect();
    let lb_flags: Vec<&str> = ["--store", store].iter().chain(flags).copied().collect();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &lb_flags).unwrap();
    let backends: Vec<String> = (0..topo.backends.len())
        .map(|i| topo.backend(i, 80).to_string())
        .collect();
    lb.put_service(
        "web",
        &json!({"vip": topo.vip(80).to_string(), "protocol": "tcp", "backends": backends}),
    )
    .unwrap();
    (nginx, lb)
}

fn churn(seconds: u64) -> WrkOptions {
    WrkOptions {
        threads: 2,
        connections: 32,
        duration: Duration::from_secs(seconds),
        close: true,
        tls: false,
    }
}

/// lb's drop counters and flood state, for the record.
fn stats(lb: &LbProcess) -> Value {
    lb.request("GET", "/v1/stats", None)
        .map(|(_, v)| v)
        .unwrap_or_default()
}

fn check(report: &WrkReport, what: &str, stats: &Value, syn_retransmits: u64) {
    println!(
        "{what}: {} requests in {:.1} s, {:.0}/s, errors: {}, SYNs retransmitted: \
         {syn_retransmits}; lb: {stats}",
        report.requests,
        report.duration.as_secs_f64(),
        report.rps(),
        report.errors
    );
    assert_eq!(
        report.errors.total(),
        0,
        "{what}: {}\n{}",
        report.errors,
        report.output
    );
    // A retransmitted SYN is a connection that stalled: a lost SYN (a second), or a SYN
    // a backend's TIME_WAIT refused (its ACK draws the client's reset, which clears the
    // TIME_WAIT, and the SYN goes again), a sign that lb lost track of a close.
    assert_eq!(syn_retransmits, 0, "{what}: SYNs retransmitted");
    assert!(
        report.rps() >= 1000.0,
        "{what}: only {:.0} connections a second",
        report.rps()
    );
}

/// `seconds` of churn from the client to the VIP through `lb`, checked (see [`check`]) as
/// `what`: wrk's report.
fn checked_churn(topo: &Topology, lb: &LbProcess, seconds: u64, what: &str) -> WrkReport {
    let wrk = Wrk::new(&["/a/"]).unwrap();
    let retransmitted = topo.client.syn_retransmits();
    let report = wrk
        .run(&topo.client, topo.vip(80).into(), &churn(seconds))
        .unwrap();
    let stats = stats(lb);
    check(
        &report,
        what,
        &stats,
        topo.client.syn_retransmits() - retransmitted,
    );
    report
}

#[test]
fn a_minute_of_one_connection_per_request_fails_none() {
    let topo = Topology::two_armed(3).unwrap();
    let store = temp_store();
    let (_nginx, lb) = setup(&topo, &store.url(), &[]);
    let report = checked_churn(&topo, &lb, 60, "60 s of connection churn");
    // More connections than there are SNAT ports towards the backends: ports were reused
    // (many of them out of the backends' TIME_WAIT).
    let (_, web) = lb.request("GET", "/v1/services/web", None).unwrap();
    let capacity: u64 = web["backend_counters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            b["snat_ports"]["capacity"]
                .as_u64()
                .unwrap_or_else(|| panic!("no snat_ports: {web}"))
        })
        .sum();
    println!("SNAT ports: {}", web["backend_counters"]);
    assert!(
        report.requests > capacity,
        "{} connections, {capacity} ports: the test did not reuse ports",
        report.requests
    );
}

#[test]
fn kill_9_and_restart_under_connection_churn_fails_none() {
    let topo = Topology::two_armed(3).unwrap();
    let store = temp_store();
    let (_nginx, lb) = setup(&topo, &store.url(), &[]);
    let wrk = Wrk::new(&["/a/"]).unwrap();
    let retransmitted = topo.client.syn_retransmits();
    let (report, stats) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            wrk.run(&topo.client, topo.vip(80).into(), &churn(30))
                .unwrap()
        });
        std::thread::sleep(Duration::from_secs(10));
        let pins = lb.kill();
        std::thread::sleep(Duration::from_secs(2));
        let second =
            LbProcess::start_on(&topo.lb, &topo.lb_ifaces, &["--store", &store.url()], pins)
                .unwrap();
        let report = load.join().unwrap();
        (report, stats(&second))
    });
    let retransmitted = topo.client.syn_retransmits() - retransmitted;
    check(
        &report,
        "30 s of connection churn, lb killed and restarted",
        &stats,
        retransmitted,
    );
}

/// Every connection through SYN cookies (as under a flood): the handshake is lb's, the backend
/// connection is opened on the client's ACK, and SNAT ports are reused all the same.
#[test]
fn connection_churn_through_syn_cookies_fails_none() {
    let topo = Topology::two_armed(3).unwrap();
    let store = temp_store();
    let (_nginx, lb) = setup(&topo, &store.url(), &["--syn-cookies", "always"]);
    checked_churn(
        &topo,
        &lb,
        30,
        "30 s of connection churn through SYN cookies",
    );
}
