//! The config's small languages: durations (`"1.5s"`), file modes (`"0660"`), addresses
//! (`HOST:PORT`, `[V6]:PORT`, `unix:/path`) and the words of its enums. Each is parsed and
//! printed here, in pairs, so that whatever is printed parses back to the same value.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{
    Address, Balance, CheckKind, ClientTimeWait, Endpoint, LingerFallback, Pooling, Protocol,
    ProxyProtocol, UpstreamTimeWait,
};

/// An enum that the config spells as one of a few lowercase words.
pub(super) trait Keyword: Copy + PartialEq + 'static {
    /// Every spelling and its value, in the order messages list them.
    const WORDS: &'static [(&'static str, Self)];
}

/// Parses a duration: a decimal number and a unit (`ns`, `us`, `ms`, `s`, `m`, `h`),
/// e.g. `"500ms"`, `"2s"`, `"1.5m"`. The error says what is wrong, without the input.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const EXPECTED_UNITS: &str = "expected ms, s, m or h";
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit_nanos: u128 = match unit.trim_start() {
        "ns" => 1,
        "us" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "" => return Err(format!("no unit, {EXPECTED_UNITS}")),
        other => return Err(format!("unknown unit `{other}`, {EXPECTED_UNITS}")),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err("expected a number before the unit".to_string());
    }
    let too_large = || "too large".to_string();
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_large())?
    };
    // Digits past the 15th are below a nanosecond even for hours; dropping them keeps the
    // arithmetic inside u128.
    let fraction: String = fraction.chars().take(15).collect();
    let scale = 10u128.pow(fraction.len() as u32);
    let fraction: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| too_large())?
    };
    let nanos = whole
        .checked_mul(unit_nanos)
        .and_then(|n| n.checked_add(fraction * unit_nanos / scale))
        .ok_or_else(too_large)?;
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| too_large())?;
    Ok(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

/// Formats a duration in the largest unit that keeps it exact (`"90s"`, `"10m"`,
/// `"1500ms"`), so that [`parse_duration`] reads back the same value.
pub fn format_duration(duration: Duration) -> String {
    const UNITS: [(&str, u128); 6] = [
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
        ("ns", 1),
    ];
    let nanos = duration.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    let (unit, size) = UNITS
        .iter()
        .find(|(_, size)| nanos.is_multiple_of(*size))
        .unwrap_or(&("ns", 1));
    format!("{}{unit}", nanos / size)
}

/// Parses `HOST:PORT`, `[V6]:PORT` or `unix:/path` as written; a host name is kept as a name
/// for the resolve step, whose errors would not say what is wrong with the shape.
pub fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    if let Some(name) = text.strip_prefix("systemd:") {
        if name.is_empty() || name.contains(':') {
            return Err(
                "`systemd:` needs the socket's FileDescriptorName=, e.g. systemd:web".to_string(),
            );
        }
        return Ok(Endpoint::Systemd(name.to_string()));
    }
    if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("`unix:` needs a socket path, e.g. unix:/run/waitless.sock".to_string());
        }
        return Ok(Endpoint::Unix(PathBuf::from(path)));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(Endpoint::Ip(addr));
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!(
            "`{text}` is not HOST:PORT, [V6]:PORT or unix:/path"
        ));
    };
    let Ok(port) = port.parse::<u16>() else {
        return Err(format!(
            "`{text}` has no valid port (expected HOST:PORT with PORT 0-65535)"
        ));
    };
    if host.is_empty() {
        return Err(format!(
            "`{text}` has no host (use 0.0.0.0:{port} for all interfaces)"
        ));
    }
    if host.starts_with('[') || host.contains(':') {
        return Err(format!(
            "`{text}` is not a valid IPv6 address (expected [V6]:PORT)"
        ));
    }
    Ok(Endpoint::Name {
        host: host.to_string(),
        port,
    })
}

/// Parses an octal file mode such as `"0660"` (a leading `0o` is allowed).
pub fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    let octal = !digits.is_empty() && digits.bytes().all(|b| (b'0'..=b'7').contains(&b));
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if octal && mode <= 0o7777 => Ok(mode),
        _ => Err(format!(
            "`{text}` is not an octal file mode such as \"0660\""
        )),
    }
}

/// The word a [`Keyword`] value is spelled with.
fn word_of<T: Keyword>(value: T) -> &'static str {
    T::WORDS
        .iter()
        .find(|(_, v)| *v == value)
        .map_or("?", |(word, _)| word)
}

// === impl Address, Endpoint ===

/// The config spelling: `127.0.0.1:80`, `[::1]:80` or `unix:/path`.
impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(addr) => write!(f, "{addr}"),
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Systemd(name) => write!(f, "systemd:{name}"),
        }
    }
}

/// The config spelling, as [`parse_endpoint`] reads it: `127.0.0.1:80`, `db.internal:3306`,
/// `unix:/path`.
impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Ip(addr) => write!(f, "{addr}"),
            Endpoint::Name { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Systemd(name) => write!(f, "systemd:{name}"),
        }
    }
}

// === impl Protocol, ClientTimeWait, LingerFallback, UpstreamTimeWait, ... ===

impl Keyword for Protocol {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("http", Protocol::Http),
        ("tcp", Protocol::Tcp),
        ("mysql", Protocol::Mysql),
    ];
}

impl Keyword for ClientTimeWait {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("client", ClientTimeWait::Client),
        ("proxy", ClientTimeWait::Proxy),
        ("none", ClientTimeWait::None),
    ];
}

impl Keyword for LingerFallback {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("fin", LingerFallback::Fin),
        ("reset", LingerFallback::Reset),
    ];
}

impl Keyword for UpstreamTimeWait {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("proxy", UpstreamTimeWait::Proxy),
        ("none", UpstreamTimeWait::None),
    ];
}

impl Keyword for Balance {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("round_robin", Balance::RoundRobin),
        ("least_conn", Balance::LeastConn),
    ];
}

impl Keyword for CheckKind {
    const WORDS: &'static [(&'static str, Self)] =
        &[("tcp", CheckKind::Tcp), ("http", CheckKind::Http)];
}

impl Keyword for crate::access::Format {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("json", crate::access::Format::Json),
        ("text", crate::access::Format::Text),
    ];
}

/// The config word, `json` or `text`.
impl fmt::Display for crate::access::Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(word_of(*self))
    }
}

impl Keyword for Pooling {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("session", Pooling::Session),
        ("transaction", Pooling::Transaction),
    ];
}

/// The config word, `session` or `transaction`.
impl fmt::Display for Pooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(word_of(*self))
    }
}

impl Keyword for ProxyProtocol {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("off", ProxyProtocol::Off),
        ("v1", ProxyProtocol::V1),
        ("v2", ProxyProtocol::V2),
    ];
}

/// The config word, e.g. `least_conn`.
impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(word_of(*self))
    }
}

/// The config word, e.g. `http`.
impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(word_of(*self))
    }
}

/// The config word, e.g. `v2`.
impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(word_of(*self))
    }
}

/// The config word, e.g. `mysql`; also suits metric labels.
impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(word_of(*self))
    }
}

/// The config word, e.g. `client`.
impl fmt::Display for ClientTimeWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(word_of(*self))
    }
}

/// The config word, e.g. `reset`.
impl fmt::Display for LingerFallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(word_of(*self))
    }
}

/// The config word, e.g. `proxy`.
impl fmt::Display for UpstreamTimeWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(word_of(*self))
    }
}
