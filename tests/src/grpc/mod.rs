//! A real gRPC server and client for the tests: Python's grpcio (Debian's
//! python3-grpcio, run by /usr/bin/python3), inside test namespaces. The server echoes
//! with trailing metadata, fails with a status, and streams; the client reports all three.
use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use anyhow::{Context, bail};

use crate::netns::Netns;

const SERVER: &str = include_str!("server.py");
const CLIENT: &str = include_str!("client.py");
const PYTHON: &str = "/usr/bin/python3";

/// The scripts, written to a directory of their own.
fn scripts() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(crate::unique("lbt-grpc"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("server.py"), SERVER)?;
    std::fs::write(dir.join("client.py"), CLIENT)?;
    Ok(dir)
}

/// The gRPC test server, serving h2c on `addr` in `ns` until dropped.
pub struct GrpcServer {
    child: Child,
    dir: PathBuf,
}

impl GrpcServer {
    pub fn start(ns: &Netns, addr: SocketAddr, name: &str) -> anyhow::Result<Self> {
        let dir = scripts()?;
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg(PYTHON)
            .arg(dir.join("server.py"))
            .args([&addr.to_string(), name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("stderr"))?)
            .spawn()
            .context("starting the gRPC test server (python3-grpcio)")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("the server's stdout")?;
        BufReader::new(stdout).read_line(&mut line)?;
        let server = Self { child, dir };
        if line.trim() != "ready" {
            let why = std::fs::read_to_string(server.dir.join("stderr")).unwrap_or_default();
            bail!("the gRPC test server did not start: {why}");
        }
        Ok(server)
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the client in `ns` against `target` (`host:port`), in the clear or, with
/// `tls = (ca_file, name)`, over TLS: what it got, as JSON.
pub fn call(
    ns: &Netns,
    target: &str,
    tls: Option<(&std::path::Path, &str)>,
) -> anyhow::Result<serde_json::Value> {
    let dir = scripts()?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path()))
        .arg(PYTHON)
        .arg(dir.join("client.py"))
        .arg(target);
    if let Some((ca, name)) = tls {
        cmd.arg(ca).arg(name);
    }
    let out = crate::lbproc::output_within(&mut cmd, std::time::Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    if !out.status.success() {
        bail!(
            "the gRPC client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}
