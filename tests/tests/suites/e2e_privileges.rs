//! Least privilege, as the kernel reports it: once `lb run` has started, none of its
//! threads holds more than CAP_BPF, CAP_NET_ADMIN and CAP_NET_BIND_SERVICE (effective,
//! permitted or bounding) nor may gain any by exec (no_new_privs), the HTTP workers, which
//! parse what clients send, hold nothing at all, and lb still does everything a running
//! balancer does with what it kept: new services, health changes, forwarding at layer 4
//! and layer 7, a route on a port of its own below 1024.
use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use lb_tests::{
    eventually,
    lbproc::LbProcess,
    servers::{HttpConn, http_get_once},
    topology::Topology,
};
use serde_json::json;

const T: Duration = Duration::from_secs(3);
const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_ADMIN: u32 = 12;
const CAP_BPF: u32 = 39;

/// One thread's name and capability sets, from /proc/PID/task/TID/status.
#[derive(Debug)]
struct ThreadCaps {
    name: String,
    effective: u64,
    permitted: u64,
    inheritable: u64,
    bounding: u64,
    ambient: u64,
    no_new_privs: bool,
}

fn threads(pid: u32) -> Vec<ThreadCaps> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |name: &str| -> u64 {
            let line = status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {status}"));
            u64::from_str_radix(line.trim(), 16).unwrap()
        };
        out.push(ThreadCaps {
            name: status
                .lines()
                .find_map(|l| l.strip_prefix("Name:"))
                .unwrap()
                .trim()
                .to_string(),
            effective: field("CapEff:"),
            permitted: field("CapPrm:"),
            inheritable: field("CapInh:"),
            bounding: field("CapBnd:"),
            ambient: field("CapAmb:"),
            no_new_privs: field("NoNewPrivs:") == 1,
        });
    }
    out
}

