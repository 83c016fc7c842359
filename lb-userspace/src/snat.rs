//! The SNAT source port range: by default the widest range of unprivileged ports outside
//! the host's own ephemeral ports (`net.ipv4.ip_local_port_range`), so that the balancer's
//! flows and the host's connections never want the same port.

/// The fewest ports a default range may have: below this, `--snat-ports` must be given.
const MIN_DEFAULT_PORTS: u32 = 1024;

/// A SNAT port range lb cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnatError {
    /// The host's ephemeral ports leave no wide enough default range.
    #[error(
        "the host's ephemeral ports {lo}-{hi} (net.ipv4.ip_local_port_range) leave fewer than {MIN_DEFAULT_PORTS} ports for SNAT: narrow that range or give --snat-ports"
    )]
    NoDefault { lo: u16, hi: u16 },
    /// `--snat-ports` overlaps the host's ephemeral ports.
    #[error(
        "--snat-ports {min}-{max} overlaps the host's ephemeral ports {lo}-{hi} (net.ipv4.ip_local_port_range); choose a range outside it"
    )]
    Overlap {
        min: u16,
        max: u16,
        lo: u16,
        hi: u16,
    },
}

/// The host's ephemeral port range, if it can be read.
pub fn ephemeral_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text
        .split_whitespace()
        .filter_map(|p| p.parse::<u16>().ok());
    Some((it.next()?, it.next()?))
}

/// The widest range of ports from 1024 up that does not overlap `ephemeral`.
pub fn default_range(ephemeral: (u16, u16)) -> Result<(u16, u16), SnatError> {
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
        return Err(SnatError::NoDefault { lo, hi });
    }
    Ok((best.0 as u16, best.1 as u16))
}

/// Refuses a SNAT range that overlaps the ports the host picks for its own connections.
pub fn check_overlap(
    (min, max): (u16, u16),
    ephemeral: Option<(u16, u16)>,
) -> Result<(), SnatError> {
    if let Some((lo, hi)) = ephemeral
        && min <= hi
        && lo <= max
    {
        return Err(SnatError::Overlap { min, max, lo, hi });
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
        let e = default_range((1024, 65000)).unwrap_err();
        assert_eq!(
            e,
            SnatError::NoDefault {
                lo: 1024,
                hi: 65000
            }
        );
        assert_eq!(
            e.to_string(),
            "the host's ephemeral ports 1024-65000 (net.ipv4.ip_local_port_range) leave fewer than 1024 ports for SNAT: narrow that range or give --snat-ports"
        );
        assert!(check_overlap((61000, 65535), Some((32768, 60999))).is_ok());
        assert_eq!(
            check_overlap((60000, 65535), Some((32768, 60999)))
                .unwrap_err()
                .to_string(),
            "--snat-ports 60000-65535 overlaps the host's ephemeral ports 32768-60999 (net.ipv4.ip_local_port_range); choose a range outside it"
        );
        assert!(check_overlap((1024, 32767), Some((32768, 60999))).is_ok());
        assert!(check_overlap((1, 2), None).is_ok());
    }
}
