//! The daemon's API and command line as a user meets them: bad input is a 400 naming the
//! field and changes nothing; start-up errors are one line and a non-zero exit; SIGTERM
//! leaves the data plane forwarding and `lb down` removes it.
use std::{process::Command, time::Duration};

use lb_tests::{
    lbproc::{LbProcess, lb_bin, output_within},
    netns::Netns,
    servers::http_get_once,
    topology::Topology,
    unique,
};
use serde_json::{Value, json};

#[test]
fn bad_input_is_a_400_naming_the_field_and_changes_nothing() {
    let topo = Topology::two_armed(2).unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    let good = json!({"vip": "10.202.9.100:80", "protocol": "tcp", "backends": ["10.202.2.11:8080", "10.202.2.12:8080"]});
    let stored = lb.put_service("web", &good).unwrap();
    assert_eq!(stored["name"], "web");
    assert_eq!(stored["vip"], "10.202.9.100:80");
    assert_eq!(
        stored["backends"],
        json!(["10.202.2.11:8080", "10.202.2.12:8080"])
    );
    let before = lb.request("GET", "/v1/services", None).unwrap().1;

    let long_name = "n".repeat(64);
    let cases: Vec<(&str, String, &str)> = vec![
        ("web", "{not json".into(), "body"),
        (
            "web",
            json!({"vip": "10.202.9.300:80", "backends": ["10.202.2.11:1"]}).to_string(),
            "vip",
        ),
        (
            "web",
            json!({"vip": "10.202.9.100", "backends": ["10.202.2.11:1"]}).to_string(),
            "vip",
        ),
        (
            "web",
            json!({"vip": "10.202.9.100:80", "protocol": "sctp", "backends": ["10.202.2.11:1"]})
                .to_string(),
            "protocol",
        ),
        (
            "web",
            json!({"vip": "10.202.9.100:80", "backends": []}).to_string(),
            "backends",
        ),
        (
            "web",
            json!({"vip": "10.202.9.100:80", "backends": "10.202.2.11:1"}).to_string(),
            "backends",
        ),
        (
            "web",
            json!({"vip": "10.202.9.100:80", "backends": ["10.202.2.11:1", "10.202.2.11:1"]})
                .to_string(),
            "backends[1]",
        ),
        (
            "web",
            json!({"vip": "10.202.9.100:80", "backends": ["10.202.2.11:1", "10.202.2.x:1"]})
                .to_string(),
            "backends[1]",
        ),
        (
            "web",
            json!({"vip": "10.202.9.100:80", "backends": ["10.202.2.11:1"], "weight": 3})
                .to_string(),
            "weight",
        ),
        (
            "web",
            json!({"vip": "10.202.9.100:80", "backends": ["10.202.2.11:1"], "table_size": 1000})
                .to_string(),
            "table_size",
        ),
        // Another service may not take a VIP, port and protocol that is served already.
        (
            "other",
            json!({"vip": "10.202.9.100:80", "backends": ["10.202.2.11:1"]}).to_string(),
            "vip",
        ),
        (long_name.as_str(), good.to_string(), "name"),
    ];
    for (name, body, field) in cases {
        let (status, answer) = lb
            .request("PUT", &format!("/v1/services/{name}"), Some(&body))
            .unwrap();
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(answer["field"], field, "{body} -> {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
        assert_eq!(
            lb.request("GET", "/v1/services", None).unwrap().1,
            before,
            "{body} changed the services"
        );
    }
    // The same VIP and port with the other protocol is a different service.
    let udp =
        json!({"vip": "10.202.9.100:80", "protocol": "udp", "backends": ["10.202.2.11:8080"]});
    lb.put_service("web-udp", &udp).unwrap();

    let (status, answer) = lb.request("GET", "/v1/services/nope", None).unwrap();
    assert_eq!(
        (status, answer["field"].clone()),
        (404, Value::from("name"))
    );
    let (status, _) = lb.request("DELETE", "/v1/services/nope", None).unwrap();
    assert_eq!(status, 404);
    let (status, list) = lb.request("GET", "/v1/services", None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 2);
}

#[test]
fn start_up_errors_are_one_line_and_a_non_zero_exit() {
    let ns = Netns::new(&unique("lbt-x")).unwrap();
    let run = |args: &[&str]| {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.path()))
            .arg(lb_bin())
            .arg("run")
            .args(args)
            .env("RUST_LOG", "off");
        let out = output_within(&mut cmd, Duration::from_secs(20)).unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--iface", "nosuch0", "--bpffs", "/sys/fs/bpf/lbt-never"]);
    assert_ne!(code, Some(0));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("nosuch0"), "{err}");
    let (code, err) = run(&[
        "--iface",
        "lo",
        "--snat-ports",
        "40000-41000",
        "--bpffs",
        "/sys/fs/bpf/lbt-never",
    ]);
    assert_ne!(code, Some(0));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("ip_local_port_range"), "{err}");
    assert!(!std::path::Path::new("/sys/fs/bpf/lbt-never").exists());
}

