//! Checks on message heads that hyper's HTTP/1 parser lets through, made before anything is
//! forwarded or relayed.
//!
//! hyper's server already refuses, with 400 and a close, a malformed request line, method or
//! version (anything but HTTP/1.0 and 1.1; `HTTP/1.2` to `1.9` were rewritten as 1.1 by the
//! simple path before hyper saw them), header lines that are not `name: value` (no
//! colon, whitespace before it, NUL, bare CR, obs-fold), a missing, signed, non-numeric or
//! conflicting Content-Length, and a Transfer-Encoding whose last coding is not `chunked`
//! (or any in HTTP/1.0); with 431 more than 100 header fields or a head over `MAX_HEAD`
//! (which hyper's own 414 for a target over 64 KiB never gets to see). A request with both
//! Transfer-Encoding and Content-Length is read as chunked and the connection closed after
//! the response (RFC 9112 §6.1); the Content-Length never reaches the server.
//!
//! What is left is checked here, on the parsed head: allocation-free passes over a few
//! headers and the names, since it runs on every request hyper's server reads.

use http::header::{self, HeaderMap};
use http::request::Parts;
use http::{Method, StatusCode, Version};

/// Longest request target accepted (as nginx and Apache): a longer one gets 414.
pub const MAX_URI: usize = 8 * 1024;

/// Longest request head accepted, request line and header fields together: a longer one gets
/// 431. It also caps hyper's read buffer, so a client that never ends its head holds at most
/// this much memory.
pub const MAX_HEAD: usize = 64 * 1024;

/// The client's request body broke while it was being forwarded: a bad chunk size or chunk
/// framing, or the client went away before the end. The server got an incomplete request on
/// a connection that is then closed; the client gets this.
pub const BROKEN_BODY: Refusal = Refusal {
    status: StatusCode::BAD_REQUEST,
    reason: "malformed or incomplete request body",
};

/// Why a message is refused: the status the client gets and a short reason for the body
/// and the log (never the offending bytes themselves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// 400, 414 or 501.
    pub status: StatusCode,
    /// A fixed phrase.
    pub reason: &'static str,
}

/// Checks a request head; `max_uri` bounds the request target in bytes.
pub fn request(parts: &Parts, max_uri: usize) -> Result<(), Refusal> {
    if parts.method == Method::CONNECT {
        // A tunnel would turn a pooled connection into a private pipe.
        return Err(refuse(
            StatusCode::NOT_IMPLEMENTED,
            "CONNECT is not supported",
        ));
    }
    target(parts, max_uri)?;
    host(&parts.headers, parts.version)?;
    underscored_framing(&parts.headers)?;
    transfer_encoding(&parts.headers)
}

/// Checks the framing of an upstream response head beyond what its reader enforces (hyper's
/// client and `wire` refuse conflicting or invalid Content-Length themselves). `Err` names
/// the problem; the response becomes a 502 and its connection is dropped.
pub fn response(status: StatusCode, headers: &HeaderMap) -> Result<(), &'static str> {
    let te = headers.get_all(header::TRANSFER_ENCODING).iter();
    let has_length = headers.contains_key(header::CONTENT_LENGTH);
    response_framing(status, te.map(|v| v.as_bytes()), has_length)
}

/// The same, from a head's Transfer-Encoding values and whether it has a Content-Length.
pub fn response_framing<'a>(
    status: StatusCode,
    te: impl Iterator<Item = &'a [u8]>,
    has_length: bool,
) -> Result<(), &'static str> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // No upgrade is ever asked for (Upgrade is hop-by-hop and removed).
        return Err("unrequested 101 Switching Protocols");
    }
    let Some(codings) = codings(te) else {
        return Ok(());
    };
    if has_length {
        // RFC 9112 §6.3: a likely smuggling attempt; relaying either length is a guess.
        return Err("both Transfer-Encoding and Content-Length");
    }
    match codings {
        Codings::Chunked => Ok(()),
        // The coding would be stripped with the hop-by-hop header and the client would get
        // bytes it cannot decode.
        Codings::Other | Codings::ChunkedTwice => Err("Transfer-Encoding other than chunked"),
    }
}

