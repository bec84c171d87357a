//! Header rewriting between the client and the pooled upstream connection.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

/// Built at compile time: `from_static` at run time validates the name on every request.
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static CLOSE: HeaderName = HeaderName::from_static("close");

/// What a message's Connection headers say: whether they ask to close or keep alive, and
/// which further headers they name (hop-by-hop too).
#[derive(Debug, Default)]
pub struct Named {
    /// `close`. It names a header only in a hostile message, but then that header goes too.
    pub close: bool,
    /// `keep-alive` (what an HTTP/1.0 peer must say to keep the connection).
    pub keep_alive: bool,
    /// Any other; nearly always none.
    pub others: Vec<HeaderName>,
}

// === impl Named ===

impl Named {
    /// What the Connection headers say, in one lookup.
    pub fn of(headers: &HeaderMap) -> Named {
        let mut named = Named::default();
        for value in headers.get_all(header::CONNECTION) {
            named.note(value.as_bytes());
        }
        named
    }

    /// Adds what one Connection header value says.
    pub fn note(&mut self, value: &[u8]) {
        for token in value.split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if let Ok(name) = HeaderName::from_bytes(token) {
                self.others.push(name);
            }
        }
    }

    /// The peer keeps the connection open after this message.
    pub fn keeps_alive(&self, version: Version) -> bool {
        match version {
            Version::HTTP_10 => self.keep_alive,
            _ => !self.close,
        }
    }

    /// Removes the headers named (nothing to do, and no lookup, in the common case).
    pub fn remove_from(&self, headers: &mut HeaderMap) {
        if self.close {
            headers.remove(&CLOSE);
        }
        for name in &self.others {
            headers.remove(name);
        }
    }

    fn contains(&self, name: &HeaderName) -> bool {
        (self.close && *name == CLOSE) || self.others.contains(name)
    }

    /// The same for a name as it came, in any case.
    pub fn names(&self, raw: &[u8]) -> bool {
        (self.close && raw.eq_ignore_ascii_case(b"close"))
            || self
                .others
                .iter()
                .any(|n| raw.eq_ignore_ascii_case(n.as_str().as_bytes()))
    }
}

/// A header name in lower case, for telling apart the ones waitless treats specially (none
/// is longer than `buf`); a longer name comes back empty, as none of them.
pub fn lower<'b>(name: &[u8], buf: &'b mut [u8; 24]) -> &'b [u8] {
    match buf.get_mut(..name.len()) {
        Some(lower) => {
            for (l, b) in lower.iter_mut().zip(name) {
                *l = b.to_ascii_lowercase();
            }
            lower
        }
        None => &[],
    }
}

/// True for the headers that describe one hop (not counting those Connection names).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    is_hop_by_hop_name(name.as_str().as_bytes())
}

/// The same for a name in lower case (`lower`).
pub fn is_hop_by_hop_name(lower: &[u8]) -> bool {
    // By text, which the compiler sorts by length first: cheaper than nine name compares,
    // for every header of every message.
    matches!(
        lower,
        b"connection"
            | b"keep-alive"
            | b"proxy-connection"
            | b"te"
            | b"trailer"
            | b"transfer-encoding"
            | b"upgrade"
            | b"proxy-authenticate"
            | b"proxy-authorization"
    )
}

/// The names that fold to a framing or hop-by-hop header when a server reads `_` as `-`
/// (CGI and the frameworks built like it: `HTTP_TRANSFER_ENCODING` for either spelling),
/// in lower case. Each name they stand for has one `-`, so each has one such spelling.
const UNDERSCORED_FRAMING: [&[u8]; 6] = [
    b"content_length",
    b"transfer_encoding",
    b"keep_alive",
    b"proxy_connection",
    b"proxy_authenticate",
    b"proxy_authorization",
];

/// True for a name, in lower case (`lower`), that a server folding `_` into `-` reads as
/// Content-Length, Transfer-Encoding or a hop-by-hop header: such a server would frame the
/// request, or treat the connection, otherwise than waitless did.
pub fn is_underscored_framing(lower: &[u8]) -> bool {
    // Only names of these lengths can be one: the common ones cost a length compare.
    matches!(lower.len(), 10 | 14 | 16..=19) && UNDERSCORED_FRAMING.contains(&lower)
}

/// Removes hop-by-hop headers, including those the Connection header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named = Named::of(headers);
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for name in hop {
        headers.remove(name);
    }
    named.remove_from(headers);
}

