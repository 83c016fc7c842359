//! Per-route rewriting, after routing: headers deleted, set and added on the request sent
//! to the backend and on the response sent back (DFP's `delReqHeader`, `setReqHeader`,
//! `addReqHeader` and their `Res` twins), and the path the backend is asked for rewritten by
//! regular expressions (DFP's `reqPathSearchReplace`). Request rules run after lb's own
//! X-Forwarded-* headers, so a route may override them.
use http::{HeaderMap, HeaderName, HeaderValue};
use regex::Regex;

/// Headers to delete, then set (replacing every value), then add (appending).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderRules {
    pub delete: Vec<HeaderName>,
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderRules {
    pub fn is_empty(&self) -> bool {
        self.delete.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.delete {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// The first match of `search` in the path replaced by `replace` (`$1` for a group).
#[derive(Debug, Clone)]
pub struct PathRule {
    pub search: Regex,
    pub replace: String,
}

impl PartialEq for PathRule {
    fn eq(&self, other: &Self) -> bool {
        self.search.as_str() == other.search.as_str() && self.replace == other.replace
    }
}

impl Eq for PathRule {}

/// A route's rewriting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewrite {
    pub request: HeaderRules,
    pub response: HeaderRules,
    pub path: Vec<PathRule>,
}

impl Rewrite {
    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty() && self.path.is_empty()
    }

    /// The path after every rule, in order; None when none changed it.
    pub fn path(&self, path: &str) -> Option<String> {
        let mut current = std::borrow::Cow::Borrowed(path);
        for rule in &self.path {
            if let std::borrow::Cow::Owned(changed) =
                rule.search.replace(&current, rule.replace.as_str())
            {
                current = std::borrow::Cow::Owned(changed);
            }
        }
        match current {
            // A path stays a path.
            std::borrow::Cow::Owned(p) if !p.starts_with('/') => Some(format!("/{p}")),
            std::borrow::Cow::Owned(p) => Some(p),
            std::borrow::Cow::Borrowed(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &'static str) -> HeaderName {
        HeaderName::from_static(n)
    }

    #[test]
    fn headers_are_deleted_then_set_then_added() {
        let rules = HeaderRules {
            delete: vec![name("x-internal")],
            set: vec![(name("x-env"), HeaderValue::from_static("prod"))],
            add: vec![(name("x-tag"), HeaderValue::from_static("b"))],
        };
        let mut h = HeaderMap::new();
        h.insert("x-internal", HeaderValue::from_static("secret"));
        h.append("x-env", HeaderValue::from_static("dev"));
        h.append("x-env", HeaderValue::from_static("test"));
        h.insert("x-tag", HeaderValue::from_static("a"));
        rules.apply(&mut h);
        assert!(!h.contains_key("x-internal"));
        assert_eq!(h.get_all("x-env").iter().collect::<Vec<_>>(), ["prod"]);
        assert_eq!(h.get_all("x-tag").iter().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn path_rules_replace_the_first_match_in_turn() {
        let rewrite = Rewrite {
            path: vec![
                PathRule {
                    search: Regex::new("^/demo/").unwrap(),
                    replace: "/".into(),
                },
                PathRule {
                    search: Regex::new("/v([0-9]+)/").unwrap(),
                    replace: "/version-$1/".into(),
                },
            ],
            ..Rewrite::default()
        };
        assert_eq!(rewrite.path("/demo/v2/x").as_deref(), Some("/version-2/x"));
        assert_eq!(rewrite.path("/demo/a/demo/").as_deref(), Some("/a/demo/"));
        assert_eq!(rewrite.path("/other"), None);
        let strip = Rewrite {
            path: vec![PathRule {
                search: Regex::new("^/api").unwrap(),
                replace: String::new(),
            }],
            ..Rewrite::default()
        };
        assert_eq!(strip.path("/api").as_deref(), Some("/"));
    }
}
