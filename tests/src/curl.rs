//! curl as a user runs it, inside a test namespace: what a request got (status, HTTP
//! version, redirect, body) and what curl said when it failed.
use std::process::Command;

use crate::netns::Netns;

/// What curl saw.
#[derive(Debug)]
pub struct Curl {
    pub ok: bool,
    pub status: u16,
    pub version: String,
    pub location: String,
    pub body: String,
    pub stderr: String,
}

/// curl in `ns` with `args` (the URL among them; `--cacert` for HTTPS).
pub fn curl(ns: &Netns, args: &[&str]) -> Curl {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path()))
        .arg("curl")
        .args(["-sS", "--max-time", "5"])
        .args([
            "-o",
            "-",
            "-w",
            "\n%{http_code} %{http_version} %{redirect_url}",
        ])
        .args(args)
        .output()
        .expect("curl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let mut tail = tail.split(' ');
    Curl {
        ok: out.status.success(),
        status: tail.next().and_then(|s| s.parse().ok()).unwrap_or(0),
        version: tail.next().unwrap_or("").to_string(),
        location: tail.next().unwrap_or("").to_string(),
        body: body.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