/// The request's headers as they go upstream, each given to `emit`: hop-by-hop headers, the
/// ones Connection names and Expect (hyper's server answered it) are left out; the client's
/// address (`forwarded_for`) is appended to X-Forwarded-For, and X-Forwarded-Proto is added
/// if absent (a load balancer in front that terminated TLS knows better).
pub fn forward_request(
    headers: &HeaderMap,
    client: Option<&HeaderValue>,
    rules: Rules,
    mut emit: impl FnMut(&HeaderName, &HeaderValue),
) {
    let named = Named::of(headers);
    let mut forwarding = Forwarding::new(client, rules);
    for (name, value) in headers {
        let name_bytes = name.as_str().as_bytes();
        if forwarding.keeps(name_bytes, name_bytes, value.as_bytes()) && !named.contains(name) {
            emit(name, value);
        }
    }
    forwarding.finish(emit);
}

/// The listener's and the connection's part in how a request's fields go upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rules {
    /// `drop_underscore_headers`: names with `_` are left out.
    pub drop_underscored: bool,
    /// The client came over TLS: X-Forwarded-Proto is `https`, whatever the client said
    /// (waitless terminated its TLS and knows).
    pub https: bool,
}

/// The rules a request's fields go upstream by, for a map (`forward_request`) or for the
/// fields as they came (the simple path): one field at a time, then the fields added last.
#[derive(Debug)]
pub struct Forwarding<'a> {
    /// The client's address for X-Forwarded-For, if it is to be added.
    client: Option<&'a HeaderValue>,
    /// The X-Forwarded-For the request came with (the first one: a single-valued header).
    prior_for: Option<&'a [u8]>,
    /// The request came with an X-Forwarded-Proto.
    has_proto: bool,
    /// The listener's and the connection's rules.
    rules: Rules,
}

// === impl Forwarding ===

impl<'a> Forwarding<'a> {
    pub fn new(client: Option<&'a HeaderValue>, rules: Rules) -> Forwarding<'a> {
        Forwarding {
            client,
            prior_for: None,
            has_proto: false,
            rules,
        }
    }

    /// Whether a field, by its name as it came (`raw`) and in lower case (`lower`, empty
    /// for a long name), goes upstream as it came (those Connection names aside); notes the
    /// X-Forwarded ones.
    pub fn keeps(&mut self, raw: &[u8], lower: &[u8], value: &'a [u8]) -> bool {
        if is_hop_by_hop_name(lower) || lower == b"expect" {
            return false;
        }
        if self.rules.drop_underscored && raw.contains(&b'_') {
            return false;
        }
        if self.client.is_some() && lower == b"x-forwarded-for" {
            self.prior_for.get_or_insert(value);
            return false;
        }
        if lower == b"x-forwarded-proto" {
            if self.rules.https {
                return false;
            }
            self.has_proto = true;
        }
        true
    }

    /// Gives `emit` the fields added last: X-Forwarded-For with the client's address
    /// appended, and X-Forwarded-Proto when the request had none.
    pub fn finish(self, mut emit: impl FnMut(&HeaderName, &HeaderValue)) {
        if let Some(ip) = self.client {
            let joined = self
                .prior_for
                .and_then(prior_forwarded_for)
                .and_then(|text| {
                    let joined = [text, b", ", ip.as_bytes()].concat();
                    HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)).ok()
                });
            emit(&X_FORWARDED_FOR, joined.as_ref().unwrap_or(ip));
        }
        if self.rules.https {
            emit(&X_FORWARDED_PROTO, &HeaderValue::from_static("https"));
        } else if !self.has_proto {
            emit(&X_FORWARDED_PROTO, &HeaderValue::from_static("http"));
        }
    }
}

/// The X-Forwarded-For chain a request came with, when it is one to extend: text, not all
/// blank (an unreadable one is replaced by the client's address alone).
fn prior_forwarded_for(value: &[u8]) -> Option<&[u8]> {
    let text = value
        .iter()
        .all(|&b| b == b'\t' || (b' '..0x7f).contains(&b));
    (text && !value.trim_ascii().is_empty()).then_some(value)
}

/// True when the peer keeps the connection open after this message.
pub fn wants_keep_alive(version: Version, headers: &HeaderMap) -> bool {
    Named::of(headers).keeps_alive(version)
}

