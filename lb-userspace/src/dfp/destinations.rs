//! Docker Flow Proxy's several destinations of one service: `servicePath.1`, `port.1`,
//! `srcPort.2`... Destination N exists when it has a `servicePath.N`, `port.N` or
//! `serviceDomain.N`; DFP reads them from 1 up, in order, up to 10, and a plain parameter
//! stands for the indexed one a destination leaves out. With no indexed destination, the
//! plain parameters are the service's one destination.
//!
//! lb serves each destination as a service of its own, named `NAME.N` (the plain one
//! `NAME`), so that each is also reachable natively; `remove` and `config` treat them as
//! one DFP service.
use std::collections::{BTreeMap, HashMap};

use axum::http::StatusCode;

use super::{Nok, nok, params::documented};

/// DFP reads `.1` to `.10`.
const MOST: u32 = 10;

/// The parameters that make destination N exist.
const MARKS: [&str; 3] = ["servicePath", "port", "serviceDomain"];

/// One destination of a reconfigure.
#[derive(Debug)]
pub(super) struct Destination {
    /// None: the plain parameters, the service's only destination.
    pub index: Option<u32>,
    /// The plain parameters with this destination's indexed ones in their place.
    pub params: HashMap<String, String>,
}

impl Destination {
    /// The lb service that serves it.
    pub fn service_name(&self, name: &str) -> String {
        match self.index {
            None => name.to_string(),
            Some(i) => format!("{name}.{i}"),
        }
    }

    /// `e`, about one of this destination's parameters, named as the request gave it
    /// (`port.2` rather than `port`).
    pub fn named(&self, mut e: Nok, given: &HashMap<String, String>) -> Nok {
        let Some(i) = self.index else { return e };
        let indexed = format!("{}.{i}", e.field);
        if !e.field.is_empty() && given.contains_key(&indexed) {
            if let Some(rest) = e.message.strip_prefix(&format!("{}:", e.field)) {
                e.message = format!("{indexed}:{rest}");
            } else {
                e.message = format!("{indexed}: {}", e.message);
            }
            e.field = indexed;
        } else {
            e.message = format!("destination {i}: {}", e.message);
        }
        e
    }
}

