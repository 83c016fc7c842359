//! `cargo xtask setup`: installs what is missing, checks what is there, quickly when
//! everything already is.
use std::process::Command;

use anyhow::{Context, bail};

use crate::run;

/// Debian packages: LLVM 22 for bpf-linker, bpftool to inspect maps, iproute2 and ethtool
/// for the namespace topologies, protoc for the etcd client's build, etcd itself (server
/// and etcdctl) for the store tests, and for the HTTP benchmark (lb-bench-l7) the peers it
/// runs: HAProxy 2.6 to compare with, nginx as the backends, wrk as the load.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "clang-22",
    "bpftool",
    "iproute2",
    "ethtool",
    "protobuf-compiler",
    "etcd-server",
    "etcd-client",
    "haproxy",
    "nginx",
    "wrk",
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
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        eprintln!("setup: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing))?;
        // The benchmark starts its own HAProxy and nginx; the system services that
        // installing them may have started (nginx takes port 80) are not wanted.
        for service in ["nginx", "haproxy"] {
            if missing.contains(&service) && output("systemctl", &["is-active", service]).is_some()
            {
                eprintln!(
                    "setup: stopping and disabling the {service} service the package started"
                );
                let _ = Command::new("systemctl")
                    .args(["disable", "--now", service])
                    .status();
            }
        }
    }
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
    let components = output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", "nightly"],
    )
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let linker = output("bpf-linker", &["--version"]).unwrap_or_default();
    if !linker.contains(&format!("bpf-linker {BPF_LINKER_VERSION}")) {
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
    // The maps are pinned under /sys/fs/bpf; systemd mounts it, containers often do not.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}
