//! Header rewriting between the client and the pooled upstream connection.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

/// Headers that describe one hop, never the message (RFC 9110 §7.6.1, plus the
/// Proxy-Connection and Proxy-Auth* headers of older proxies).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// Built at compile time: `from_static` at run time validates the name on every request.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Removes hop-by-hop headers, including those the Connection header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none, or only `Connection: close` / `keep-alive` (every nginx
    // response does): find which of the list are present in one pass over the few names and
    // remove just those, rather than look each of the nine up.
    let mut present = 0u16;
    // A header literally named `close` (which `Connection: close` would name too).
    let mut close_header = false;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
        close_header |= name.as_str() == "close";
    }
    if present == 0 {
        return;
    }
    // Index 0 is Connection: the headers it names go too. `keep-alive` is on the list
    // already, and `close` names a header only in a hostile message; anything else is rare.
    if present & 1 != 0 && !only_close_or_keep_alive(headers) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .map(str::trim)
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive"))
            .filter(|t| close_header || !t.eq_ignore_ascii_case("close"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// True when the one Connection header is `close` or `keep-alive`, as nearly always: then it
/// names no header beyond the list (checked without splitting it into tokens).
fn only_close_or_keep_alive(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::CONNECTION).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => {
            let v = v.as_bytes();
            v.eq_ignore_ascii_case(b"keep-alive")
                || (v.eq_ignore_ascii_case(b"close") && !headers.contains_key("close"))
        }
        _ => false,
    }
}

/// True when the client asked to keep the connection open after this request.
pub fn wants_keep_alive(version: Version, headers: &HeaderMap) -> bool {
    let has_token = |token: &str| {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    match version {
        Version::HTTP_10 => has_token("keep-alive"),
        _ => !has_token("close"),
    }
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

/// Appends the client's address (`forwarded_for`) to X-Forwarded-For and sets
/// X-Forwarded-Proto if absent (a load balancer in front that terminated TLS knows better).
pub fn add_forwarded(headers: &mut HeaderMap, client: Option<&HeaderValue>) {
    if let Some(ip) = client {
        let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prior) if !prior.trim().is_empty() => {
                let joined = format!("{prior}, {}", ip.to_str().unwrap_or(""));
                HeaderValue::from_str(&joined).ok()
            }
            _ => Some(ip.clone()),
        };
        if let Some(v) = value {
            headers.insert(X_FORWARDED_FOR, v);
        }
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
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

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let ip = forwarded_for(Some("127.0.0.1".parse().unwrap()));
        add_forwarded(&mut h, ip.as_ref());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn keep_alive_defaults_by_version() {
        let h = HeaderMap::new();
        assert!(wants_keep_alive(Version::HTTP_11, &h));
        assert!(!wants_keep_alive(Version::HTTP_10, &h));
    }
}
