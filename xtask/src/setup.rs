//! `cargo xtask setup`: installs what is missing, then checks every piece it promises and
//! prints one line for each that does not work. Quick when everything is already there.
//!
//! A fresh machine of this project's kind has only what `shared/fresh-image-packages.txt`
//! lists, so every Debian package the build, the tests, the demo and the benchmarks use is
//! named here, with what it is for; none is assumed to come along as a Recommends.
use std::process::Command;

use anyhow::{Context, bail};

use crate::run;

/// Debian packages, each with what uses it.
const PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "bpf-linker is built against LLVM 22"),
    (
        "libpolly-22-dev",
        "LLVM 22's link dependencies for bpf-linker",
    ),
    ("clang-22", "LLVM 22's toolchain for bpf-linker"),
    ("bpftool", "the tests and README inspect the pinned maps"),
    ("iproute2", "ip: namespaces, veth, routes, neighbours"),
    ("util-linux", "nsenter: commands inside a test namespace"),
    ("ethtool", "GRO and checksum offload on veth ends"),
    ("protobuf-compiler", "protoc, for the etcd client's build"),
    (
        "libprotobuf-dev",
        "google/protobuf/*.proto, imported by the etcd client's .proto files",
    ),
    ("etcd-server", "the store tests run real etcd servers"),
    ("etcd-client", "etcdctl, to see that a test etcd is up"),
    ("haproxy", "the benchmarks' peer (HTTP mode and tcp mode)"),
    (
        "dnsmasq-base",
        "a real DNS server for the DNS discovery tests (the binary, no system service)",
    ),
    ("pebble", "the ACME tests' CA (Let's Encrypt's test server)"),
    (
        "python3-grpcio",
        "a real gRPC server and client for the gRPC tests (run by /usr/bin/python3)",
    ),
    ("nginx", "the benchmarks' backends"),
    ("curl", "the HTTPS and DFP tests request as a user would"),
    ("wrk", "the benchmarks' load"),
    (
        "nftables",
        "the L4 benchmark's peer: nftables DNAT with masquerade",
    ),
];
const BPF_LINKER_VERSION: &str = "0.13";

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn is_root() -> bool {
    output("id", &["-u"]).is_some_and(|u| u.trim() == "0")
}

pub fn setup() -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "lb's set-up, tests and demo load XDP programs and create network namespaces: run as root (sudo)"
        );
    }
    install_packages()?;
    install_rust_pieces()?;
    // The maps are pinned under /sys/fs/bpf; systemd mounts it, containers often do not.
    if !bpffs_mounted() {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    let missing = check();
    if !missing.is_empty() {
        for line in &missing {
            eprintln!("setup: missing: {line}");
        }
        bail!(
            "{} piece(s) of the set-up do not work (see above)",
            missing.len()
        );
    }
    Ok(())
}

fn install_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))?;
    // The benchmarks start their own HAProxy and nginx; the system services that installing
    // them may have started (nginx takes port 80) are not wanted.
    for service in ["nginx", "haproxy"] {
        if missing.contains(&service) && output("systemctl", &["is-active", service]).is_some() {
            eprintln!("setup: stopping and disabling the {service} service the package started");
            let _ = Command::new("systemctl")
                .args(["disable", "--now", service])
                .status();
        }
    }
    Ok(())
}

fn install_rust_pieces() -> anyhow::Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"]).context("rustup is needed")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    for (toolchain, component) in missing_components() {
        run(Command::new("rustup").args([
            "component",
            "add",
            component,
            "--toolchain",
            toolchain,
        ]))?;
    }
    if !has_bpf_linker() {
        eprintln!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
        );
        run(Command::new("cargo")
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args([
                "install",
                "bpf-linker",
                "--version",
                &format!("~{BPF_LINKER_VERSION}"),
            ])
            .args(["--no-default-features", "--features", "llvm-22", "--locked"]))?;
    }
    Ok(())
}

/// The toolchain components the build and `cargo xtask test`'s lint step use: core's source
/// for the eBPF build, and rustfmt and clippy on both toolchains.
const COMPONENTS: [(&str, &str); 5] = [
    ("nightly", "rust-src"),
    ("nightly", "rustfmt"),
    ("nightly", "clippy"),
    ("stable", "rustfmt"),
    ("stable", "clippy"),
];

