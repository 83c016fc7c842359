//! The normalised request path that routes (and `paths_exclude`) are matched against, and
//! that is forwarded: what lb decided on is what the backend is asked for.
//!
//! Normalising follows RFC 3986 section 6.2.2: percent-encoded unreserved characters are
//! decoded (`/%61dmin` is `/admin`), other percent-encodings get upper-case hex, runs of
//! `/` collapse into one, and `.` and `..` segments are resolved (`..` stops at the root).
//! An encoded `/` or `\` is refused rather than decoded: decoded, it would make a segment
//! boundary the client did not send; kept, a backend that decodes it would see a path lb
//! never matched.
use std::borrow::Cow;

/// A path lb will not route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadPath {
    #[error("an encoded path separator (%2F or %5C) is not accepted in a path")]
    EncodedSeparator,
}

/// `path` normalised; borrowed when it is normal already (most requests), so that only an
/// unusual path costs an allocation. Anything not starting with `/` (`*`, an authority) is
/// left as it is.
pub(crate) fn normalize(path: &str) -> Result<Cow<'_, str>, BadPath> {
    if !path.starts_with('/') || !maybe_unusual(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path.as_bytes())?;
    let resolved = resolve_segments(&decoded);
    if resolved == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(resolved))
    }
}

/// Whether `path` may change when normalised: it has a `%`, a `//` or a `/.`.
fn maybe_unusual(path: &[u8]) -> bool {
    path.contains(&b'%')
        || path
            .windows(2)
            .any(|w| w[0] == b'/' && (w[1] == b'/' || w[1] == b'.'))
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Decodes `%XX` of unreserved characters, upper-cases the hex of the others; a `%` not
/// followed by two hex digits stays as it is (it cannot spell a separator or a dot).
fn decode_unreserved(path: &[u8]) -> Result<String, BadPath> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let c = path[i];
        let escaped = (c == b'%')
            .then(|| Some((hex(*path.get(i + 1)?)?, hex(*path.get(i + 2)?)?)))
            .flatten();
        match escaped {
            Some((hi, lo)) => {
                let byte = hi << 4 | lo;
                if byte == b'/' || byte == b'\\' {
                    return Err(BadPath::EncodedSeparator);
                }
                if is_unreserved(byte) {
                    out.push(byte);
                } else {
                    const HEX: &[u8; 16] = b"0123456789ABCDEF";
                    out.extend([b'%', HEX[usize::from(hi)], HEX[usize::from(lo)]]);
                }
                i += 3;
            }
            None => {
                out.push(c);
                i += 1;
            }
        }
    }
    // Only ASCII was put in or taken out of a valid str: still valid UTF-8.
    Ok(String::from_utf8(out)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

/// Collapses empty segments and resolves `.` and `..`. A path that ended in `/`, `.` or
/// `..` keeps a trailing `/` (it names a directory).
fn resolve_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut directory = false;
    for segment in path.split('/').skip(1) {
        directory = true;
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => {
                segments.push(s);
                directory = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if directory || segments.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> String {
        normalize(p).unwrap().into_owned()
    }

    #[test]
    fn spellings_of_admin_are_admin() {
        for p in [
            "/admin",
            "/%61dmin",
            "/%61%64%6D%69%6e",
            "//admin",
            "///admin",
            "/x/../admin",
            "/./admin",
            "/x/y/../../admin",
            "/../admin",
            "/%2e/admin",
            "/x/%2E%2E/admin",
            "/.%2e/admin",
        ] {
            assert_eq!(norm(p), "/admin", "{p}");
        }
        assert_eq!(norm("/admin//panel"), "/admin/panel");
        assert_eq!(norm("/admin/./panel/"), "/admin/panel/");
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/demo/hello", "/a-b_c~d.e", "/.well-known/x", "*"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn directories_keep_their_slash() {
        assert_eq!(norm("/a/b/.."), "/a/");
        assert_eq!(norm("/a/."), "/a/");
        assert_eq!(norm("/a//"), "/a/");
        assert_eq!(norm("/.."), "/");
        assert_eq!(norm("//"), "/");
    }

    #[test]
    fn reserved_escapes_stay_escaped() {
        assert_eq!(norm("/a%3fb"), "/a%3Fb");
        assert_eq!(norm("/a%25b"), "/a%25b");
        assert_eq!(norm("/100%"), "/100%");
        assert_eq!(norm("/%zz/x"), "/%zz/x");
        assert_eq!(norm("/%"), "/%");
        assert_eq!(norm("/%6"), "/%6");
    }

    #[test]
    fn encoded_separators_are_refused() {
        for p in [
            "/admin%2Fx",
            "/x%2fadmin",
            "/%5Cadmin",
            "/a/..%2F..%2Fadmin",
        ] {
            assert_eq!(normalize(p), Err(BadPath::EncodedSeparator), "{p}");
        }
    }
}