#[test]
fn a_running_lb_keeps_only_bpf_net_admin_and_net_bind_service_and_its_http_workers_nothing() {
    let topo = Topology::two_armed(2).unwrap();
    let mut backends = topo.start_backends(2, 8080, false).unwrap();
    let listener = SocketAddr::from(([10, 202, 1, 1], 80));
    let lb = LbProcess::start(
        &topo.lb,
        &topo.lb_ifaces,
        &["--http", &listener.to_string(), "--http-workers", "2"],
    )
    .unwrap();

    let kept = (1u64 << CAP_BPF) | (1u64 << CAP_NET_ADMIN) | (1u64 << CAP_NET_BIND_SERVICE);
    // The HTTP workers start with the listener; the runtime's blocking threads come and go.
    let mut seen = Vec::new();
    assert!(
        eventually(Duration::from_secs(5), || {
            seen = threads(lb.pid());
            seen.iter().filter(|t| t.name.starts_with("lb-l7-")).count() == 2
        }),
        "{seen:#?}"
    );
    for t in &seen {
        let allowed = if t.name.starts_with("lb-l7-") {
            0
        } else {
            kept
        };
        assert_eq!(t.effective & !allowed, 0, "effective: {t:?}");
        assert_eq!(t.permitted & !allowed, 0, "permitted: {t:?}");
        // A worker is started by a thread that has already narrowed the bounding set (and
        // with it lost the right to narrow it more); no_new_privs covers the rest.
        assert_eq!(t.bounding & !kept, 0, "bounding: {t:?}");
        assert_eq!((t.inheritable, t.ambient), (0, 0), "{t:?}");
        assert!(t.no_new_privs, "{t:?}");
    }
    // The main thread and the controller's still have what the maps and links need.
    for name in ["lb", "lb-controller"] {
        let t = seen.iter().find(|t| t.name == name).expect(name);
        assert_eq!(t.effective, kept, "{t:?}");
    }

    // With that, everything still works. A layer-4 service added after the drop, checked:
    let vip = SocketAddr::from(topo.vip(80));
    let check = json!({"kind": "tcp", "interval_ms": 200, "timeout_ms": 150, "rise": 1, "fall": 1});
    lb.put_service(
        "web",
        &json!({
            "vip": vip.to_string(),
            "backends": [topo.backend(0, 8080).to_string(), topo.backend(1, 8080).to_string()],
            "check": check,
        }),
    )
    .unwrap();
    // Every one of `n` new connections answers; by whom.
    let answered = |n: usize| -> BTreeSet<String> {
        (0..n)
            .map(|i| {
                http_get_once(&topo.client, vip, T)
                    .unwrap_or_else(|e| panic!("connection {i}: {e:#}\n{}", lb.log_text()))
            })
            .collect()
    };
    assert_eq!(answered(20), BTreeSet::from(["be0".into(), "be1".into()]));
    // be1 stops: the controller's thread takes it out of the maps, and no new connection
    // goes to it.
    drop(backends.pop());
    let health = |lb: &LbProcess| {
        lb.request("GET", "/v1/services/web", None)
            .map(|(_, v)| v.to_string())
            .unwrap_or_default()
    };
    assert!(
        eventually(Duration::from_secs(5), || health(&lb).contains("\"down\"")),
        "{}",
        health(&lb)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(answered(20), BTreeSet::from(["be0".into()]));
    // And layer 7, through a worker that holds no capability.
    lb.put_service(
        "demo",
        &json!({"http": {"paths": ["/demo"]}, "backends": [topo.backend(0, 8080).to_string()]}),
    )
    .unwrap();
    // The route table is swapped in just after the PUT answers.
    let mut answer = (0, String::new());
    let served = eventually(Duration::from_secs(2), || {
        let mut c = HttpConn::connect(&topo.client, listener, T).unwrap();
        answer = c.send("GET", "/demo", "lb", b"").unwrap();
        answer == (200, "be0".into())
    });
    assert!(served, "{answer:?}\n{}", lb.log_text());
    // A route on a port of its own below 1024, opened long after the start.
    lb.put_service(
        "side",
        &json!({"http": {"paths": ["/side"], "port": 81}, "backends": [topo.backend(0, 8080).to_string()]}),
    )
    .unwrap();
    let mut c = HttpConn::connect(&topo.client, SocketAddr::from(([10, 202, 1, 1], 81)), T)
        .unwrap_or_else(|e| panic!("port 81: {e:#}\n{}", lb.log_text()));
    assert_eq!(
        c.send("GET", "/side", "lb", b"").unwrap(),
        (200, "be0".into())
    );
}

/// What a systemd unit must grant (the README's `CapabilityBoundingSet=`) is enough: lb
/// started with only that loads, attaches, and forwards at both layers.
#[test]
fn lb_runs_with_only_the_capabilities_the_readme_lists() {
    let topo = Topology::two_armed(1).unwrap();
    let _backends = topo.start_backends(1, 8080, false).unwrap();
    let listener = SocketAddr::from(([10, 202, 1, 1], 80));
    let lb = LbProcess::start_with_capabilities(
        &topo.lb,
        &topo.lb_ifaces,
        &["--http", &listener.to_string()],
        "+bpf,+net_admin,+perfmon,+net_bind_service",
    )
    .unwrap();
    let vip = SocketAddr::from(topo.vip(80));
    let be0 = topo.backend(0, 8080).to_string();
    lb.put_service("web", &json!({"vip": vip.to_string(), "backends": [be0]}))
        .unwrap();
    assert_eq!(http_get_once(&topo.client, vip, T).unwrap(), "be0");
    lb.put_service(
        "demo",
        &json!({"http": {"paths": ["/demo"]}, "backends": [be0]}),
    )
    .unwrap();
    // The route table is swapped in just after the PUT answers.
    let mut answer = (0, String::new());
    let served = eventually(Duration::from_secs(2), || {
        let mut c = HttpConn::connect(&topo.client, listener, T).unwrap();
        answer = c.send("GET", "/demo", "lb", b"").unwrap();
        answer == (200, "be0".into())
    });
    assert!(served, "{answer:?}\n{}", lb.log_text());
}