/// The [`COMPONENTS`] not installed (one `rustup component list` a toolchain).
fn missing_components() -> Vec<(&'static str, &'static str)> {
    let installed = |toolchain: &str| {
        output(
            "rustup",
            &["component", "list", "--installed", "--toolchain", toolchain],
        )
        .unwrap_or_default()
    };
    let mut lists = std::collections::HashMap::new();
    COMPONENTS
        .into_iter()
        .filter(|&(toolchain, component)| {
            let list = lists
                .entry(toolchain)
                .or_insert_with(|| installed(toolchain));
            !list.lines().any(|l| l.starts_with(component))
        })
        .collect()
}

fn has_bpf_linker() -> bool {
    output("bpf-linker", &["--version"])
        .unwrap_or_default()
        .contains(&format!("bpf-linker {BPF_LINKER_VERSION}"))
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
}

/// Whether `cmd args` runs and exits 0.
fn runs(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// protoc compiles a file that imports one of the well-known types, as etcd-client's build
/// does (the well-known files come from libprotobuf-dev, not from protobuf-compiler).
fn protoc_finds_well_known_types() -> bool {
    let dir = std::env::temp_dir().join(format!("lb-setup-protoc-{}", std::process::id()));
    let ok = (|| -> std::io::Result<bool> {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("check.proto"),
            "syntax = \"proto3\";\nimport \"google/protobuf/descriptor.proto\";\n\
             message M { google.protobuf.FileDescriptorProto f = 1; }\n",
        )?;
        let out = Command::new("protoc")
            .current_dir(&dir)
            .args([
                "--proto_path=.",
                "--descriptor_set_out=check.pb",
                "check.proto",
            ])
            .output()?;
        Ok(out.status.success())
    })()
    .unwrap_or(false);
    let _ = std::fs::remove_dir_all(&dir);
    ok
}

/// Every piece the set-up promises, tried; one line for each that does not work.
fn check() -> Vec<String> {
    let mut missing = Vec::new();
    let mut expect = |ok: bool, what: &str| {
        if !ok {
            missing.push(what.to_string());
        }
    };
    for (pkg, why) in PACKAGES {
        expect(installed(pkg), &format!("Debian package {pkg} ({why})"));
    }
    expect(
        runs("/usr/lib/llvm-22/bin/llvm-config", &["--version"]),
        "LLVM 22 (/usr/lib/llvm-22/bin/llvm-config)",
    );
    expect(
        protoc_finds_well_known_types(),
        "protoc compiling a file that imports google/protobuf/descriptor.proto (libprotobuf-dev)",
    );
    for (cmd, args, what) in [
        ("bpftool", &["version"][..], "bpftool"),
        ("ip", &["-V"][..], "ip (iproute2)"),
        ("nsenter", &["--version"][..], "nsenter (util-linux)"),
        ("ethtool", &["--version"][..], "ethtool"),
        ("etcd", &["--version"][..], "etcd"),
        ("etcdctl", &["version"][..], "etcdctl"),
        ("haproxy", &["-v"][..], "haproxy"),
        ("dnsmasq", &["--version"][..], "dnsmasq (dnsmasq-base)"),
        // pebble has no version flag.
        ("sh", &["-c", "command -v pebble"][..], "pebble"),
        (
            "/usr/bin/python3",
            &["-c", "import grpc"][..],
            "Python's grpcio (python3-grpcio)",
        ),
        ("nginx", &["-v"][..], "nginx"),
        ("curl", &["--version"][..], "curl"),
        ("nft", &["--version"][..], "nft (nftables)"),
        (
            "cc",
            &["--version"][..],
            "a C compiler (cc) for crates that build C",
        ),
    ] {
        expect(runs(cmd, args), &format!("{what}: `{cmd}` does not run"));
    }
    // wrk has no version flag; `wrk` alone prints its usage and exits 1.
    expect(
        Command::new("wrk")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("Usage: wrk")),
        "wrk: `wrk` does not run",
    );
    for (toolchain, component) in missing_components() {
        expect(false, &format!("{component} for the {toolchain} toolchain"));
    }
    expect(
        has_bpf_linker(),
        &format!("bpf-linker {BPF_LINKER_VERSION} (cargo install bpf-linker)"),
    );
    expect(bpffs_mounted(), "bpffs mounted on /sys/fs/bpf");
    missing
}
