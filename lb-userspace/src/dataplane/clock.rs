//! The kernel's tick rate. The XDP program keeps time in jiffies (the cheapest clock it
//! can read), so its timeouts need to know how many jiffies make a second.
use std::time::{Duration, Instant};

const RATES: [u32; 4] = [100, 250, 300, 1000];

/// The kernel's jiffies counter now (what the program's `bpf_jiffies64` reads).
pub fn jiffies_now() -> Option<u64> {
    jiffies()
}

fn jiffies() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/timer_list").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("jiffies: "))
        .and_then(|j| j.trim().parse().ok())
}

fn from_config() -> Option<u32> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let config = std::fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()?;
    config
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.parse().ok())
}

/// CONFIG_HZ, measured from the global jiffies counter over a short interval (and rounded
/// to the rates Linux offers), else read from the kernel's build configuration.
pub fn kernel_hz() -> u32 {
    measured_rate(Duration::from_millis(120))
        .map(nearest_rate)
        .or_else(from_config)
        .unwrap_or_else(|| {
            tracing::warn!(
                "could not tell the kernel's HZ; assuming 250 (timeouts scale with the error)"
            );
            250
        })
}

/// Jiffies a second, counted over `span`.
fn measured_rate(span: Duration) -> Option<f64> {
    let (j0, t0) = (jiffies()?, Instant::now());
    std::thread::sleep(span);
    let (j1, t1) = (jiffies()?, Instant::now());
    Some((j1 - j0) as f64 / (t1 - t0).as_secs_f64())
}

/// The rate Linux offers nearest to `rate`.
fn nearest_rate(rate: f64) -> u32 {
    RATES
        .iter()
        .copied()
        .min_by(|a, b| {
            (*a as f64 - rate)
                .abs()
                .total_cmp(&(*b as f64 - rate).abs())
        })
        .unwrap_or(250)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn a_measured_rate_is_rounded_to_the_nearest_rate_linux_offers() {
        assert_eq!(super::nearest_rate(251.3), 250);
        assert_eq!(super::nearest_rate(97.0), 100);
        assert_eq!(super::nearest_rate(290.0), 300);
        assert_eq!(super::nearest_rate(870.0), 1000);
    }

    #[test]
    fn hz_counts_the_jiffies_of_a_second() {
        // Against the kernel's build configuration where it can be read, else against a
        // longer count of the jiffies than the short one kernel_hz makes.
        let hz = super::kernel_hz();
        match super::from_config() {
            Some(configured) => assert_eq!(hz, configured),
            None => {
                let rate = super::measured_rate(Duration::from_secs(1)).expect("/proc/timer_list");
                assert!(
                    (rate - hz as f64).abs() < hz as f64 * 0.05,
                    "{hz} Hz, counted {rate:.1}"
                );
            }
        }
    }
}
