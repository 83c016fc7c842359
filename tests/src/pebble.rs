//! A real ACME CA for the ACME tests: pebble (Let's Encrypt's test server, Debian package
//! `pebble`) inside a test namespace. Its own HTTPS uses a certificate of the test's CA;
//! it validates HTTP-01 challenges on `http_port` of the address the name resolves to,
//! asking the test's DNS server. Each run makes new roots (fetched with [`Pebble::roots`]).
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{netns::Netns, pki::Pki};

pub struct Pebble {
    child: Child,
    ip: Ipv4Addr,
    dir: PathBuf,
    ca: PathBuf,
}

const ACME_PORT: u16 = 14000;
const MANAGEMENT_PORT: u16 = 15000;

impl Pebble {
    /// Starts pebble in `ns` on `ip`, validating on port `http_port` and resolving names
    /// through `dns`. Its HTTPS certificate is signed by `pki`'s CA, for `ip`.
    pub fn start_in(
        ns: &Netns,
        ip: Ipv4Addr,
        http_port: u16,
        dns: SocketAddr,
        pki: &Pki,
    ) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(crate::unique("lbt-pebble"));
        std::fs::create_dir_all(&dir)?;
        let (cert, key) = pki.leaf(&[&ip.to_string()], -60, 86_400)?;
        std::fs::write(dir.join("cert.pem"), cert)?;
        std::fs::write(dir.join("key.pem"), key)?;
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("{ip}:{ACME_PORT}"),
            "managementListenAddress": format!("{ip}:{MANAGEMENT_PORT}"),
            "certificate": dir.join("cert.pem"),
            "privateKey": dir.join("key.pem"),
            "httpPort": http_port,
            "tlsPort": 5001,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(dir.join("config.json"), config.to_string())?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg("pebble")
            .arg("-config")
            .arg(dir.join("config.json"))
            .args(["-dnsserver", &dns.to_string()])
            // No random sleeps before validating, no nonces refused for fun, and every
            // order validated afresh (no authorization reuse).
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("log"))?)
            .stderr(std::fs::File::create(dir.join("stderr"))?)
            .spawn()
            .context("starting pebble (Debian package pebble)")?;
        let pebble = Self {
            child,
            ip,
            dir,
            ca: pki.ca(),
        };
        pebble.wait_up(ns)?;
        Ok(pebble)
    }

    /// The ACME directory URL (lb's `--acme-directory`).
    pub fn directory(&self) -> String {
        format!("https://{}:{ACME_PORT}/dir", self.ip)
    }

    /// The roots pebble issues under this run, as PEM, asked from `ns` (its own).
    pub fn roots(&self, ns: &Netns) -> anyhow::Result<String> {
        let url = format!("https://{}:{MANAGEMENT_PORT}/roots/0", self.ip);
        let ca = self.ca.display().to_string();
        let got = crate::curl::curl(ns, &["--cacert", &ca, &url]);
        anyhow::ensure!(got.status == 200, "pebble's roots: {got:?}");
        Ok(got.body)
    }

    /// What pebble logged (its validations among it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
            + &std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    fn wait_up(&self, ns: &Netns) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let ca = self.ca.display().to_string();
        let url = self.directory();
        while Instant::now() < deadline {
            if crate::curl::curl(ns, &["--cacert", &ca, &url]).status == 200 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("pebble did not answer at {url}: {}", self.log())
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