/// The request target: its length and form (RFC 9112 §3.2).
fn target(parts: &Parts, max_uri: usize) -> Result<(), Refusal> {
    let uri = &parts.uri;
    let len = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    if len > max_uri {
        return Err(refuse(StatusCode::URI_TOO_LONG, "request target too long"));
    }
    match (uri.scheme_str(), uri.authority()) {
        // origin-form, or asterisk-form for OPTIONS only.
        (None, None) => {
            let path = uri.path();
            if path.starts_with('/') || (path == "*" && parts.method == Method::OPTIONS) {
                Ok(())
            } else {
                Err(refuse(StatusCode::BAD_REQUEST, "invalid request target"))
            }
        }
        // absolute-form; its authority becomes the forwarded Host, so it is held to the same
        // rule (no userinfo).
        (Some(scheme), Some(authority))
            if (scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https"))
                && is_valid_host(authority.as_str().as_bytes()) =>
        {
            Ok(())
        }
        // authority-form (CONNECT only) or a foreign scheme.
        _ => Err(refuse(StatusCode::BAD_REQUEST, "invalid request target")),
    }
}

/// Exactly one valid Host in HTTP/1.1, at most one in HTTP/1.0 (RFC 9112 §3.2).
fn host(headers: &HeaderMap, version: Version) -> Result<(), Refusal> {
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err(refuse(StatusCode::BAD_REQUEST, "more than one Host")),
        (None, None) if version == Version::HTTP_11 => Err(refuse(
            StatusCode::BAD_REQUEST,
            "HTTP/1.1 request without Host",
        )),
        (Some(h), None) if !is_valid_host(h.as_bytes()) => {
            Err(refuse(StatusCode::BAD_REQUEST, "invalid Host"))
        }
        _ => Ok(()),
    }
}

/// A name such as `Transfer_Encoding` or `Content_Length`, which a server that folds `_`
/// into `-` (CGI-style) reads as framing or as a hop-by-hop header: refused rather than
/// dropped, as any other ambiguous framing is, since no real client sends one and such a
/// server would frame the request (and the next one on its pooled connection) otherwise
/// than waitless did.
fn underscored_framing(headers: &HeaderMap) -> Result<(), Refusal> {
    let found = headers
        .keys()
        .any(|name| super::headers::is_underscored_framing(name.as_str().as_bytes()));
    if found {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "header name with `_` standing for a framing or hop-by-hop header",
        ));
    }
    Ok(())
}

/// hyper has made sure the last coding is `chunked`; anything else in the list is refused.
fn transfer_encoding(headers: &HeaderMap) -> Result<(), Refusal> {
    let te = headers.get_all(header::TRANSFER_ENCODING).iter();
    match codings(te.map(|v| v.as_bytes())) {
        None | Some(Codings::Chunked) => Ok(()),
        // RFC 9112 §6.1: a coding the server does not understand gets 501. It could not be
        // passed on either: Transfer-Encoding is hop-by-hop.
        Some(Codings::Other) => Err(refuse(
            StatusCode::NOT_IMPLEMENTED,
            "unsupported transfer coding",
        )),
        Some(Codings::ChunkedTwice) => Err(refuse(
            StatusCode::BAD_REQUEST,
            "chunked applied more than once",
        )),
    }
}

/// What a message's Transfer-Encoding fields add up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codings {
    /// Exactly one coding, `chunked`.
    Chunked,
    /// `chunked` more than once and nothing else.
    ChunkedTwice,
    /// Some coding other than `chunked`, or an empty list.
    Other,
}

/// What the Transfer-Encoding values `fields` add up to; None when there is none.
fn codings<'a>(fields: impl Iterator<Item = &'a [u8]>) -> Option<Codings> {
    let mut fields = fields.peekable();
    fields.peek()?;
    let mut chunked = 0usize;
    for field in fields {
        for coding in field.split(|&b| b == b',') {
            let coding = coding.trim_ascii();
            if coding.is_empty() {
                continue;
            }
            if !coding.eq_ignore_ascii_case(b"chunked") {
                return Some(Codings::Other);
            }
            chunked += 1;
        }
    }
    Some(match chunked {
        0 => Codings::Other,
        1 => Codings::Chunked,
        _ => Codings::ChunkedTwice,
    })
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2), or empty. No userinfo, no whitespace, no path.
pub fn is_valid_host(v: &[u8]) -> bool {
    if v.is_empty() {
        return true;
    }
    let (host, port) = if v.first() == Some(&b'[') {
        // IP-literal: an IPv6 address (or IPvFuture) in brackets.
        let Some(end) = v.iter().position(|&b| b == b']') else {
            return false;
        };
        let (literal, rest) = v.split_at(end + 1);
        let inner = literal.get(1..end).unwrap_or_default();
        let ok = !inner.is_empty()
            && inner
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b":.-_~".contains(&b));
        if !ok {
            return false;
        }
        (&[][..], rest)
    } else {
        match v.iter().rposition(|&b| b == b':') {
            Some(at) => v.split_at(at),
            None => (v, &[][..]),
        }
    };
    let host_ok = host
        .iter()
        .all(|&b| HOST_BYTES.get(usize::from(b)) == Some(&true));
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    host_ok && port_ok
}

/// The bytes of a reg-name host (RFC 3986 §3.2.2: unreserved, sub-delims and the `%` of
/// pct-encoded), as a table: every request's Host goes through it byte by byte. Built at
/// compile time, so an index out of range would fail the build, not a request.
#[allow(clippy::indexing_slicing)]
const HOST_BYTES: [bool; 256] = {
    let extra = b"-._~!$&'()*+,;=%";
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        table[extra[i] as usize] = true;
        i += 1;
    }
    table
};

