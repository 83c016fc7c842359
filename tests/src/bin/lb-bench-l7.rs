//! `cargo xtask bench` (third part): lb's HTTP path against HAProxy 2.6 in HTTP mode, in
//! one run, with the same backends (four nginx), the same two routes and the same wrk
//! load, keep-alive and one connection a request, over HTTP and over HTTPS (the same ECDSA
//! P-256 certificate in both, TLS by rustls in lb and OpenSSL in HAProxy; one connection a
//! request is then a full handshake a request): requests per second, p50 and p99.
//! Target: lb at least as many requests per second as HAProxy, with a p99 no higher.
//!
//! Everything runs on the loopback of a namespace of its own, removed at the end. The runs
//! are interleaved (lb, HAProxy, then HAProxy, lb, ...) so that both see the same machine
//! noise; each figure is the median over the rounds, errors are summed. Beside wrk's figures
//! it prints the proxy's CPU time (user and system, all threads) per request: what each
//! request costs the host, which on a machine shared with wrk and nginx is also what the
//! others do not get.
//! `LB_BENCH_SECS` (default 10) sets the length of a run, `LB_BENCH_ROUNDS` (default 5) the
//! number of rounds, `LB_BENCH_HAPROXY_REUSE` (default `safe`, HAProxy's own default)
//! HAProxy's `http-reuse`; `LB_BENCH_MODE=keep-alive` (or `close`, `https-keep-alive`,
//! `https-close`, or `http`, `https` for both of a scheme) runs only that;
//! `LB_BENCH_VERBOSE=1` prints wrk's own output of every run.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use lb_tests::{
    cpu_time,
    lbproc::{LbProcess, lb_bin},
    netns::Netns,
    peers::{Haproxy, Nginx, Route, version},
    servers::HttpConn,
    unique,
    wrk::{Wrk, WrkErrors, WrkOptions, WrkReport},
};

const LB_HTTP: &str = "127.0.0.1:8000";
const HAPROXY_HTTP: &str = "127.0.0.1:8001";
const LB_HTTPS: &str = "127.0.0.1:8443";
const HAPROXY_HTTPS: &str = "127.0.0.1:8444";
const BACKENDS: usize = 4;
const THREADS: u32 = 2;
const CONNECTIONS: u32 = 64;
/// The paths the load cycles through: one a route.
const PATHS: [&str; 2] = ["/a/bench", "/b/bench"];
const NO_HTTP: &str = "this lb cannot serve it (no --http, or no --https)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proxy {
    Lb,
    Haproxy,
}

impl Proxy {
    fn name(self) -> &'static str {
        match self {
            Proxy::Lb => "lb",
            Proxy::Haproxy => "haproxy",
        }
    }

    fn addr(self, tls: bool) -> SocketAddr {
        match (self, tls) {
            (Proxy::Lb, false) => LB_HTTP,
            (Proxy::Haproxy, false) => HAPROXY_HTTP,
            (Proxy::Lb, true) => LB_HTTPS,
            (Proxy::Haproxy, true) => HAPROXY_HTTPS,
        }
        .parse()
        .expect("address")
    }
}

struct Mode {
    name: &'static str,
    /// Its `LB_BENCH_MODE` name.
    key: &'static str,
    close: bool,
    tls: bool,
}

const MODES: [Mode; 4] = [
    Mode {
        name: "keep-alive",
        key: "keep-alive",
        close: false,
        tls: false,
    },
    Mode {
        name: "connection per request",
        key: "close",
        close: true,
        tls: false,
    },
    Mode {
        name: "https keep-alive",
        key: "https-keep-alive",
        close: false,
        tls: true,
    },
    Mode {
        name: "https conn per request",
        key: "https-close",
        close: true,
        tls: true,
    },
];

