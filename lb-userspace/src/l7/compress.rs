//! Response compression, as HAProxy's `compression algo gzip` and `compression type ...`
//! (DFP's `compressionAlgo`, `compressionType`): a response the client accepts gzip for,
//! of a listed type, not already encoded, is gzipped as it streams; each frame from the
//! backend is flushed on, so streamed responses (server-sent events) keep flowing.
use std::io::Write as _;

use bytes::Bytes;
use flate2::{Compression, write::GzEncoder};
use http::{
    HeaderMap, HeaderValue, Method, StatusCode,
    header::{
        ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE,
        CONTENT_TYPE, ETAG, VARY,
    },
};

/// The types compressed when a route lists none: text, and the text formats of the web.
const DEFAULT_TYPES: &[&str] = &[
    "text/",
    "application/json",
    "application/javascript",
    "application/xml",
    "image/svg+xml",
];

/// A route's compression: the media types it applies to (lower case; one ending in '/'
/// takes a whole family).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compress {
    pub types: Vec<String>,
}

impl Compress {
    /// Whether the client that sent `method` and `request` headers accepts gzip: asked
    /// before the request goes, since the request's headers go with it.
    pub fn accepted(method: &Method, request: &HeaderMap) -> bool {
        *method != Method::HEAD && accepts_gzip(request)
    }

    /// Whether this response is to be compressed, for a client that accepts it.
    pub fn applies(&self, status: StatusCode, response: &HeaderMap) -> bool {
        if !status.is_success() || status == StatusCode::NO_CONTENT || status.as_u16() == 206 {
            return false;
        }
        if response.contains_key(CONTENT_ENCODING) || response.contains_key(CONTENT_RANGE) {
            return false;
        }
        let no_transform = response
            .get_all(CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.to_ascii_lowercase().contains("no-transform"));
        if no_transform || response.get(CONTENT_LENGTH).is_some_and(|l| l == "0") {
            return false;
        }
        let Some(media) = response
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
        else {
            return false;
        };
        let matches = |t: &str| {
            if t.ends_with('/') {
                media.starts_with(t)
            } else {
                media == t
            }
        };
        if self.types.is_empty() {
            DEFAULT_TYPES.iter().any(|t| matches(t))
        } else {
            self.types.iter().any(|t| matches(t))
        }
    }

    /// Marks `response` as gzipped: its length unknown now, its entity tag weak, and
    /// caches told that the encoding varies with what the client accepts.
    pub fn mark(response: &mut HeaderMap) {
        response.remove(CONTENT_LENGTH);
        response.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        response.append(VARY, HeaderValue::from_static("Accept-Encoding"));
        if let Some(tag) = response.get(ETAG).and_then(|t| t.to_str().ok())
            && tag.starts_with('"')
            && let Ok(weak) = HeaderValue::from_str(&format!("W/{tag}"))
        {
            response.insert(ETAG, weak);
        }
    }
}

/// Whether `Accept-Encoding` takes gzip (or `*`) with a weight above zero.
fn accepts_gzip(request: &HeaderMap) -> bool {
    request
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let weight = parts
                .find_map(|p| p.trim().strip_prefix("q="))
                .and_then(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && weight > 0.0
        })
}

/// A gzip stream fed frame by frame.
pub(crate) struct Gzip {
    encoder: Option<GzEncoder<Vec<u8>>>,
}

impl Gzip {
    pub fn new() -> Self {
        Self {
            encoder: Some(GzEncoder::new(Vec::new(), Compression::fast())),
        }
    }

    /// `data` compressed and flushed: what the client can decode of it now.
    pub fn frame(&mut self, data: &[u8]) -> Bytes {
        let Some(encoder) = self.encoder.as_mut() else {
            return Bytes::new();
        };
        // Writing to memory does not fail.
        let _ = encoder.write_all(data);
        let _ = encoder.flush();
        Bytes::from(std::mem::take(encoder.get_mut()))
    }

    /// The end of the stream (its trailer); empty once given.
    pub fn finish(&mut self) -> Bytes {
        self.encoder
            .take()
            .and_then(|e| e.finish().ok())
            .map_or_else(Bytes::new, Bytes::from)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn frames_flushed_one_by_one_make_one_gzip_stream() {
        let mut gz = Gzip::new();
        let mut out = Vec::new();
        for part in ["hello ", "streaming ", "world"] {
            let frame = gz.frame(part.as_bytes());
            assert!(!frame.is_empty(), "each frame gives the client something");
            out.extend_from_slice(&frame);
        }
        out.extend_from_slice(&gz.finish());
        assert!(gz.finish().is_empty());
        let mut text = String::new();
        flate2::read::GzDecoder::new(&out[..])
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "hello streaming world");
    }

    #[test]
    fn only_what_the_client_accepts_and_the_route_lists_is_compressed() {
        let get = Method::GET;
        assert!(Compress::accepted(
            &get,
            &headers(&[("accept-encoding", "br, gzip;q=0.5")])
        ));
        assert!(Compress::accepted(
            &get,
            &headers(&[("accept-encoding", "*")])
        ));
        assert!(!Compress::accepted(
            &get,
            &headers(&[("accept-encoding", "gzip;q=0")])
        ));
        assert!(!Compress::accepted(
            &get,
            &headers(&[("accept-encoding", "br")])
        ));
        assert!(!Compress::accepted(
            &Method::HEAD,
            &headers(&[("accept-encoding", "gzip")])
        ));

        let html = Compress {
            types: vec!["text/html".into()],
        };
        let ok = StatusCode::OK;
        assert!(html.applies(
            ok,
            &headers(&[("content-type", "text/html; charset=utf-8")])
        ));
        assert!(!html.applies(ok, &headers(&[("content-type", "text/plain")])));
        assert!(!html.applies(
            ok,
            &headers(&[("content-type", "text/html"), ("content-encoding", "br")])
        ));
        assert!(!html.applies(
            ok,
            &headers(&[
                ("content-type", "text/html"),
                ("cache-control", "public, no-transform")
            ])
        ));
        assert!(!html.applies(
            StatusCode::NOT_MODIFIED,
            &headers(&[("content-type", "text/html")])
        ));
        assert!(!html.applies(
            StatusCode::PARTIAL_CONTENT,
            &headers(&[("content-type", "text/html")])
        ));
        let default = Compress { types: vec![] };
        assert!(default.applies(ok, &headers(&[("content-type", "text/css")])));
        assert!(default.applies(ok, &headers(&[("content-type", "application/json")])));
        assert!(!default.applies(ok, &headers(&[("content-type", "image/png")])));
        assert!(!default.applies(ok, &headers(&[])));
    }

    #[test]
    fn a_compressed_response_loses_its_length_and_its_strong_tag() {
        let mut h = headers(&[("content-length", "10"), ("etag", "\"abc\"")]);
        Compress::mark(&mut h);
        assert!(h.get(CONTENT_LENGTH).is_none());
        assert_eq!(h[CONTENT_ENCODING], "gzip");
        assert_eq!(h[ETAG], "W/\"abc\"");
        assert_eq!(h[VARY], "Accept-Encoding");
    }
}
