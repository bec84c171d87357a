//! PROXY protocol (v1 and v2): reading the header a load balancer sends first, and writing
//! one to servers, so the original client address survives the hop. Parsing and building
//! are the `ppp` crate's; this module only moves bytes and addresses.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ppp::v2::{Builder, Command, Protocol, Version};
use ppp::{HeaderResult, PartialResult};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::config::ProxyProtocol;
use crate::eager::EagerTcp;

/// The longest header accepted: a v1 header is at most 107 bytes; v2 headers carrying TLVs
/// beyond this are refused rather than buffered.
const MAX_HEADER: usize = 1024;

/// The longest v1 header, CRLF included (the spec's bound for a TCP6 line).
const V1_MAX: usize = 107;

/// The addresses a PROXY header carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The original client.
    pub source: SocketAddr,
    /// The address the client connected to.
    pub destination: SocketAddr,
}

/// What the first bytes of a connection hold, as far as a PROXY header goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A header may still complete: more bytes are needed.
    Incomplete,
    /// A whole header of `len` bytes (never more than were given). `addrs` is None for a
    /// valid header without addresses (v1 UNKNOWN, v2 LOCAL or a non-IP family).
    Header {
        len: usize,
        addrs: Option<Addresses>,
    },
}

/// Reads the PROXY header at the start of `stream`, consuming exactly its bytes (what
/// follows belongs to the protocol). `Ok(None)`: a valid header without addresses (v1
/// UNKNOWN, v2 LOCAL or a non-IP family): the connection's own addresses stand.
pub async fn read_header(stream: &mut EagerTcp, within: Duration) -> io::Result<Option<Addresses>> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; MAX_HEADER];
    loop {
        // Checked here too: once bytes are queued, peek is ready at once and timeout_at,
        // which polls it first, would never fire for a header that never completes.
        if Instant::now() >= deadline {
            return Err(invalid("no complete PROXY header in time"));
        }
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .map_err(|_| invalid("no complete PROXY header in time"))??;
        if n == 0 {
            return Err(invalid("connection closed before the PROXY header"));
        }
        let seen = buf.get(..n).unwrap_or_default();
        match parse_header(seen).map_err(|e| invalid(&e))? {
            Parsed::Incomplete => {
                // More bytes are on their way; peek returns at once while some are queued.
                tokio::time::sleep_until((Instant::now() + Duration::from_millis(2)).min(deadline))
                    .await;
            }
            Parsed::Header { len, addrs } => {
                consume(stream, len).await?;
                return Ok(addrs);
            }
        }
    }
}

/// Parses the PROXY header at the start of `bytes`, without I/O (read_header's parser, and
/// the fuzz target's). `MAX_HEADER` bytes or more without a whole header is an error.
pub fn parse_header(bytes: &[u8]) -> Result<Parsed, String> {
    // v1 is one line. ppp judges a line cut inside its last field as malformed ("…4242 8" is
    // a bad port), and ends a line at a bare CR: so the line is found here, up to its CRLF,
    // and ppp sees exactly that.
    if bytes.first() == Some(&b'P') {
        let window = bytes.get(..bytes.len().min(V1_MAX)).unwrap_or_default();
        let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
            let prefix = b"PROXY ";
            let could_be = bytes.starts_with(prefix) || prefix.starts_with(bytes);
            return match (could_be, bytes.len() >= V1_MAX) {
                (true, false) => Ok(Parsed::Incomplete),
                (true, true) => Err("PROXY v1 header without CRLF in 107 bytes".to_string()),
                (false, _) => Err("bad PROXY v1 header: no PROXY prefix".to_string()),
            };
        };
        let line = window.get(..end + 2).unwrap_or_default();
        return match ppp::v1::Header::try_from(line) {
            Ok(h) if h.header.len() == line.len() => Ok(Parsed::Header {
                len: line.len(),
                addrs: v1_addresses(&h.addresses),
            }),
            Ok(_) => Err("bad PROXY v1 header: bare CR".to_string()),
            Err(e) => Err(format!("bad PROXY v1 header: {e}")),
        };
    }
    let parsed = HeaderResult::parse(bytes);
    if parsed.is_incomplete() {
        if bytes.len() >= MAX_HEADER {
            return Err("PROXY header too long".to_string());
        }
        return Ok(Parsed::Incomplete);
    }
    let (len, addrs) = match parsed {
        HeaderResult::V1(Ok(h)) => (h.header.len(), v1_addresses(&h.addresses)),
        HeaderResult::V2(Ok(h)) => (
            h.len(),
            match h.command {
                Command::Local => None,
                Command::Proxy => v2_addresses(&h.addresses),
            },
        ),
        HeaderResult::V1(Err(e)) => return Err(format!("bad PROXY v1 header: {e}")),
        HeaderResult::V2(Err(e)) => return Err(format!("bad PROXY v2 header: {e}")),
    };
    // Consuming more than was seen would eat the protocol's own bytes.
    if len == 0 || len > bytes.len() {
        return Err(format!(
            "PROXY header length {len} does not fit the {} bytes received",
            bytes.len()
        ));
    }
    Ok(Parsed::Header { len, addrs })
}

