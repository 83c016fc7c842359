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
    let measured = (|| {
        let (j0, t0) = (jiffies()?, Instant::now());
        std::thread::sleep(Duration::from_millis(120));
        let (j1, t1) = (jiffies()?, Instant::now());
        let rate = (j1 - j0) as f64 / (t1 - t0).as_secs_f64();
        RATES.iter().copied().min_by(|a, b| {
            (*a as f64 - rate)
                .abs()
                .total_cmp(&(*b as f64 - rate).abs())
        })
    })();
    measured.or_else(from_config).unwrap_or_else(|| {
        tracing::warn!(
            "could not tell the kernel's HZ; assuming 250 (timeouts scale with the error)"
        );
        250
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn hz_is_one_of_the_rates_linux_offers() {
        assert!(super::RATES.contains(&super::kernel_hz()));
    }
}