/// The benchmark's certificate: ECDSA P-256, self-signed (wrk checks none), as one PEM
/// with the chain and the key.
fn bench_certificate() -> anyhow::Result<String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = rcgen::CertificateParams::new(vec!["bench.test".to_string()])?.self_signed(&key)?;
    Ok(format!("{}{}", cert.pem(), key.serialize_pem()))
}

fn backend_name(i: usize) -> String {
    format!("backend {}", i + 1)
}

/// Whether this lb has `flag`: `lb run --help` lists it.
fn lb_has(flag: &str) -> anyhow::Result<bool> {
    let bin = lb_bin();
    let out = Command::new(&bin)
        .args(["run", "--help"])
        .output()
        .with_context(|| {
            format!(
                "running {} (build it: cargo build --release -p lb-userspace)",
                bin.display()
            )
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .any(|w| w == flag || w.starts_with(&format!("{flag}="))))
}

/// Checks that `proxy` sends each route's requests to that route's backends and only
/// there, waiting (up to `within`) until every backend has answered: the proxy is ready
/// and its checks have found every backend up.
fn check_routes(
    ns: &Netns,
    proxy: Proxy,
    routes: &[Route],
    backends: &[SocketAddr],
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    for r in routes {
        let expected: BTreeSet<String> = r
            .backends
            .iter()
            .map(|b| backend_name(backends.iter().position(|x| x == b).expect("backend")))
            .collect();
        let mut seen = BTreeSet::new();
        let mut last_error = String::new();
        while seen != expected {
            let path = format!("{}/check", r.prefix);
            match HttpConn::connect(ns, proxy.addr(false), Duration::from_secs(2))
                .and_then(|mut c| c.get_path(&path))
            {
                Ok(body) => {
                    let body = body.trim().to_string();
                    if !expected.contains(&body) {
                        bail!(
                            "{} sent {path} to {body:?}, not to one of {expected:?}",
                            proxy.name()
                        );
                    }
                    seen.insert(body);
                }
                Err(e) => last_error = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not reach every backend of {} within {within:?} (reached {seen:?}; last error: {last_error})",
                    proxy.name(),
                    r.prefix
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// lb with `--http`, given the routes through its API; None when this lb has no `--http`.
fn start_lb(ns: &Netns, routes: &[Route], cert: &str) -> anyhow::Result<Option<LbProcess>> {
    if !lb_has("--http")? {
        return Ok(None);
    }
    let https = lb_has("--https")?;
    // lb's XDP program goes on a veth pair of its own, off the loopback that carries the
    // measured traffic (an HTTP service has no VIP for it to act on anyway).
    ns.ip("link add lbv0 type veth peer name lbv1")?;
    ns.ip("link set lbv0 up")?;
    ns.ip("link set lbv1 up")?;
    // LB_BENCH_LB_ARGS: more `lb run` flags, for experiments (e.g. --http-workers 1).
    let extra = std::env::var("LB_BENCH_LB_ARGS").unwrap_or_default();
    // The backends are on the namespace's loopback, as HAProxy's are.
    let mut args = vec!["--http", LB_HTTP, "--allow-loopback-backends"];
    if https {
        args.extend(["--https", LB_HTTPS]);
    }
    args.extend(extra.split_whitespace());
    let lb = LbProcess::start(ns, &["lbv0"], &args)?;
    if https {
        let (status, body) = lb.request(
            "PUT",
            "/v1/certs/bench",
            Some(&serde_json::json!({"cert": cert, "key": cert}).to_string()),
        )?;
        if status != 200 {
            bail!("lb refused the benchmark's certificate: {status} {body}");
        }
    }
    for r in routes {
        let backends: Vec<String> = r
            .backends
            .iter()
            .map(std::string::ToString::to_string)
            .collect();
        lb.put_service(
            &r.name,
            &serde_json::json!({
                "http": {"paths": [r.prefix]},
                "backends": backends,
                // The same checks as HAProxy's `check inter 2s rise 2 fall 3`.
                "check": {"kind": "tcp", "interval_ms": 2000, "rise": 2, "fall": 3},
            }),
        )?;
    }
    Ok(Some(lb))
}

/// One measured run: wrk's report and the CPU time the proxy used meanwhile.
#[derive(Debug, Clone)]
struct Run {
    report: WrkReport,
    cpu: Duration,
}

impl Run {
    fn cpu_per_request(&self) -> Duration {
        self.cpu / self.report.requests.max(1).min(u32::MAX as u64) as u32
    }
}

/// The median of each figure over a proxy's runs in one mode; errors summed.
#[derive(Debug, Clone, Default)]
struct Summary {
    rps: f64,
    p50: Duration,
    p99: Duration,
    cpu_per_request: Duration,
    opened_per_request: f64,
    errors: WrkErrors,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn summarize(runs: &[Run]) -> Summary {
    let mut errors = WrkErrors::default();
    for r in runs {
        errors.add(&r.report.errors);
    }
    let secs = |f: fn(&Run) -> Duration| {
        Duration::from_secs_f64(median(runs.iter().map(|r| f(r).as_secs_f64()).collect()))
    };
    Summary {
        rps: median(runs.iter().map(|r| r.report.rps()).collect()),
        p50: secs(|r| r.report.p50),
        p99: secs(|r| r.report.p99),
        cpu_per_request: secs(Run::cpu_per_request),
        opened_per_request: median(runs.iter().map(|r| r.report.opened_per_request()).collect()),
        errors,
    }
}

fn us(d: Duration) -> String {
    format!("{:.1} us", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// The verdict of one mode against the target.
fn verdict(lb: Result<&Summary, &str>, haproxy: &Summary) -> String {
    let lb = match lb {
        Ok(s) => s,
        Err(why) => return format!("not judged: {why}"),
    };
    let mut notes = Vec::new();
    if haproxy.errors.total() > 0 {
        notes.push(format!("haproxy had errors: {}", haproxy.errors));
    }
    let note = if notes.is_empty() {
        String::new()
    } else {
        format!(" ({})", notes.join("; "))
    };
    if lb.errors.total() > 0 {
        return format!("target NOT met: lb had errors: {}{note}", lb.errors);
    }
    let rps_ok = lb.rps >= haproxy.rps;
    let p99_ok = lb.p99 <= haproxy.p99;
    format!(
        "target {}: lb {:.0} req/s {} haproxy {:.0}, p99 {} {} {}{note}",
        if rps_ok && p99_ok { "met" } else { "NOT met" },
        lb.rps,
        if rps_ok { ">=" } else { "<" },
        haproxy.rps,
        ms(lb.p99),
        if p99_ok { "<=" } else { ">" },
        ms(haproxy.p99),
    )
}

fn main() -> anyhow::Result<()> {
    let secs = lb_tests::env_num("LB_BENCH_SECS", 10)?.max(1);
    let rounds = lb_tests::env_num("LB_BENCH_ROUNDS", 5)?.max(1) as usize;
    let verbose = std::env::var("LB_BENCH_VERBOSE").is_ok_and(|v| v == "1");
    let reuse = std::env::var("LB_BENCH_HAPROXY_REUSE").unwrap_or_else(|_| "safe".into());
    if !["never", "safe", "aggressive", "always"].contains(&reuse.as_str()) {
        bail!("LB_BENCH_HAPROXY_REUSE={reuse:?}: never, safe, aggressive or always");
    }
    let only = std::env::var("LB_BENCH_MODE").unwrap_or_default();
    let modes: Vec<&Mode> = MODES
        .iter()
        .filter(|m| match only.as_str() {
            "" => true,
            "http" => !m.tls,
            "https" => m.tls,
            key => m.key == key,
        })
        .collect();
    if modes.is_empty() {
        bail!(
            "LB_BENCH_MODE={only:?}: keep-alive, close, https-keep-alive, https-close, http or https"
        );
    }
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);

    let ns = Netns::new(&unique("lbt-l7"))?;
    let backends: Vec<SocketAddr> = (0..BACKENDS)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], 9001 + i as u16)))
        .collect();
    let _nginx = backends
        .iter()
        .enumerate()
        .map(|(i, b)| Nginx::start(&ns, *b, &backend_name(i)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let routes = [
        Route {
            name: "a".into(),
            prefix: "/a".into(),
            backends: backends[..2].to_vec(),
        },
        Route {
            name: "b".into(),
            prefix: "/b".into(),
            backends: backends[2..].to_vec(),
        },
    ];
    let cert = bench_certificate()?;
    let haproxy = Haproxy::start(
        &ns,
        Proxy::Haproxy.addr(false),
        Some((Proxy::Haproxy.addr(true), &cert)),
        &routes,
        &reuse,
    )?;
    check_routes(
        &ns,
        Proxy::Haproxy,
        &routes,
        &backends,
        Duration::from_secs(15),
    )?;
    let lb = start_lb(&ns, &routes, &cert)?;
    if lb.is_some() {
        check_routes(&ns, Proxy::Lb, &routes, &backends, Duration::from_secs(15))?;
    }

    println!(
        "lb's HTTP path against HAProxy: {BACKENDS} nginx backends, routes /a (backends 1-2) and /b (3-4)"
    );
    println!(
        "  {} (nbthread {cpus}, http-reuse {reuse}) | {} | {}",
        version("haproxy", &["-v"]),
        version("nginx", &["-v"]),
        version("wrk", &["-v"])
    );
    println!(
        "  wrk -t{THREADS} -c{CONNECTIONS} -d{secs}s over {}, {rounds} interleaved rounds, loopback of a namespace, {cpus} CPUs",
        PATHS.join(" and ")
    );
    match &lb {
        Some(_) => println!(
            "  lb: {} --http {LB_HTTP} --https {LB_HTTPS}; HTTPS: one ECDSA P-256 certificate for both, HTTP/1.1 (wrk offers no ALPN), no session resumption",
            lb_bin().display()
        ),
        None => println!(
            "  lb: {NO_HTTP} (`lb run --help` lists no --http): its rows are skipped, HAProxy is measured alone"
        ),
    }

    let pid = |p: Proxy| -> u32 {
        match p {
            Proxy::Lb => lb.as_ref().expect("lb runs").pid(),
            Proxy::Haproxy => haproxy.daemon().pid().expect("haproxy runs"),
        }
    };
    let wrk = Wrk::new(&PATHS)?;
    let lb_https = lb.is_some() && lb_has("--https")?;
    let mut summaries = Vec::new();
    for mode in modes {
        // An lb without --https (an older build) sits the HTTPS modes out.
        let lb_runs = lb.is_some() && (lb_https || !mode.tls);
        let proxies: Vec<Proxy> = [Proxy::Lb, Proxy::Haproxy]
            .into_iter()
            .filter(|p| *p != Proxy::Lb || lb_runs)
            .collect();
        let options = |secs: u64| WrkOptions {
            threads: THREADS,
            connections: CONNECTIONS,
            duration: Duration::from_secs(secs),
            close: mode.close,
            tls: mode.tls,
        };
        for &p in &proxies {
            // Warm-up, not counted: connections to the backends, caches, CPU frequency.
            wrk.run(&ns, p.addr(mode.tls), &options(secs.min(2)))?;
        }
        let mut runs: Vec<(Proxy, Run)> = Vec::new();
        for round in 0..rounds {
            let mut order = proxies.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for p in order {
                let cpu_before = cpu_time(pid(p))?;
                let report = wrk.run(&ns, p.addr(mode.tls), &options(secs))?;
                let run = Run {
                    cpu: cpu_time(pid(p))?.saturating_sub(cpu_before),
                    report,
                };
                let r = &run.report;
                println!(
                    "  {}, round {}/{rounds}, {:<7}: {:>8.0} req/s, p50 {}, p99 {}, CPU {}/req, {:.2} conn/req, errors {}",
                    mode.name,
                    round + 1,
                    p.name(),
                    r.rps(),
                    ms(r.p50),
                    ms(r.p99),
                    us(run.cpu_per_request()),
                    r.opened_per_request(),
                    r.errors
                );
                if verbose {
                    println!("{}", r.output);
                }
                runs.push((p, run));
            }
        }
        let of = |p: Proxy| -> Vec<Run> {
            runs.iter()
                .filter(|(q, _)| *q == p)
                .map(|(_, r)| r.clone())
                .collect()
        };
        let lb_summary = lb_runs.then(|| summarize(&of(Proxy::Lb)));
        summaries.push((mode, lb_summary, summarize(&of(Proxy::Haproxy))));
    }

    println!();
    println!(
        "{:<24} {:<8} {:>9} {:>10} {:>10} {:>10} {:>9}  errors",
        "mode", "proxy", "req/s", "p50", "p99", "CPU/req", "conn/req"
    );
    for (mode, lb_summary, haproxy) in &summaries {
        for (p, s) in [
            (Proxy::Lb, lb_summary.as_ref()),
            (Proxy::Haproxy, Some(haproxy)),
        ] {
            match s {
                Some(s) => println!(
                    "{:<24} {:<8} {:>9.0} {:>10} {:>10} {:>10} {:>9.2}  {}",
                    mode.name,
                    p.name(),
                    s.rps,
                    ms(s.p50),
                    ms(s.p99),
                    us(s.cpu_per_request),
                    s.opened_per_request,
                    s.errors
                ),
                None => println!("{:<24} {:<8} {NO_HTTP}", mode.name, p.name()),
            }
        }
    }
    println!(
        "(medians of {rounds} runs of {secs} s; errors summed over them; CPU/req: the proxy's CPU time, user and system, per request, and so per handshake in https conn per request; conn/req: TCP connections accepted in the namespace per request)"
    );
    if summaries
        .iter()
        .any(|(m, _, h)| m.close && h.opened_per_request > 1.5)
    {
        println!(
            "(haproxy opened two connections a request: with http-reuse {reuse} the first request of a client connection gets a backend connection of its own; LB_BENCH_HAPROXY_REUSE=always lets it take an idle one)"
        );
    }
    println!("target: lb req/s >= haproxy req/s and lb p99 <= haproxy p99");
    for (mode, lb_summary, haproxy) in &summaries {
        println!(
            "  {}: {}",
            mode.name,
            verdict(lb_summary.as_ref().ok_or(NO_HTTP), haproxy)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(rps: f64, p99_us: u64, status_errors: u64) -> Summary {
        Summary {
            rps,
            p50: Duration::from_micros(500),
            p99: Duration::from_micros(p99_us),
            cpu_per_request: Duration::from_micros(20),
            opened_per_request: 0.0,
            errors: WrkErrors {
                status: status_errors,
                ..Default::default()
            },
        }
    }

    #[test]
    fn verdicts() {
        let ha = summary(40_000.0, 3_000, 0);
        assert!(verdict(Ok(&summary(41_000.0, 2_900, 0)), &ha).starts_with("target met"));
        assert!(verdict(Ok(&summary(40_000.0, 3_000, 0)), &ha).starts_with("target met"));
        assert!(verdict(Ok(&summary(39_000.0, 2_000, 0)), &ha).starts_with("target NOT met"));
        assert!(verdict(Ok(&summary(50_000.0, 3_100, 0)), &ha).starts_with("target NOT met"));
        let v = verdict(Ok(&summary(50_000.0, 1_000, 4)), &ha);
        assert!(v.contains("lb had errors: non-2xx/3xx 4"), "{v}");
        let v = verdict(Ok(&summary(50_000.0, 1_000, 0)), &summary(1.0, 1, 2));
        assert!(v.contains("haproxy had errors"), "{v}");
        assert!(verdict(Err("no lb"), &ha).starts_with("not judged"));
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
    }
}
