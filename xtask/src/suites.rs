//! The privileged suites of `lb-tests`, one at a time, each under a time limit. A suite runs
//! in a process group of its own (cargo, the test binary, and the servers its tests start),
//! so that a hang, or an interrupt of `cargo xtask test`, stops all of it instead of
//! holding CI until its own limit.
use std::{
    os::unix::process::CommandExt,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use nix::{
    sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, killpg, sigaction},
    unistd::Pid,
};

/// The longest one suite may take: several times the slowest one's usual run.
pub const SUITE_LIMIT: Duration = Duration::from_secs(15 * 60);

/// Set by SIGINT or SIGTERM: the suite running is stopped, and no other starts.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Lets an interrupt reach the suite's group too: it is not in the terminal's foreground
/// group, so only this process hears Ctrl-C. Installed once, by the first suite.
fn catch_interrupts() -> anyhow::Result<()> {
    static INSTALLED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let installed = INSTALLED.get_or_init(|| {
        let action = SigAction::new(
            SigHandler::Handler(on_interrupt),
            SaFlags::empty(),
            SigSet::empty(),
        );
        [Signal::SIGINT, Signal::SIGTERM]
            .into_iter()
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            .try_for_each(|signal| unsafe { sigaction(signal, &action) }.map(drop))
            .map_err(|e| format!("installing a signal handler: {e}"))
    });
    installed.clone().map_err(anyhow::Error::msg)
}

/// The test binary that holds every suite, one module each (`tests/tests/suites`).
pub const BINARY: &str = "suites";

/// The suites: `lb-tests`' own unit tests (`None`), then each module of [`BINARY`] that
/// `listed` (the binary's `--list --format terse` output) names, in order.
pub fn names(listed: &str) -> Vec<Option<String>> {
    let modules: std::collections::BTreeSet<&str> = listed
        .lines()
        .filter_map(|l| l.strip_suffix(": test")?.split_once("::"))
        .map(|(module, _)| module)
        .collect();
    std::iter::once(None)
        .chain(modules.into_iter().map(|m| Some(m.to_string())))
        .collect()
}

/// Which tests of `suite` to run, as arguments to its test binary: the tests of `listed`
/// (the binary's `--list --format terse` output) in that module, those whose names
/// contain `filter` if one is given, by exact name (`None` when there are none). By exact
/// name because libtest's filters match anywhere in a name (`fuzz::` would take
/// `store_fuzz::` too) and any one of several suffices.
pub fn selection(suite: &str, filter: Option<&str>, listed: &str) -> Option<Vec<String>> {
    let prefix = format!("{suite}::");
    let chosen: Vec<String> = listed
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .filter(|name| name.starts_with(&prefix) && filter.is_none_or(|f| name.contains(f)))
        .map(str::to_string)
        .collect();
    (!chosen.is_empty()).then(|| {
        std::iter::once("--exact".to_string())
            .chain(chosen)
            .collect()
    })
}

/// Runs `cmd` (one suite) in a process group of its own; the whole group is killed when it
/// outlives `limit` or this process is interrupted.
pub fn run_limited(cmd: &mut Command, limit: Duration) -> anyhow::Result<()> {
    catch_interrupts()?;
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    let mut child = cmd
        .process_group(0)
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("{cmd:?} failed ({status})");
            }
            return Ok(());
        }
        let interrupted = INTERRUPTED.load(Ordering::SeqCst);
        if interrupted || started.elapsed() > limit {
            // The group's id is the child's pid (process_group(0)).
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
            if interrupted {
                bail!("interrupted: {cmd:?} stopped");
            }
            bail!(
                "{cmd:?} ran longer than {} s: stopped with everything it started",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suite_past_its_limit_is_stopped_with_everything_it_started() {
        let marker = std::env::temp_dir().join(format!("xtask-limit-{}", std::process::id()));
        // A shell that leaves a grandchild behind, which touches the marker if it lives.
        let script = format!("(sleep 3; touch {}) & sleep 30", marker.display());
        let started = Instant::now();
        let err = run_limited(
            Command::new("sh").args(["-c", &script]),
            Duration::from_millis(500),
        )
        .unwrap_err();
        assert!(err.to_string().contains("stopped"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "not stopped in time"
        );
        std::thread::sleep(Duration::from_secs(4));
        assert!(!marker.exists(), "the suite's grandchild outlived it");
    }

    #[test]
    fn a_suite_that_fails_or_passes_says_so() {
        let limit = Duration::from_secs(10);
        assert!(run_limited(&mut Command::new("false"), limit).is_err());
        run_limited(&mut Command::new("true"), limit).unwrap();
    }

    #[test]
    fn a_suite_is_its_modules_tests_by_exact_name() {
        let listed = "fuzz::random: test\nstore_fuzz::garbage: test\nfuzz::cookies: test\n\
                      fuzz::bench: benchmark\n";
        let exact = |names: &[&str]| {
            Some(
                std::iter::once("--exact")
                    .chain(names.iter().copied())
                    .map(str::to_string)
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            selection("fuzz", None, listed),
            exact(&["fuzz::random", "fuzz::cookies"])
        );
        assert_eq!(
            selection("fuzz", Some("cook"), listed),
            exact(&["fuzz::cookies"])
        );
        assert_eq!(selection("fuzz", Some("nothing"), listed), None);
        assert_eq!(selection("e2e_api", None, listed), None);
    }

    #[test]
    fn the_suites_are_the_unit_tests_then_each_module() {
        let listed = "store_fuzz::garbage: test\nfuzz::random: test\nfuzz::cookies: test\n\
                      e2e_churn::wrk: test\n";
        assert_eq!(
            names(listed),
            [None, Some("e2e_churn"), Some("fuzz"), Some("store_fuzz")]
                .map(|n| n.map(str::to_string))
        );
    }
}
