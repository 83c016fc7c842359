//! Sticky sessions by cookie, as HAProxy's `cookie NAME insert indirect nocache` that DFP's
//! `sessionType=sticky-server` writes: a client's first response names its backend in a
//! cookie lb inserts; later requests carrying it go to that backend while it is healthy.
//! The cookie is lb's alone: taken off the request before the backend sees it.
use std::net::SocketAddr;

use http::{HeaderMap, HeaderValue, header::COOKIE};
use sha2::{Digest, Sha256};

pub(crate) struct Sticky {
    name: Box<str>,
    /// Each backend's cookie value, by its index in the route.
    values: Box<[Box<str>]>,
}

impl Sticky {
    pub fn new(name: &str, service: &str, backends: impl Iterator<Item = SocketAddr>) -> Self {
        Self {
            name: name.into(),
            values: backends.map(|addr| value(service, addr).into()).collect(),
        }
    }

    /// The backend the request's cookie names, if it is one of the route's (healthy) ones.
    pub fn chosen(&self, headers: &HeaderMap) -> Option<usize> {
        let wanted = cookies(headers).find(|(name, _)| *name == &*self.name)?.1;
        self.values.iter().position(|v| **v == *wanted)
    }

    /// Takes lb's cookie off the request (the backend never sees it), leaving the others.
    pub fn strip(&self, headers: &mut HeaderMap) {
        if !headers.contains_key(COOKIE) {
            return;
        }
        let kept: Vec<String> = cookies(headers)
            .filter(|(name, _)| *name != &*self.name)
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        headers.remove(COOKIE);
        if let Ok(value) = HeaderValue::from_str(&kept.join("; "))
            && !kept.is_empty()
        {
            headers.insert(COOKIE, value);
        }
    }

    /// `Set-Cookie` naming backend `index`, for the whole site and the browser session.
    pub fn set_cookie(&self, index: usize) -> Option<HeaderValue> {
        let value = self.values.get(index)?;
        HeaderValue::from_str(&format!("{}={value}; Path=/", self.name)).ok()
    }
}

/// A backend's cookie value: the same on every lb node and after every restart, and not
/// the backend's address.
fn value(service: &str, addr: SocketAddr) -> String {
    let digest = Sha256::digest(format!("{service}\0{addr}"));
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The (name, value) pairs of every Cookie header.
fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            Some((name.trim(), value.trim()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sticky() -> Sticky {
        let addrs = ["10.0.0.1:80", "10.0.0.2:80"].map(|a| a.parse().unwrap());
        Sticky::new("web", "web", addrs.into_iter())
    }

    fn headers(cookies: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for c in cookies {
            h.append(COOKIE, HeaderValue::from_str(c).unwrap());
        }
        h
    }

    #[test]
    fn the_cookie_set_for_a_backend_leads_back_to_it_and_never_reaches_it() {
        let s = sticky();
        for b in 0..2 {
            let set = s.set_cookie(b).unwrap();
            let pair = set.to_str().unwrap().split(';').next().unwrap().to_string();
            let mut h = headers(&["theme=dark", &format!("{pair}; lang=en")]);
            assert_eq!(s.chosen(&h), Some(b));
            s.strip(&mut h);
            assert_eq!(h.get(COOKIE).unwrap(), "theme=dark; lang=en");
        }
        let set = s.set_cookie(0).unwrap();
        let pair = set.to_str().unwrap().split(';').next().unwrap();
        let mut alone = headers(&[pair]);
        s.strip(&mut alone);
        assert!(alone.get(COOKIE).is_none());
    }

    #[test]
    fn unknown_values_and_other_cookies_choose_nothing() {
        let s = sticky();
        assert_eq!(s.chosen(&headers(&["web=0123456789abcdef"])), None);
        assert_eq!(s.chosen(&headers(&["webx=1; other"])), None);
        assert_eq!(s.chosen(&HeaderMap::new()), None);
        // Stable: the same on every node, and not the address.
        assert_eq!(value("web", "10.0.0.1:80".parse().unwrap()).len(), 16);
        assert_eq!(
            value("web", "10.0.0.1:80".parse().unwrap()),
            value("web", "10.0.0.1:80".parse().unwrap())
        );
        assert_ne!(
            value("web", "10.0.0.1:80".parse().unwrap()),
            value("api", "10.0.0.1:80".parse().unwrap())
        );
    }
}
