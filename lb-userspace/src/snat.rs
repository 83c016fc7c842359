//! The SNAT source port range: by default the widest range of unprivileged ports outside
//! the host's own ephemeral ports (`net.ipv4.ip_local_port_range`), so that the balancer's
//! flows and the host's connections never want the same port.

/// The fewest ports a default range may have: below this, `--snat-ports` must be given.
const MIN_DEFAULT_PORTS: u32 = 1024;

/// The host's ephemeral port range, if it can be read.
pub fn ephemeral_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text
        .split_whitespace()
        .filter_map(|p| p.parse::<u16>().ok());
    Some((it.next()?, it.next()?))
}

/// The widest range of ports from 1024 up that does not overlap `ephemeral`.
pub fn default_range(ephemeral: (u16, u16)) -> Result<(u16, u16), String> {
    let (lo, hi) = ephemeral;
    let below = (1024u32, lo as u32 - 1);
    let above = (hi as u32 + 1, 65535u32);
    let len = |(a, b): (u32, u32)| if b >= a { b - a + 1 } else { 0 };
    let best = if len(below) >= len(above) {
        below
    } else {
        above
    };
    if len(best) < MIN_DEFAULT_PORTS {
        return Err(format!(
            "the host's ephemeral ports {lo}-{hi} (net.ipv4.ip_local_port_range) leave fewer than {MIN_DEFAULT_PORTS} ports for SNAT: narrow that range or give --snat-ports"
        ));
    }
    Ok((best.0 as u16, best.1 as u16))
}

/// Refuses a SNAT range that overlaps the ports the host picks for its own connections.
pub fn check_overlap((min, max): (u16, u16), ephemeral: Option<(u16, u16)>) -> Result<(), String> {
    if let Some((lo, hi)) = ephemeral
        && min <= hi
        && lo <= max
    {
        return Err(format!(
            "--snat-ports {min}-{max} overlaps the host's ephemeral ports {lo}-{hi} (net.ipv4.ip_local_port_range); choose a range outside it"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_the_widest_range_outside_the_ephemeral_ports() {
        // Linux's default ephemeral range leaves 1024-32767 below it.
        assert_eq!(default_range((32768, 60999)), Ok((1024, 32767)));
        assert_eq!(default_range((1024, 30000)), Ok((30001, 65535)));
        assert_eq!(default_range((10000, 65000)), Ok((1024, 9999)));
        assert!(
            default_range((1024, 65000))
                .unwrap_err()
                .contains("--snat-ports")
        );
        assert!(check_overlap((61000, 65535), Some((32768, 60999))).is_ok());
        assert!(check_overlap((60000, 65535), Some((32768, 60999))).is_err());
        assert!(check_overlap((1024, 32767), Some((32768, 60999))).is_ok());
        assert!(check_overlap((1, 2), None).is_ok());
    }
}
