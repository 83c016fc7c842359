//! Restarts without a lost connection: the XDP link and the maps are pinned, so `kill -9`
//! leaves forwarding untouched and the next lb adopts what is there; pins of another layout
//! are replaced through the link; with no pins (a reboot) every service comes back from the
//! store; and while the store is unreachable the pinned state keeps serving.
use std::time::Duration;

use lb_tests::{
    etcd::EtcdCluster,
    lbproc::{LbProcess, Pins, temp_store},
    servers::{Backend, ClientLoad, http_get_once, udp_ask},
    topology::Topology,
};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(3);

fn services(lb: &LbProcess) -> Value {
    lb.request("GET", "/v1/services", None).unwrap().1
}

fn backends(topo: &Topology, n: usize) -> Vec<Backend> {
    topo.start_backends(n, 8080, true).unwrap()
}

/// An lb started on `store` (a `--store` URL) and given service "web" on port 80 over
/// backends 0 to `n - 1`; with those backends' addresses.
fn lb_serving_web(topo: &Topology, store: &str, n: usize) -> (LbProcess, Vec<String>) {
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &["--store", store]).unwrap();
    let all: Vec<String> = (0..n).map(|i| topo.backend(i, 8080).to_string()).collect();
    lb.put_service(
        "web",
        &json!({"vip": topo.vip(80).to_string(), "backends": all}),
    )
    .unwrap();
    (lb, all)
}

/// What a killed lb leaves: one serving "web" over backends 0 and 1, killed with `kill -9`.
fn pins_of_a_killed_lb(topo: &Topology, store: &str) -> Pins {
    lb_serving_web(topo, store, 2).0.kill()
}

/// The `services` map as bpftool shows it: every VIP with its id and table run, sorted.
fn services_map(lb: &LbProcess) -> Vec<Value> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(lb.bpffs.join("services"))
        .output()
        .unwrap();
    let mut entries: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    entries.sort_by_key(std::string::ToString::to_string);
    entries
}

fn xdp_on(topo: &Topology, iface: &str) -> bool {
    topo.lb
        .ip(&format!("link show {iface}"))
        .unwrap()
        .contains("xdp")
}

#[test]
fn kill_9_and_restarts_lose_no_connection() {
    let topo = Topology::two_armed(3).unwrap();
    let _backends = backends(&topo, 3);
    let store = temp_store();
    let arg = store.url();
    let extra = ["--store", arg.as_str()];
    let (first, all) = lb_serving_web(&topo, &arg, 3);
    first
        .put_service(
            "dns",
            &json!({"vip": topo.vip(53).to_string(), "protocol": "udp", "backends": all}),
        )
        .unwrap();
    let before = services(&first);
    let map_before = services_map(&first);
    assert_eq!(map_before.len(), 2);

    let retransmitted = topo.client.syn_retransmits();
    let load = ClientLoad::start(&topo.client, topo.vip(80).into()).unwrap();
    assert!(
        load.wait_answered(20, Duration::from_secs(5)),
        "no load flowing"
    );
    // kill -9: no daemon at all for a while, and the kernel keeps forwarding.
    let pins = first.kill();
    assert!(xdp_on(&topo, "eth0") && xdp_on(&topo, "eth1"));
    std::thread::sleep(Duration::from_millis(700));
    assert!(udp_ask(&topo.client, topo.vip(53).into(), T).is_ok());
    // The next lb adopts the maps and swaps its program in through the pinned links.
    let second = LbProcess::start_on(&topo.lb, &topo.lb_ifaces, &extra, pins).unwrap();
    assert!(
        second
            .log_text()
            .contains("adopted the pinned maps services=2"),
        "{}",
        second.log_text()
    );
    // Restored services took over their entries as they were: same ids, same tables, so
    // tracked flows keep their backends.
    assert_eq!(services_map(&second), map_before);
    std::thread::sleep(Duration::from_millis(1000));
    // A clean stop and start (an upgrade) leaves it running in between too.
    let (status, pins) = second.stop_keeping_pins().unwrap();
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(300));
    let third = LbProcess::start_on(&topo.lb, &topo.lb_ifaces, &extra, pins).unwrap();
    assert_eq!(services_map(&third), map_before);
    std::thread::sleep(Duration::from_millis(1000));
    let report = load.stop();
    // A SYN lost in a swap is retried after a second and still answered: count those too.
    assert_eq!(
        topo.client.syn_retransmits() - retransmitted,
        0,
        "SYNs retransmitted across the restarts: {report:?}"
    );
    assert!(
        report.failures.is_empty(),
        "{} failed of {}: {:?}",
        report.failures.len(),
        report.answered + report.failures.len(),
        &report.failures[..report.failures.len().min(5)]
    );
    assert!(report.answered > 50, "{report:?}");
    assert!(report.kept_answered > 50, "{report:?}");
    assert_eq!(
        report.kept_backends.len(),
        1,
        "the established connection stayed on its backend: {report:?}"
    );
    assert_eq!(services(&third), before, "the services are unchanged");

    // A reboot: no pins. `lb down` detaches; a new lb rebuilds everything from the store.
    let (_, pins) = third.stop_keeping_pins().unwrap();
    let (status, gone) = pins.down().unwrap();
    assert!(status.success(), "lb down: {status}");
    assert!(gone, "lb down left its pins");
    assert!(!xdp_on(&topo, "eth0") && !xdp_on(&topo, "eth1"));
    let fourth = LbProcess::start(&topo.lb, &topo.lb_ifaces, &extra).unwrap();
    assert!(!fourth.log_text().contains("adopted"));
    assert_eq!(services(&fourth), before, "every service is back");
    assert!(http_get_once(&topo.client, topo.vip(80).into(), T).is_ok());
    assert!(udp_ask(&topo.client, topo.vip(53).into(), T).is_ok());
    drop(fourth);
}

