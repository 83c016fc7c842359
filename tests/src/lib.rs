//! lb's test kit: network namespaces and veth links that remove themselves, servers and
//! clients that live inside a namespace, real etcd, dnsmasq and a Consul test server, an `lb`
//! process under test, packet builders for BPF_PROG_TEST_RUN, and the peers lb is
//! measured against (nginx, HAProxy, wrk). Used by the suites in `tests/`, by the demo and
//! the benchmarks.
pub mod consul;
pub mod curl;
pub mod dns;
pub mod etcd;
pub mod flood;
pub mod flowtab;
pub mod fuzz_rng;
pub mod grpc;
pub mod lbproc;
pub mod maglev_ref;
pub mod netns;
pub mod packet;
pub mod pebble;
pub mod peers;
pub mod pki;
pub mod rawhttp;
pub mod segment;
pub mod servers;
pub mod topology;
pub mod wrk;

/// A name unique to this process and call (for namespaces and pin directories), also
/// across runs: a run killed before its guards ran cannot leave a name a later run takes.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}x{:x}", std::process::id(), nanos & 0xffff)
}

/// A whole number from environment variable `name` (benchmarks' settings), else `default`.
pub fn env_num(name: &str, default: u64) -> anyhow::Result<u64> {
    use anyhow::Context;
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

/// Polls `f` every 50 ms until it holds or `within` passes; whether it held.
pub fn eventually(within: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    f()
}

/// Stops a process this test kit started, by its PID: SIGTERM, then SIGKILL if it is still
/// there after `grace`.
pub fn stop_child(child: &mut std::process::Child, grace: std::time::Duration) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The CPU time (user and system, all threads) process `pid` has used so far, from
/// `/proc/PID/stat`, to a clock tick (10 ms on most kernels).
pub fn cpu_time(pid: u32) -> anyhow::Result<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count fields after its closing ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/stat: no ')'"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: the 12th and 13th after the name.
    let ticks: u64 = [11, 12]
        .iter()
        .map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum::<Option<u64>>()
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/stat: no utime/stime"))?;
    // SAFETY: sysconf only reads a system constant.
    let per_sec = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        t if t > 0 => t as u64,
        _ => 100,
    };
    Ok(std::time::Duration::from_micros(
        ticks * 1_000_000 / per_sec,
    ))
}