fn refuse(status: StatusCode, reason: &'static str) -> Refusal {
    Refusal { status, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Request};

    fn parts(method: &str, target: &str, version: Version, headers: &[(&str, &str)]) -> Parts {
        let mut req = Request::builder()
            .method(method)
            .uri(target)
            .version(version);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(()).unwrap().into_parts().0
    }

    fn status(p: &Parts) -> Option<u16> {
        request(p, 8192).err().map(|r| r.status.as_u16())
    }

    #[test]
    fn ordinary_requests_pass() {
        let v11 = Version::HTTP_11;
        for (method, target, headers) in [
            ("GET", "/", vec![("host", "example.com")]),
            ("GET", "/a?b=c", vec![("host", "example.com:8080")]),
            ("GET", "/", vec![("host", "[::1]:80")]),
            ("GET", "/", vec![("host", "127.0.0.1")]),
            ("GET", "/", vec![("host", "")]),
            ("OPTIONS", "*", vec![("host", "a")]),
            ("GET", "http://a.example/x", vec![("host", "a.example")]),
            (
                "POST",
                "/",
                vec![("host", "a"), ("transfer-encoding", "Chunked")],
            ),
        ] {
            let p = parts(method, target, v11, &headers);
            assert_eq!(status(&p), None, "{method} {target} {headers:?}");
        }
        assert_eq!(status(&parts("GET", "/", Version::HTTP_10, &[])), None);
    }

    #[test]
    fn host_is_required_once_and_valid() {
        let v11 = Version::HTTP_11;
        assert_eq!(status(&parts("GET", "/", v11, &[])), Some(400));
        assert_eq!(
            status(&parts("GET", "/", v11, &[("host", "a"), ("host", "a")])),
            Some(400)
        );
        for bad in [
            "a b", "u@a", "a/b", "a:8x", "[::1", "[]", "a:123456", "[::1]x",
        ] {
            assert_eq!(
                status(&parts("GET", "/", v11, &[("host", bad)])),
                Some(400),
                "{bad}"
            );
        }
    }

    #[test]
    fn request_target_form_and_length() {
        let v11 = Version::HTTP_11;
        let h = [("host", "a")];
        assert_eq!(status(&parts("GET", "*", v11, &h)), Some(400));
        assert_eq!(status(&parts("GET", "a:80", v11, &h)), Some(400));
        assert_eq!(status(&parts("GET", "ftp://a/", v11, &h)), Some(400));
        assert_eq!(status(&parts("GET", "http://u@a/", v11, &h)), Some(400));
        assert_eq!(status(&parts("CONNECT", "a:443", v11, &h)), Some(501));
        let long = format!("/{}", "a".repeat(8192));
        assert_eq!(status(&parts("GET", &long, v11, &h)), Some(414));
        assert_eq!(status(&parts("GET", &long[..8192], v11, &h)), None);
    }

    #[test]
    fn only_a_single_chunked_coding_is_accepted() {
        let v11 = Version::HTTP_11;
        let te = |v: &str| {
            status(&parts(
                "POST",
                "/",
                v11,
                &[("host", "a"), ("transfer-encoding", v)],
            ))
        };
        assert_eq!(te("chunked"), None);
        assert_eq!(te(" chunked "), None);
        assert_eq!(te("gzip, chunked"), Some(501));
        assert_eq!(te("chunked, chunked"), Some(400));
        assert_eq!(te(","), Some(501));
        let two = parts(
            "POST",
            "/",
            v11,
            &[
                ("host", "a"),
                ("transfer-encoding", "gzip"),
                ("transfer-encoding", "chunked"),
            ],
        );
        assert_eq!(status(&two), Some(501));
    }

    #[test]
    fn underscored_framing_names_are_refused_other_underscored_names_pass() {
        let v11 = Version::HTTP_11;
        for name in [
            "transfer_encoding",
            "Content_Length",
            "keep_alive",
            "proxy_connection",
        ] {
            let p = parts("POST", "/", v11, &[("host", "a"), (name, "chunked")]);
            assert_eq!(status(&p), Some(400), "{name}");
        }
        let p = parts("GET", "/", v11, &[("host", "a"), ("x_api_key", "1")]);
        assert_eq!(status(&p), None);
    }

    #[test]
    fn upstream_framing_beyond_hyper_is_refused() {
        let mut h = HeaderMap::new();
        assert!(response(StatusCode::OK, &h).is_ok());
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        assert!(response(StatusCode::OK, &h).is_ok());
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        assert!(response(StatusCode::OK, &h).is_err());
        h.remove(header::CONTENT_LENGTH);
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
        assert!(response(StatusCode::OK, &h).is_err());
        assert!(response(StatusCode::SWITCHING_PROTOCOLS, &HeaderMap::new()).is_err());
    }
}
