//! What becomes of a layer-4 backend's tracked flows when it stops taking new ones: when a
//! write leaves it out of `backends` (`drain_timeout_s`), and when its health check takes
//! it down (`on_down`). By default both drain, as HAProxy's `on-marked-down` default and
//! cloud balancers' deregistration delay do: the backend leaves the Maglev table at once,
//! and its established flows keep it until they end or the timeout passes.
use serde::{Deserialize, Serialize};

use crate::model::ValidationError;

/// AWS's target groups wait 300 s by default before a deregistered target's connections
/// are cut; long enough for most requests and downloads, short enough for a deploy.
pub const DEFAULT_TIMEOUT_S: u32 = 300;
/// A day: a drain meant to last longer is a backend that should stay listed as draining.
pub const MAX_TIMEOUT_S: u32 = 86_400;

/// What a backend that a health check takes down does with its tracked flows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDown {
    /// They keep going to it (it may still answer them); only new flows go elsewhere.
    #[default]
    Drain,
    /// They are balanced again on their next packet, over the backends that are up.
    Shutdown,
}

/// A layer-4 service's drain policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    /// How long a backend left out of `backends` keeps its tracked flows (0: cut at once).
    pub timeout_s: u32,
    pub on_down: OnDown,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            timeout_s: DEFAULT_TIMEOUT_S,
            on_down: OnDown::Drain,
        }
    }
}

impl Drain {
    /// The policy from the API's fields (`drain_timeout_s`, `on_down`); `layer4` false
    /// refuses both, since an HTTP service's requests are not tracked flows.
    pub fn from_fields(
        timeout_s: Option<u32>,
        on_down: Option<&str>,
        layer4: bool,
    ) -> Result<Self, ValidationError> {
        let only_l4 = |field: &str| ValidationError::new(field, "applies to layer-4 services only");
        if !layer4 {
            if timeout_s.is_some() {
                return Err(only_l4("drain_timeout_s"));
            }
            if on_down.is_some() {
                return Err(only_l4("on_down"));
            }
        }
        let policy = Self {
            timeout_s: timeout_s.unwrap_or(DEFAULT_TIMEOUT_S),
            on_down: match on_down {
                None | Some("drain") => OnDown::Drain,
                Some("shutdown") => OnDown::Shutdown,
                Some(other) => {
                    return Err(ValidationError::new(
                        "on_down",
                        format!("{other:?} is not drain or shutdown"),
                    ));
                }
            },
        };
        policy.checked()
    }

    pub fn checked(self) -> Result<Self, ValidationError> {
        if self.timeout_s > MAX_TIMEOUT_S {
            return Err(ValidationError::new(
                "drain_timeout_s",
                format!("must be 0 to {MAX_TIMEOUT_S} seconds"),
            ));
        }
        Ok(self)
    }

    pub fn is_default_timeout(timeout_s: &u32) -> bool {
        *timeout_s == DEFAULT_TIMEOUT_S
    }

    pub fn is_default_on_down(on_down: &OnDown) -> bool {
        *on_down == OnDown::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_drain_for_five_minutes_unless_told_otherwise() {
        assert_eq!(
            Drain::from_fields(None, None, true).unwrap(),
            Drain::default()
        );
        assert_eq!(Drain::default().timeout_s, 300);
        let cut = Drain::from_fields(Some(0), Some("shutdown"), true).unwrap();
        assert_eq!((cut.timeout_s, cut.on_down), (0, OnDown::Shutdown));
        let field = |r: Result<Drain, ValidationError>| r.unwrap_err().field;
        assert_eq!(
            field(Drain::from_fields(Some(86_401), None, true)),
            "drain_timeout_s"
        );
        assert_eq!(
            field(Drain::from_fields(None, Some("kill"), true)),
            "on_down"
        );
        assert_eq!(
            field(Drain::from_fields(Some(5), None, false)),
            "drain_timeout_s"
        );
        assert_eq!(
            field(Drain::from_fields(None, Some("drain"), false)),
            "on_down"
        );
        assert_eq!(
            Drain::from_fields(None, None, false).unwrap(),
            Drain::default()
        );
    }
}
