//! How a layer-4 service's packets reach its backends (`"forwarding"`).
//!
//! - `nat` (default): full NAT. The backend sees the balancer's address; its replies come
//!   back through lb, which holds a SNAT port for every flow.
//! - `dsr`: direct server return through IPIP, as Katran does. The client's packet goes
//!   to the backend whole inside an outer IPv4 header; the backend decapsulates it (a
//!   kernel `ipip` device, or `lb backend`), holds the VIP on a local device and answers
//!   the client itself. The outer source is the balancer's address on the egress
//!   interface, or with `"encap_source": "per_flow"` an address made from the client's
//!   address and port in 172.16.0.0/16, so that a backend's NIC spreads the tunnel over
//!   its receive queues.
//! - `dsr-l2`: direct server return on the balancer's own segment (IPVS's direct
//!   routing): only the destination MAC changes. Backends must be on a directly connected
//!   network of lb's, hold the VIP on a local device and not answer ARP for it.
//!
//! A direct flow needs no state only one node holds: its packets are balanced by the same
//! Maglev table on every node, so a node lost behind ECMP loses no connection.
use serde::{Deserialize, Serialize};

use crate::model::ValidationError;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Forwarding {
    #[default]
    #[serde(rename = "nat")]
    Nat,
    #[serde(rename = "dsr")]
    Dsr,
    #[serde(rename = "dsr-l2")]
    DsrL2,
}

/// The outer source of a `dsr` flow's IPIP header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EncapSource {
    /// lb's address on the interface toward the backend.
    #[default]
    #[serde(rename = "balancer")]
    Balancer,
    /// Made from the client's address and port, in 172.16.0.0/16.
    #[serde(rename = "per_flow")]
    PerFlow,
}

impl Forwarding {
    /// The mode and outer source from the API's fields; `layer4` false (an HTTP service)
    /// takes neither.
    pub fn from_fields(
        forwarding: Option<&str>,
        encap_source: Option<&str>,
        layer4: bool,
    ) -> Result<(Self, EncapSource), ValidationError> {
        if !layer4 {
            for (field, given) in [("forwarding", forwarding), ("encap_source", encap_source)] {
                if given.is_some() {
                    return Err(ValidationError::new(
                        field,
                        "applies to layer-4 services only",
                    ));
                }
            }
        }
        let mode = match forwarding {
            None | Some("nat") => Self::Nat,
            Some("dsr") => Self::Dsr,
            Some("dsr-l2") => Self::DsrL2,
            Some(other) => {
                return Err(ValidationError::new(
                    "forwarding",
                    format!("{other:?} is not nat, dsr or dsr-l2"),
                ));
            }
        };
        let source = match encap_source {
            None | Some("balancer") => EncapSource::Balancer,
            Some("per_flow") if mode == Self::Dsr => EncapSource::PerFlow,
            Some("per_flow") => {
                return Err(ValidationError::new(
                    "encap_source",
                    "applies to \"forwarding\": \"dsr\" only (the only mode that encapsulates)",
                ));
            }
            Some(other) => {
                return Err(ValidationError::new(
                    "encap_source",
                    format!("{other:?} is not balancer or per_flow"),
                ));
            }
        };
        Ok((mode, source))
    }

    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Whether backends answer clients themselves.
    pub fn is_direct(&self) -> bool {
        *self != Self::Nat
    }

    /// The `ServiceInfo` flags the XDP program reads.
    pub fn flags(&self, source: EncapSource) -> u32 {
        use lb_common::service::{SERVICE_DSR_IPIP, SERVICE_DSR_L2, SERVICE_DSR_SPREAD_SOURCE};
        match (self, source) {
            (Self::Nat, _) => 0,
            (Self::Dsr, EncapSource::Balancer) => SERVICE_DSR_IPIP,
            (Self::Dsr, EncapSource::PerFlow) => SERVICE_DSR_IPIP | SERVICE_DSR_SPREAD_SOURCE,
            (Self::DsrL2, _) => SERVICE_DSR_L2,
        }
    }
}

impl EncapSource {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_and_outer_source_come_from_their_fields() {
        assert_eq!(
            Forwarding::from_fields(None, None, true).unwrap(),
            (Forwarding::Nat, EncapSource::Balancer)
        );
        assert_eq!(
            Forwarding::from_fields(Some("dsr"), Some("per_flow"), true).unwrap(),
            (Forwarding::Dsr, EncapSource::PerFlow)
        );
        assert_eq!(
            Forwarding::from_fields(Some("dsr-l2"), None, true).unwrap(),
            (Forwarding::DsrL2, EncapSource::Balancer)
        );
    }

    #[test]
    fn a_bad_value_names_its_field() {
        let field = |f: Option<&str>, s: Option<&str>, l4: bool| {
            Forwarding::from_fields(f, s, l4).unwrap_err().field
        };
        assert_eq!(field(Some("tunnel"), None, true), "forwarding");
        assert_eq!(field(Some("dsr"), Some("random"), true), "encap_source");
        assert_eq!(
            field(Some("dsr-l2"), Some("per_flow"), true),
            "encap_source"
        );
        assert_eq!(field(None, Some("per_flow"), true), "encap_source");
        assert_eq!(field(Some("dsr"), None, false), "forwarding");
        assert_eq!(field(None, Some("balancer"), false), "encap_source");
    }

    #[test]
    fn each_mode_sets_its_program_flags() {
        use lb_common::service::{SERVICE_DSR_IPIP, SERVICE_DSR_L2, SERVICE_DSR_SPREAD_SOURCE};
        assert_eq!(Forwarding::Nat.flags(EncapSource::Balancer), 0);
        assert_eq!(
            Forwarding::Dsr.flags(EncapSource::Balancer),
            SERVICE_DSR_IPIP
        );
        assert_eq!(
            Forwarding::Dsr.flags(EncapSource::PerFlow),
            SERVICE_DSR_IPIP | SERVICE_DSR_SPREAD_SOURCE
        );
        assert_eq!(
            Forwarding::DsrL2.flags(EncapSource::Balancer),
            SERVICE_DSR_L2
        );
    }
}