#[test]
fn pins_of_another_layout_are_replaced_through_the_link() {
    let topo = Topology::two_armed(2).unwrap();
    let _backends = backends(&topo, 2);
    let store = temp_store();
    let arg = store.url();
    let pins = pins_of_a_killed_lb(&topo, &arg);
    // Maps of another size cannot be adopted: fresh ones, the program replaced through the
    // pinned link, every service restored from the store.
    let second = LbProcess::start_on(
        &topo.lb,
        &topo.lb_ifaces,
        &["--store", &arg, "--conntrack-entries", "65536"],
        pins,
    )
    .unwrap();
    let log = second.log_text();
    assert!(log.contains("not adopting the maps"), "{log}");
    assert!(log.contains("conntrack"), "the log names the map: {log}");
    assert!(
        log.contains("replaced the program on the pinned XDP link"),
        "{log}"
    );
    assert_eq!(services(&second).as_array().map(Vec::len), Some(1), "{log}");
    assert!(http_get_once(&topo.client, topo.vip(80).into(), T).is_ok());
    drop(second);
}

#[test]
fn pinned_state_keeps_serving_while_the_store_is_unreachable() {
    let topo = Topology::two_armed(2).unwrap();
    let _backends = backends(&topo, 2);
    let etcd = EtcdCluster::start_in(&topo.lb, "127.0.0.1").unwrap();
    let url = format!("etcd://{}", etcd.endpoints().join(","));
    let pins = pins_of_a_killed_lb(&topo, &url);
    drop(etcd);
    let second = LbProcess::spawn_on(&topo.lb, &topo.lb_ifaces, &["--store", &url], pins).unwrap();
    let retransmitted = topo.client.syn_retransmits();
    let load = ClientLoad::start(&topo.client, topo.vip(80).into()).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let report = load.stop();
    let ready = second.request("GET", "/ready", None).map(|r| r.0).ok();
    let log = second.log_text();
    assert!(report.failures.is_empty(), "{:?}\n{log}", report.failures);
    assert_eq!(
        topo.client.syn_retransmits() - retransmitted,
        0,
        "SYNs retransmitted: {report:?}"
    );
    assert!(report.answered > 20, "{report:?}");
    assert_eq!(ready, Some(503), "not ready while the store is away: {log}");
    assert!(log.contains("adopted the pinned maps services=1"), "{log}");
    let endpoint = url.trim_start_matches("etcd://");
    assert!(
        log.lines()
            .any(|l| l.contains("the store") && l.contains(endpoint)),
        "the failing address is named: {log}"
    );
}

#[test]
fn a_restart_that_fails_leaves_the_pinned_data_plane_serving() {
    let topo = Topology::two_armed(2).unwrap();
    let _backends = backends(&topo, 2);
    let store = temp_store();
    let arg = store.url();
    let pins = pins_of_a_killed_lb(&topo, &arg);
    // The next lb cannot start: its HTTP listener wants the API's port.
    let mut failed = LbProcess::spawn_on(
        &topo.lb,
        &topo.lb_ifaces,
        &["--store", &arg, "--http", "127.0.0.1:9090"],
        pins,
    )
    .unwrap();
    assert!(failed.wait_ready(Duration::from_secs(5)).is_err());
    let log = failed.log_text();
    assert!(log.contains("binding the HTTP listener"), "{log}");
    let pins = failed.kill();
    // What the first one left still forwards, and the next good start adopts it.
    assert!(xdp_on(&topo, "eth0") && pins.path().join("services").exists());
    assert!(http_get_once(&topo.client, topo.vip(80).into(), T).is_ok());
    let good = LbProcess::start_on(&topo.lb, &topo.lb_ifaces, &["--store", &arg], pins).unwrap();
    assert!(
        good.log_text()
            .contains("adopted the pinned maps services=1")
    );
}