/// The client's address as a header value, made once per connection: cloning it for each
/// request costs no formatting and no allocation.
pub fn forwarded_for(client: Option<IpAddr>) -> Option<HeaderValue> {
    match client? {
        // Digits by hand: `to_string` goes through the formatting machinery, a thousand
        // instructions, once per short connection.
        IpAddr::V4(ip) => {
            let mut text = Vec::with_capacity(15);
            for (i, octet) in ip.octets().into_iter().enumerate() {
                if i > 0 {
                    text.push(b'.');
                }
                if octet >= 100 {
                    text.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    text.push(b'0' + octet / 10 % 10);
                }
                text.push(b'0' + octet % 10);
            }
            HeaderValue::from_maybe_shared(bytes::Bytes::from(text)).ok()
        }
        ip @ IpAddr::V6(_) => HeaderValue::from_str(&ip.to_string()).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get("x-kept").is_some());
    }

    #[test]
    fn repeated_connection_headers_all_count() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("x-one"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-two"));
        h.insert("x-one", HeaderValue::from_static("1"));
        h.insert("x-two", HeaderValue::from_static("2"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-one").is_none());
        assert!(h.get("x-two").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get("x-kept").is_some());
    }

    #[test]
    fn connection_close_and_keep_alive_remove_what_they_name_and_nothing_else() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Keep-Alive, CLOSE"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let mut named = h.clone();
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
        // A header that is really named `close` goes too, as Connection names it.
        named.insert("close", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut named);
        let left: Vec<&str> = named.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn forwarded_for_writes_every_address_as_its_text() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "192.168.100.255",
            "9.99.100.199",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            let v = forwarded_for(Some(ip.parse().unwrap())).unwrap();
            assert_eq!(v.to_str().unwrap(), ip);
        }
        assert!(forwarded_for(None).is_none());
    }

    fn forwarded(h: &HeaderMap, ip: Option<&str>) -> Vec<(String, String)> {
        let ip = forwarded_for(ip.map(|ip| ip.parse().unwrap()));
        let mut out = Vec::new();
        forward_request(h, ip.as_ref(), Rules::default(), |name, value| {
            out.push((name.to_string(), value.to_str().unwrap().to_string()))
        });
        out
    }

    #[test]
    fn forwarded_for_appends_and_proto_is_added_once() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert(header::HOST, HeaderValue::from_static("a"));
        let out = forwarded(&h, Some("127.0.0.1"));
        let want = [
            ("host", "a"),
            ("x-forwarded-for", "10.0.0.1, 127.0.0.1"),
            ("x-forwarded-proto", "http"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(out, want);
        // A proto set in front stays; without a client address the chain is left alone.
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let out = forwarded(&h, None);
        assert!(out.contains(&("x-forwarded-for".into(), "10.0.0.1".into())));
        assert!(out.contains(&("x-forwarded-proto".into(), "https".into())));
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn forwarded_requests_lose_hop_by_hop_named_and_expect_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("close", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let names: Vec<String> = forwarded(&h, None).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["x-kept", "x-forwarded-proto"]);
    }

    #[test]
    fn underscored_framing_names_are_exactly_the_folds_of_framing_and_hop_by_hop_ones() {
        let framing = [
            "content-length",
            "transfer-encoding",
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "upgrade",
            "proxy-authenticate",
            "proxy-authorization",
        ];
        // Every spelling with `_` for some `-`, and nothing else.
        let mut folds = Vec::new();
        for name in framing {
            let dashes: Vec<usize> = name.match_indices('-').map(|(i, _)| i).collect();
            for mask in 1..(1u32 << dashes.len()) {
                let mut v = name.as_bytes().to_vec();
                for (bit, &at) in dashes.iter().enumerate() {
                    if mask & (1 << bit) != 0 {
                        v[at] = b'_';
                    }
                }
                folds.push(v);
            }
        }
        for f in &folds {
            assert!(is_underscored_framing(f), "{}", String::from_utf8_lossy(f));
        }
        assert_eq!(folds.len(), UNDERSCORED_FRAMING.len());
        for other in [
            "user_agent",
            "x_forwarded_for",
            "content-length",
            "te",
            "content_type",
        ] {
            assert!(!is_underscored_framing(other.as_bytes()), "{other}");
        }
    }

    #[test]
    fn underscored_names_are_dropped_only_when_asked() {
        let mut h = HeaderMap::new();
        h.insert("x_api_key", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let names = |drop| {
            let mut out = Vec::new();
            let rules = Rules {
                drop_underscored: drop,
                https: false,
            };
            forward_request(&h, None, rules, |name, _| out.push(name.to_string()));
            out
        };
        assert_eq!(names(false), ["x_api_key", "x-kept", "x-forwarded-proto"]);
        assert_eq!(names(true), ["x-kept", "x-forwarded-proto"]);
    }

    #[test]
    fn keep_alive_defaults_by_version() {
        let h = HeaderMap::new();
        assert!(wants_keep_alive(Version::HTTP_11, &h));
        assert!(!wants_keep_alive(Version::HTTP_10, &h));
    }
}
