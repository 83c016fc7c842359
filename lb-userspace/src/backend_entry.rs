//! One item of a layer-4 service's `backends`: `"ip:port"`, or
//! `{"address": "ip:port", "weight": N, "state": "active" | "draining"}`. A backend's weight
//! is its share of the Maglev table (`maglev::build_weighted`); weight 0 or `draining`
//! gives it no new flow while its tracked flows keep it, as Katran and HAProxy do.
use std::net::SocketAddrV4;

use lb_common::maglev::MAX_WEIGHT;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::ValidationError;

/// Whether a backend takes new flows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    #[default]
    Active,
    /// No new flow; established ones go on.
    Draining,
}

/// A backend's weight and state: stored only where they are not the default (weight 1,
/// active).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendOptions {
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub state: AdminState,
}

fn one() -> u32 {
    1
}

impl Default for BackendOptions {
    fn default() -> Self {
        Self {
            weight: 1,
            state: AdminState::Active,
        }
    }
}

impl BackendOptions {
    /// Its weight in the table: none while it drains.
    pub fn table_weight(&self) -> u32 {
        match self.state {
            AdminState::Active => self.weight,
            AdminState::Draining => 0,
        }
    }

    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Reads item `i` of `backends`: its address, and its options when given as an object.
/// Errors name the item's field (`backends[2].weight`).
pub fn parse(
    i: usize,
    item: &Value,
    parse_addr: impl Fn(&str, &str) -> Result<SocketAddrV4, ValidationError>,
) -> Result<(SocketAddrV4, BackendOptions), ValidationError> {
    let field = format!("backends[{i}]");
    let object = match item {
        Value::String(s) => return Ok((parse_addr(&field, s)?, BackendOptions::default())),
        Value::Object(o) => o,
        _ => {
            return Err(ValidationError::new(
                field,
                r#"must be "ip:port" or {"address": "ip:port", "weight": N, "state": "active"|"draining"}"#,
            ));
        }
    };
    let mut options = BackendOptions::default();
    let mut address = None;
    for (key, value) in object {
        let sub = format!("{field}.{key}");
        match key.as_str() {
            "address" => {
                let s = value
                    .as_str()
                    .ok_or_else(|| ValidationError::new(&sub, "must be \"ip:port\""))?;
                address = Some(parse_addr(&sub, s)?);
            }
            "weight" => {
                options.weight = value
                    .as_u64()
                    .filter(|&w| w <= MAX_WEIGHT as u64)
                    .ok_or_else(|| {
                        ValidationError::new(
                            &sub,
                            format!("must be a whole number from 0 to {MAX_WEIGHT}"),
                        )
                    })? as u32;
            }
            "state" => {
                options.state = serde_json::from_value(value.clone())
                    .map_err(|_| ValidationError::new(&sub, r#"must be "active" or "draining""#))?;
            }
            _ => {
                return Err(ValidationError::new(
                    &sub,
                    "is not a backend field (address, weight, state)",
                ));
            }
        }
    }
    let address =
        address.ok_or_else(|| ValidationError::new(format!("{field}.address"), "is required"))?;
    Ok((address, options))
}

/// How item `addr` of `backends` is written back: the plain address unless it has options.
pub fn to_value(addr: SocketAddrV4, options: &BackendOptions) -> Value {
    if options.is_default() {
        return Value::String(addr.to_string());
    }
    let mut item = serde_json::json!({"address": addr.to_string(), "weight": options.weight});
    if options.state != AdminState::Active {
        item["state"] = serde_json::to_value(options.state).expect("a state serialises");
    }
    item
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn addr(field: &str, s: &str) -> Result<SocketAddrV4, ValidationError> {
        s.parse()
            .map_err(|_| ValidationError::new(field, "not an address"))
    }

    #[test]
    fn strings_and_objects_are_read_and_written_back_alike() {
        let (a, o) = parse(0, &json!("10.0.0.1:80"), addr).unwrap();
        assert!(o.is_default());
        assert_eq!(to_value(a, &o), json!("10.0.0.1:80"));
        let item = json!({"address": "10.0.0.2:80", "weight": 3, "state": "draining"});
        let (a, o) = parse(1, &item, addr).unwrap();
        assert_eq!(
            (o.weight, o.state, o.table_weight()),
            (3, AdminState::Draining, 0)
        );
        assert_eq!(to_value(a, &o), item);
        // An object with the defaults is a plain address.
        let (a, o) = parse(0, &json!({"address": "10.0.0.3:80", "weight": 1}), addr).unwrap();
        assert_eq!(to_value(a, &o), json!("10.0.0.3:80"));
    }

    #[test]
    fn errors_name_the_field() {
        let field = |v: Value| parse(2, &v, addr).unwrap_err().field;
        assert_eq!(field(json!(5)), "backends[2]");
        assert_eq!(field(json!({"weight": 2})), "backends[2].address");
        assert_eq!(field(json!({"address": 7})), "backends[2].address");
        assert_eq!(
            field(json!({"address": "10.0.0.1:80", "weight": 257})),
            "backends[2].weight"
        );
        assert_eq!(
            field(json!({"address": "10.0.0.1:80", "weight": -1})),
            "backends[2].weight"
        );
        assert_eq!(
            field(json!({"address": "10.0.0.1:80", "weight": 1.5})),
            "backends[2].weight"
        );
        assert_eq!(
            field(json!({"address": "10.0.0.1:80", "state": "gone"})),
            "backends[2].state"
        );
        assert_eq!(
            field(json!({"address": "10.0.0.1:80", "wieght": 2})),
            "backends[2].wieght"
        );
    }
}