#[test]
fn sigterm_leaves_forwarding_running_and_lb_down_removes_it() {
    let topo = Topology::two_armed(1).unwrap();
    let _backend = topo.start_backend(0, 8080, false).unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    let service = json!({"vip": "10.202.9.100:80", "backends": ["10.202.2.11:8080"]});
    lb.put_service("web", &service).unwrap();
    let vip = topo.vip(80).into();
    let ask = || http_get_once(&topo.client, vip, std::time::Duration::from_secs(2));
    assert_eq!(ask().unwrap(), "be0", "forwarded while lb runs");
    // The backend's next hop is kept resolved while lb serves it.
    let managed = || {
        topo.lb
            .ip("neigh show 10.202.2.11")
            .unwrap()
            .contains("managed")
    };
    assert!(managed());
    let pins = lb.bpffs.clone();
    assert!(pins.join("services").exists());
    assert!(topo.lb.ip("link show eth0").unwrap().contains("xdp"));
    // bpftool shows the maps with their fields.
    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(pins.join("config"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&dump.stdout).contains("snat_port_min"));
    let (status, kept) = lb.stop_keeping_pins().unwrap();
    assert!(status.success(), "{status}");
    // Stopped, the data plane carries on: program attached, maps pinned, next hop kept,
    // and new connections forwarded.
    assert!(pins.join("services").exists());
    assert!(topo.lb.ip("link show eth0").unwrap().contains("xdp"));
    assert!(managed());
    for i in 0..20 {
        assert_eq!(ask().unwrap(), "be0", "connection {i} after lb stopped");
    }

    let out = output_within(
        Command::new("nsenter")
            .arg(format!("--net={}", topo.lb.path()))
            .arg(lb_bin())
            .args(["down", "--bpffs"])
            .arg(&pins),
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!pins.exists(), "pins left behind");
    assert!(!topo.lb.ip("link show eth0").unwrap().contains("xdp"));
    assert!(!topo.lb.ip("link show eth1").unwrap().contains("xdp"));
    assert!(!managed(), "next-hop entry left behind");
    // Nothing forwards to the VIP any more (it is configured nowhere).
    assert!(ask().is_err(), "still forwarded after lb down");
    drop(kept);
}

#[test]
fn a_second_lb_on_the_same_pins_is_refused_and_harms_nothing() {
    let topo = Topology::two_armed(1).unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    let other = Netns::new(&unique("lbt-x")).unwrap();
    let out = output_within(
        Command::new("nsenter")
            .arg(format!("--net={}", other.path()))
            .arg(lb_bin())
            .args(["run", "--iface", "lo", "--api", "127.0.0.1:9091", "--bpffs"])
            .arg(&lb.bpffs)
            .env("RUST_LOG", "off"),
        Duration::from_secs(20),
    )
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("in use"), "{err}");
    // The first one still has its pins and still answers.
    assert!(lb.bpffs.join("services").exists());
    assert_eq!(lb.request("GET", "/health", None).unwrap().0, 200);
}

#[test]
fn hand_made_neighbour_entries_are_left_alone() {
    let topo = Topology::two_armed(2).unwrap();
    topo.lb
        .ip("neigh replace 10.202.2.12 lladdr 02:00:00:00:00:0c dev eth1 nud permanent")
        .unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    let spec =
        json!({"vip": "10.202.9.100:80", "backends": ["10.202.2.11:8080", "10.202.2.12:8080"]});
    lb.put_service("web", &spec).unwrap();
    assert!(
        topo.lb
            .ip("neigh show 10.202.2.11")
            .unwrap()
            .contains("managed")
    );
    let fixed = topo.lb.ip("neigh show 10.202.2.12").unwrap();
    assert!(
        fixed.contains("PERMANENT") && !fixed.contains("managed"),
        "{fixed}"
    );
    assert!(lb.stop().unwrap().success());
    assert!(
        topo.lb
            .ip("neigh show 10.202.2.12")
            .unwrap()
            .contains("PERMANENT"),
        "lb removed a hand-made entry"
    );
}