/// The header announcing `source` → `destination`, in `version`; empty when off.
pub fn encode(version: ProxyProtocol, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = same_family(source, destination);
    match version {
        ProxyProtocol::Off => Vec::new(),
        ProxyProtocol::V1 => ppp::v1::Addresses::from((source, destination))
            .to_string()
            .into_bytes(),
        ProxyProtocol::V2 => Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Stream,
            (source, destination),
        )
        .build()
        .unwrap_or_default(),
    }
}

/// A v2 LOCAL header: the connection carries no client address (e.g. a unix-socket client).
pub fn encode_local() -> Vec<u8> {
    Builder::new(Version::Two | Command::Local, 0)
        .build()
        .unwrap_or_default()
}

/// Reads and drops exactly `len` bytes already seen by peek.
async fn consume(stream: &mut EagerTcp, mut len: usize) -> io::Result<()> {
    let mut sink = [0u8; MAX_HEADER];
    while len > 0 {
        let room = len.min(sink.len());
        match stream
            .read(sink.get_mut(..room).unwrap_or_default())
            .await?
        {
            0 => return Err(invalid("connection closed inside the PROXY header")),
            n => len -= n,
        }
    }
    Ok(())
}

fn v1_addresses(a: &ppp::v1::Addresses) -> Option<Addresses> {
    match a {
        ppp::v1::Addresses::Tcp4(a) => Some(Addresses {
            source: SocketAddr::new(a.source_address.into(), a.source_port),
            destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
        }),
        ppp::v1::Addresses::Tcp6(a) => Some(Addresses {
            source: SocketAddr::new(a.source_address.into(), a.source_port),
            destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
        }),
        ppp::v1::Addresses::Unknown => None,
    }
}

fn v2_addresses(a: &ppp::v2::Addresses) -> Option<Addresses> {
    match a {
        ppp::v2::Addresses::IPv4(a) => Some(Addresses {
            source: SocketAddr::new(a.source_address.into(), a.source_port),
            destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
        }),
        ppp::v2::Addresses::IPv6(a) => Some(Addresses {
            source: SocketAddr::new(a.source_address.into(), a.source_port),
            destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
        }),
        _ => None,
    }
}

/// Both addresses in one family (a header has one): IPv4 is mapped into IPv6 when mixed.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |s: SocketAddr| match s.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), s.port()),
        IpAddr::V6(_) => s,
    };
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        (v6(a), v6(b))
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_through_the_parser() {
        let src: SocketAddr = "192.0.2.7:4242".parse().unwrap();
        let dst: SocketAddr = "127.0.0.1:80".parse().unwrap();
        for v in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let mut bytes = encode(v, src, dst);
            let len = bytes.len();
            bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
            assert_eq!(
                parse_header(&bytes),
                Ok(Parsed::Header {
                    len,
                    addrs: Some(Addresses {
                        source: src,
                        destination: dst
                    })
                }),
                "{v:?}"
            );
            // Every cut short of the whole header waits for more.
            for cut in 1..len {
                assert_eq!(
                    parse_header(&bytes[..cut]),
                    Ok(Parsed::Incomplete),
                    "{v:?} {cut}"
                );
            }
        }
        assert!(encode(ProxyProtocol::Off, src, dst).is_empty());
        assert_eq!(
            parse_header(&encode_local()),
            Ok(Parsed::Header {
                len: 16,
                addrs: None
            })
        );
    }

    /// Inputs the proxy_header fuzz target (fuzz/fuzz_targets/proxy_header.rs) failed on.
    #[test]
    fn fuzz_crashers_parse_the_same_with_or_without_what_follows() {
        // "PROXY UNKNOWN" with a bare CR before the CRLF: ppp ended the header at the CR, so
        // the header alone (34 bytes) and the header with what followed disagreed.
        let crasher = b"PROXY UNKNOWN \0\0\0  \0\0\0OO\0\nXY \n  \rY\0(\r\n\n\n\n\n";
        assert!(parse_header(crasher).is_err());
        assert_eq!(parse_header(&crasher[..34]), Ok(Parsed::Incomplete));
        // A v1 header with junk after UNKNOWN is valid: the rest of the line is ignored.
        assert_eq!(
            parse_header(b"PROXY UNKNOWN whatever\r\nGET"),
            Ok(Parsed::Header {
                len: 24,
                addrs: None
            })
        );
    }

    #[tokio::test]
    async fn a_header_that_never_completes_times_out() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(b"PROXY TCP4 192.0.2.1").await.unwrap();
        let mut server = EagerTcp::new(server.into_std().unwrap());
        let read = read_header(&mut server, Duration::from_millis(200));
        let r = tokio::time::timeout(Duration::from_secs(3), read).await;
        assert!(matches!(r, Ok(Err(_))), "{r:?}");
    }

    #[test]
    fn malformed_headers_are_errors() {
        for bad in [
            &b"GARBAGE that is no PROXY header\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 999.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            assert!(
                parse_header(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // A v1 line that never ends is refused once it is longer than any valid one.
        let endless = [b'P', b'R', b'O', b'X', b'Y', b' '].repeat(200);
        assert!(parse_header(&endless).is_err());
        // A v2 header claiming more address bytes than any buffer holds.
        let mut v2 = encode(
            ProxyProtocol::V2,
            "192.0.2.7:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        v2[14] = 0xff;
        v2[15] = 0xff;
        assert_eq!(parse_header(&v2), Ok(Parsed::Incomplete));
        v2.resize(MAX_HEADER, 0);
        assert!(parse_header(&v2).is_err());
    }
}