/// The destinations a reconfigure's parameters describe.
pub(super) fn destinations(params: &HashMap<String, String>) -> Result<Vec<Destination>, Nok> {
    // The indexed values, by destination.
    let mut indexed: BTreeMap<u32, Vec<(&'static str, &String, &String)>> = BTreeMap::new();
    let mut plain = HashMap::new();
    for (name, value) in params {
        match documented(name) {
            Some((base, Some(i))) => indexed.entry(i).or_default().push((base, name, value)),
            _ => {
                plain.insert(name.clone(), value.clone());
            }
        }
    }
    if indexed.is_empty() {
        return Ok(vec![Destination {
            index: None,
            params: plain,
        }]);
    }
    let mut out = Vec::new();
    for (expected, (i, values)) in (1..).zip(&indexed) {
        let mut values = values.clone();
        values.sort();
        let (_, first, _) = values[0];
        if *i != expected || *i > MOST {
            let message = format!(
                "{first}: DFP's destinations are numbered 1, 2, ... up to {MOST}, none left out \
                 (destination {expected} is missing or this one is past {MOST})"
            );
            return Err(nok(StatusCode::BAD_REQUEST, first, message));
        }
        let marked = values
            .iter()
            .any(|(base, _, v)| MARKS.contains(base) && !v.trim().is_empty());
        if !marked {
            let message = format!(
                "{first}: destination {i} has no servicePath.{i}, port.{i} or serviceDomain.{i}"
            );
            return Err(nok(StatusCode::BAD_REQUEST, first, message));
        }
        let mut params = plain.clone();
        for (base, _, value) in values {
            // As DFP: an empty indexed value leaves the plain one.
            if !value.is_empty() {
                params.insert(base.to_string(), value.clone());
            }
        }
        out.push(Destination {
            index: Some(*i),
            params,
        });
    }
    Ok(out)
}

/// Which destination of DFP service `name` lb service `service` is: 0 for the plain one,
/// N for `name.N`; None if it is none of them.
pub(super) fn member(name: &str, service: &str) -> Option<u32> {
    if service == name {
        return Some(0);
    }
    let (base, i) = split(service);
    (base == name && i > 0).then_some(i)
}

/// An lb service's DFP name and destination index: `go-demo.2` is destination 2 of
/// `go-demo`; any other name is the plain destination (0) of itself.
pub(super) fn split(service: &str) -> (&str, u32) {
    match service.rsplit_once('.') {
        Some((base, n))
            if !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) =>
        {
            match n.parse() {
                Ok(i) if (1..=MOST).contains(&i) => (base, i),
                _ => (service, 0),
            }
        }
        _ => (service, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dfp::query as params;

    #[test]
    fn plain_parameters_are_one_destination() {
        let d = destinations(&params(&[("serviceName", "a"), ("servicePath", "/a")])).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].index, None);
        assert_eq!(d[0].service_name("a"), "a");
        assert_eq!(d[0].params["servicePath"], "/a");
    }

    #[test]
    fn indexed_values_replace_the_plain_ones_which_fill_in_the_rest() {
        let d = destinations(&params(&[
            ("serviceName", "a"),
            ("servicePath", "/plain"),
            ("port", "8080"),
            ("servicePath.1", "/one"),
            ("servicePath.2", "/two"),
            ("port.2", "9090"),
            ("userAgent.2", ""),
        ]))
        .unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].service_name("a"), "a.1");
        assert_eq!(d[0].params["servicePath"], "/one");
        assert_eq!(d[0].params["port"], "8080");
        assert_eq!(d[1].service_name("a"), "a.2");
        assert_eq!(d[1].params["servicePath"], "/two");
        assert_eq!(d[1].params["port"], "9090");
        assert!(!d[1].params.contains_key("userAgent"));
        assert_eq!(d[1].params["serviceName"], "a");
    }

    #[test]
    fn a_gap_a_destination_past_ten_or_one_without_a_mark_is_refused_by_its_name() {
        let gap = params(&[("servicePath.1", "/a"), ("servicePath.3", "/c")]);
        assert_eq!(destinations(&gap).unwrap_err().field, "servicePath.3");
        let zero = params(&[("servicePath.0", "/a")]);
        assert_eq!(destinations(&zero).unwrap_err().field, "servicePath.0");
        let past: HashMap<String, String> = (1..=11)
            .map(|i| (format!("port.{i}"), "80".to_string()))
            .collect();
        assert_eq!(destinations(&past).unwrap_err().field, "port.11");
        let unmarked = params(&[("servicePath.1", "/a"), ("userAgent.2", "bot")]);
        let e = destinations(&unmarked).unwrap_err();
        assert_eq!(e.field, "userAgent.2");
        assert!(e.message.contains("servicePath.2"), "{}", e.message);
    }

    #[test]
    fn an_error_names_the_parameter_as_given() {
        let given = params(&[("port.2", "x"), ("servicePath.2", "/b")]);
        let d = Destination {
            index: Some(2),
            params: HashMap::new(),
        };
        let e = d.named(
            nok(StatusCode::BAD_REQUEST, "port", "port: \"x\" is not a port"),
            &given,
        );
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("port.2", "port.2: \"x\" is not a port")
        );
        // A plain parameter used by destination 2 keeps its name, the destination said.
        let e = d.named(nok(StatusCode::BAD_REQUEST, "users", "users: bad"), &given);
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("users", "destination 2: users: bad")
        );
    }

    #[test]
    fn members_of_a_service_are_itself_and_its_numbered_destinations() {
        assert_eq!(member("go-demo", "go-demo"), Some(0));
        assert_eq!(member("go-demo", "go-demo.2"), Some(2));
        assert_eq!(member("go-demo", "go-demo.x"), None);
        assert_eq!(member("go-demo", "go-demo.2.1"), None);
        assert_eq!(member("go", "go-demo.1"), None);
        assert_eq!(split("api.v2"), ("api.v2", 0));
        assert_eq!(split("api.11"), ("api.11", 0));
        assert_eq!(split("api.3"), ("api", 3));
    }
}
