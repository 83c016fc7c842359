//! lb's developer commands. Each does its own set-up first, so a fresh Debian or Ubuntu
//! host (as root) needs nothing but `cargo xtask demo` or `cargo xtask test`.
mod leftovers;
mod setup;
mod suites;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "lb developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install or check what building and testing lb needs (Debian packages, rust-src for
    /// nightly, bpf-linker against LLVM 22, a bpffs mount).
    Setup,
    /// Build the eBPF object (lb-ebpf) with nightly and bpf-linker.
    BuildEbpf,
    /// Check formatting and clippy (warnings denied), then build everything and run every
    /// test: unit, BPF_PROG_TEST_RUN packet tables and end-to-end suites in network
    /// namespaces (needs root).
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Build, then run lb in a small namespace topology and show how it balances.
    Demo,
    /// Print per-packet costs of the XDP program measured with BPF_PROG_TEST_RUN, cold
    /// start and update latency with 10,000 services, lb's HTTP path against HAProxy, and
    /// lb's L4 forwarding end to end against nftables and HAProxy in TCP mode.
    Bench,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` and returns what it printed on standard output.
fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Cargo on nightly in the eBPF crate, as its build needs it.
fn ebpf_cargo(args: &[&str]) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(root().join("lb-ebpf"))
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        .arg("+nightly")
        .args(args);
    c
}

const EBPF_TARGET: [&str; 5] = [
    "-Z",
    "build-std=core",
    "--target",
    "bpfel-unknown-none",
    "--release",
];

fn build_ebpf() -> anyhow::Result<()> {
    run(ebpf_cargo(&["build"]).args(EBPF_TARGET))
}

/// Formatting and clippy (the workspace's lints, warnings denied) on both crates' sides,
/// before the tests are built: the first finding ends the run.
fn lint() -> anyhow::Result<()> {
    run(&mut cargo(&["fmt", "--all", "--check"]))?;
    run(&mut ebpf_cargo(&["fmt", "--check"]))?;
    run(&mut cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(ebpf_cargo(&["clippy"])
        .args(EBPF_TARGET)
        .args(["--", "-D", "warnings"]))
}

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(root()).args(args);
    c
}

fn build_release() -> anyhow::Result<()> {
    run(&mut cargo(&[
        "build",
        "--release",
        "-p",
        "lb-userspace",
        "-p",
        "lb-tests",
        "--bins",
    ]))
}

/// `lb-tests`' suites, one after another (one test at a time: they share the host's
/// namespaces and bpffs), each under [`suites::SUITE_LIMIT`]; the first failure ends the
/// run.
fn privileged_suites(filter: Option<&str>) -> anyhow::Result<()> {
    // Every suite built first, on all cores at once, so a build error shows before any test.
    run(&mut cargo(&[
        "test",
        "--release",
        "-p",
        "lb-tests",
        "--no-run",
    ]))?;
    let listed = output(
        cargo(&["test", "--release", "-p", "lb-tests", "--test"]).args([
            suites::BINARY,
            "--",
            "--list",
            "--format",
            "terse",
        ]),
    )?;
    // Every suite runs even after one fails, so that a red run shows all that is wrong.
    let mut failed = Vec::new();
    for suite in suites::names(&listed) {
        let mut c = cargo(&["test", "--release", "-p", "lb-tests"]);
        match &suite {
            None => {
                c.args(["--lib", "--bins", "--", "--test-threads=1"]);
                c.args(filter);
            }
            Some(name) => {
                let Some(tests) = suites::selection(name, filter, &listed) else {
                    continue;
                };
                c.args(["--test", suites::BINARY, "--", "--test-threads=1"]);
                c.args(tests);
            }
        }
        c.env("LB_BIN", root().join("target/release/lb"));
        if let Err(e) = suites::run_limited(&mut c, suites::SUITE_LIMIT) {
            eprintln!(
                "xtask: suite {} failed: {e:#}",
                suite.as_deref().unwrap_or("test kit")
            );
            failed.push(suite.unwrap_or_else(|| "test kit".into()));
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("failed suites: {}", failed.join(", "));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::setup(),
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Test { filter } => {
            setup::setup()?;
            // After the eBPF build: lb-userspace's build script embeds its object.
            build_ebpf()?;
            lint()?;
            build_release()?;
            let mut unit = cargo(&[
                "test",
                "--release",
                "-p",
                "lb-common",
                "-p",
                "lb-userspace",
                "-p",
                "xtask",
            ]);
            if let Some(f) = &filter {
                unit.args(["--", f]);
            }
            // Whatever an earlier, interrupted run left is not this run's doing.
            leftovers::remove(&leftovers::find());
            run(&mut unit)?;
            let tests = privileged_suites(filter.as_deref());
            let left = leftovers::check();
            tests.and(left)
        }
        Cmd::Demo => {
            setup::setup()?;
            build_ebpf()?;
            build_release()?;
            run(Command::new(root().join("target/release/lb-demo"))
                .env("LB_BIN", root().join("target/release/lb")))
        }
        Cmd::Bench => {
            setup::setup()?;
            build_ebpf()?;
            build_release()?;
            run(&mut Command::new(root().join("target/release/lb-bench")))?;
            run(&mut Command::new(
                root().join("target/release/lb-bench-store"),
            ))?;
            run(Command::new(root().join("target/release/lb-bench-l7"))
                .env("LB_BIN", root().join("target/release/lb")))?;
            run(Command::new(root().join("target/release/lb-bench-l4"))
                .env("LB_BIN", root().join("target/release/lb")))
        }
    }
}
