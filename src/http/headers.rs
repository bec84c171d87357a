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

/// Removes hop-by-hop headers, including those the Connection header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over their few names beats nine removals.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let mut values = headers.get_all(header::CONNECTION).iter().cloned();
    if let Some(first) = values.next() {
        // Cheap clones (shared bytes); `rest` allocates only for a repeated Connection header.
        let rest: Vec<HeaderValue> = values.collect();
        for value in std::iter::once(&first).chain(&rest) {
            let tokens = value.to_str().unwrap_or("").split(',');
            for name in tokens.filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok()) {
                headers.remove(name);
            }
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
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
    client.and_then(|ip| HeaderValue::from_str(&ip.to_string()).ok())
}

/// Appends the client's address (`forwarded_for`) to X-Forwarded-For and sets
/// X-Forwarded-Proto if absent (a load balancer in front that terminated TLS knows better).
pub fn add_forwarded(headers: &mut HeaderMap, client: Option<&HeaderValue>) {
    if let Some(ip) = client {
        let xff = HeaderName::from_static("x-forwarded-for");
        let value = match headers.get(&xff).and_then(|v| v.to_str().ok()) {
            Some(prior) if !prior.trim().is_empty() => {
                let joined = format!("{prior}, {}", ip.to_str().unwrap_or(""));
                HeaderValue::from_str(&joined).ok()
            }
            _ => Some(ip.clone()),
        };
        if let Some(v) = value {
            headers.insert(xff, v);
        }
    }
    let xfp = HeaderName::from_static("x-forwarded-proto");
    if !headers.contains_key(&xfp) {
        headers.insert(xfp, HeaderValue::from_static("http"));
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
