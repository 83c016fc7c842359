//! An `lb run` process under test, inside a namespace, with its API client.
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::netns::{Netns, in_netns};

/// The `lb` binary: `$LB_BIN` (set by `cargo xtask test`), else the release build.
pub fn lb_bin() -> PathBuf {
    std::env::var_os("LB_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/lb"),
        PathBuf::from,
    )
}

/// Runs `cmd` to its end, as `Command::output` does, but for at most `limit`: a command
/// that should exit at once (an `lb run` that must refuse to start) and does not is killed
/// and reported, rather than hanging the suite.
pub fn output_within(cmd: &mut Command, limit: Duration) -> anyhow::Result<std::process::Output> {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    // Read both pipes while waiting, so that a chatty command cannot block on a full one.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

pub struct LbProcess {
    child: Option<Child>,
    ns_path: String,
    /// `http://ADDR` of the API, or `unix:PATH`.
    pub api: String,
    /// The API token `request` sends, if any.
    pub token: Option<String>,
    pub bpffs: PathBuf,
    /// Whether drop removes the pins (`lb down`): not after `kill` or `stop_keeping_pins`,
    /// which hand them on.
    own_pins: bool,
    log: PathBuf,
    /// A store directory this process was given by `start`, removed on drop.
    _own_store: Option<TempStore>,
}

/// A pin directory an lb left attached and forwarding, for the next one to adopt;
/// `lb down` in the lb's namespace (and a directory removal, should that fail) on drop.
pub struct Pins {
    dir: PathBuf,
    ns_path: String,
}

impl Pins {
    pub fn path(&self) -> &std::path::Path {
        &self.dir
    }

    /// Runs `lb down` on these pins: its exit status, and whether the directory is gone
    /// after it (what is left is then removed).
    pub fn down(self) -> anyhow::Result<(std::process::ExitStatus, bool)> {
        let ns_path = self.ns_path.clone();
        let dir = self.take();
        let status = run_lb_down(&ns_path, &dir);
        let gone = !dir.exists();
        let _ = std::fs::remove_dir_all(&dir);
        Ok((status?, gone))
    }

    fn take(mut self) -> PathBuf {
        std::mem::take(&mut self.dir)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if !self.dir.as_os_str().is_empty() {
            lb_down(&self.ns_path, &self.dir);
        }
    }
}

/// `lb down --bpffs DIR` in the namespace at `ns_path` (where it also lets go of the
/// backends' next hops); the directory is removed whatever happens.
pub fn lb_down(ns_path: &str, bpffs: &std::path::Path) {
    let _ = run_lb_down(ns_path, bpffs);
    let _ = std::fs::remove_dir_all(bpffs);
}

fn run_lb_down(
    ns_path: &str,
    bpffs: &std::path::Path,
) -> std::io::Result<std::process::ExitStatus> {
    Command::new("nsenter")
        .arg(format!("--net={ns_path}"))
        .arg(lb_bin())
        .args(["down", "--bpffs"])
        .arg(bpffs)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
}

/// A fresh store directory for a test, removed on drop (also when the test fails).
pub struct TempStore(PathBuf);

impl TempStore {
    /// Its `--store` URL.
    pub fn url(&self) -> String {
        format!("file://{}", self.0.display())
    }
}

impl std::ops::Deref for TempStore {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn temp_store() -> TempStore {
    TempStore(std::env::temp_dir().join(crate::unique("lbt-store")))
}

impl LbProcess {
    /// Starts `lb run --iface IF...` in `ns`, with a store of its own unless `extra` names
    /// one, and waits until it is ready.
    pub fn start(ns: &Netns, ifaces: &[&str], extra: &[&str]) -> anyhow::Result<Self> {
        let bpffs = PathBuf::from("/sys/fs/bpf").join(crate::unique("lbt"));
        let mut lb = Self::spawn(ns, ifaces, extra, bpffs, None)?;
        lb.wait_ready(Duration::from_secs(15))?;
        Ok(lb)
    }

    /// [`LbProcess::start`] with only the capabilities `caps` (as setpriv names them:
    /// `+bpf,+net_admin`), the rest out of its bounding set, as a systemd unit's
    /// `CapabilityBoundingSet=` starts it.
    pub fn start_with_capabilities(
        ns: &Netns,
        ifaces: &[&str],
        extra: &[&str],
        caps: &str,
    ) -> anyhow::Result<Self> {
        let bpffs = PathBuf::from("/sys/fs/bpf").join(crate::unique("lbt"));
        let mut lb = Self::spawn(ns, ifaces, extra, bpffs, Some(caps))?;
        lb.wait_ready(Duration::from_secs(15))?;
        Ok(lb)
    }

    /// Starts an lb on the pins an earlier one left (a restart), and waits until ready.
    pub fn start_on(
        ns: &Netns,
        ifaces: &[&str],
        extra: &[&str],
        pins: Pins,
    ) -> anyhow::Result<Self> {
        let mut lb = Self::spawn(ns, ifaces, extra, pins.take(), None)?;
        lb.wait_ready(Duration::from_secs(15))?;
        Ok(lb)
    }

    /// Starts an lb on `pins` without waiting for it to be ready.
    pub fn spawn_on(
        ns: &Netns,
        ifaces: &[&str],
        extra: &[&str],
        pins: Pins,
    ) -> anyhow::Result<Self> {
        Self::spawn(ns, ifaces, extra, pins.take(), None)
    }

    fn spawn(
        ns: &Netns,
        ifaces: &[&str],
        extra: &[&str],
        bpffs: PathBuf,
        caps: Option<&str>,
    ) -> anyhow::Result<Self> {
        let own_store = (!extra.contains(&"--store")).then(temp_store);
        let mut args: Vec<String> = extra.iter().map(std::string::ToString::to_string).collect();
        if let Some(dir) = &own_store {
            args.extend(["--store".to_string(), format!("file://{}", dir.display())]);
        }
        let log = std::env::temp_dir().join(format!("{}.log", crate::unique("lb-")));
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.path()));
        if let Some(caps) = caps {
            // setpriv execs lb: the PID stays the daemon's.
            cmd.args(["setpriv", "--inh-caps=-all"])
                .arg(format!("--bounding-set=-all,{caps}"));
        }
        cmd.arg(lb_bin()).arg("run");
        for i in ifaces {
            cmd.args(["--iface", i]);
        }
        // The API on 127.0.0.1:9090 unless `extra` says where.
        let api = match extra.iter().position(|a| *a == "--api") {
            Some(i) => {
                let given = extra.get(i + 1).context("--api without a value")?;
                match given.strip_prefix("unix:") {
                    Some(_) => (*given).to_string(),
                    None => format!("http://{}", given.replace("0.0.0.0", "127.0.0.1")),
                }
            }
            None => {
                cmd.args(["--api", "127.0.0.1:9090"]);
                "http://127.0.0.1:9090".to_string()
            }
        };
        cmd.arg("--bpffs").arg(&bpffs).args(&args);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting lb")?;
        Ok(Self {
            child: Some(child),
            ns_path: ns.path(),
            api,
            token: None,
            bpffs,
            own_pins: true,
            log,
            _own_store: own_store,
        })
    }

    /// The backends `GET /v1/services/NAME` lists (none if it fails).
    pub fn backends_of(&self, name: &str) -> Vec<String> {
        let (_, v) = self
            .request("GET", &format!("/v1/services/{name}"), None)
            .unwrap();
        v["backends"]
            .as_array()
            .map(|a| a.iter().map(|b| b.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    }

    /// The process ID of the daemon (nsenter execs it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits until `GET /ready` answers 200.
    pub fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok((200, _)) = self.request("GET", "/ready", None) {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!("lb exited ({status}): {}", self.log_text());
            }
            if Instant::now() > deadline {
                bail!("lb did not become ready: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9`: the process dies at once; its pins stay, attached and forwarding.
    pub fn kill(mut self) -> Pins {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.own_pins = false;
        Pins {
            dir: self.bpffs.clone(),
            ns_path: self.ns_path.clone(),
        }
    }

    /// SIGTERM, keeping the pins (as a stopped lb leaves them) for the next one.
    pub fn stop_keeping_pins(mut self) -> anyhow::Result<(std::process::ExitStatus, Pins)> {
        let status = self.terminate()?;
        self.own_pins = false;
        let pins = Pins {
            dir: self.bpffs.clone(),
            ns_path: self.ns_path.clone(),
        };
        Ok((status, pins))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where the API is, for `rawhttp`.
    pub fn api_target(&self) -> crate::rawhttp::Target {
        use crate::rawhttp::Target;
        match self.api.strip_prefix("unix:") {
            Some(path) => Target::Unix(path.into()),
            None => Target::Tcp(
                self.api
                    .trim_start_matches("http://")
                    .parse()
                    .expect("an ADDR:PORT"),
            ),
        }
    }

    /// The network namespace lb runs in.
    pub fn ns_path(&self) -> &str {
        &self.ns_path
    }

    /// Sends a request byte for byte (see `rawhttp::request`) and reads the answer.
    pub fn raw(&self, bytes: Vec<u8>) -> anyhow::Result<crate::rawhttp::Answer> {
        let target = self.api_target();
        in_netns(&self.ns_path, move || {
            crate::rawhttp::exchange(&target, &bytes, Duration::from_secs(10))
        })
    }

    /// One API call (with the token, if set): status and JSON body (Null when empty).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let bearer = self.token.as_ref().map(|t| format!("Bearer {t}"));
        if self.api.starts_with("unix:") {
            let mut headers = vec![("Host", "localhost"), ("Content-Type", "application/json")];
            if let Some(b) = &bearer {
                headers.push(("Authorization", b));
            }
            let bytes = crate::rawhttp::request(method, path, &headers, body.map(str::as_bytes));
            let answer = self.raw(bytes)?;
            return Ok((answer.status, answer.json()));
        }
        let url = format!("{}{path}", self.api);
        let method = method.to_string();
        let body = body.map(str::to_string);
        in_netns(&self.ns_path, move || {
            let mut req = ureq::request(&method, &url).timeout(Duration::from_secs(10));
            if let Some(b) = bearer {
                req = req.set("authorization", &b);
            }
            let resp = match body {
                Some(b) => req.set("content-type", "application/json").send_string(&b),
                None => req.call(),
            };
            let resp = match resp {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(e) => return Err(anyhow::anyhow!("{e}")),
            };
            let status = resp.status();
            let text = resp.into_string()?;
            let json = if text.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or(Value::String(text))
            };
            Ok((status, json))
        })
    }

    /// `PUT /v1/services/NAME`, which must succeed.
    pub fn put_service(&self, name: &str, body: &Value) -> anyhow::Result<Value> {
        let (status, v) = self.request(
            "PUT",
            &format!("/v1/services/{name}"),
            Some(&body.to_string()),
        )?;
        if status != 200 {
            bail!("PUT {name}: {status} {v}");
        }
        Ok(v)
    }

    /// Sends SIGTERM and waits for a clean exit; drop then removes the pins.
    pub fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.terminate()
    }

    fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.into());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "lb did not stop within 10 s of SIGTERM: {}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LbProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::stop_child(&mut child, Duration::from_secs(5));
        }
        // A stopped lb leaves its data plane attached: remove it so tests leave nothing
        // behind, unless it was handed on to the next lb.
        if self.own_pins {
            lb_down(&self.ns_path, &self.bpffs);
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_within_returns_what_a_quick_command_printed_and_stops_a_slow_one() {
        let out = output_within(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(
            (out.status.code(), &out.stdout[..], &out.stderr[..]),
            (Some(3), &b"out\n"[..], &b"err\n"[..])
        );
        let started = Instant::now();
        let err =
            output_within(Command::new("sleep").arg("30"), Duration::from_millis(300)).unwrap_err();
        assert!(err.to_string().contains("did not exit within"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the slow command was not stopped"
        );
    }
}
