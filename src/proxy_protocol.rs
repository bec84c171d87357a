//! PROXY protocol (v1 and v2): reading the header a load balancer sends first, and writing
//! one to servers, so the original client address survives the hop. Parsing and building
//! are the `ppp` crate's; this module only moves bytes and addresses.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ppp::v2::{Builder, Command, Protocol, Version};
use ppp::{HeaderResult, PartialResult};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::ProxyProtocol;

/// The longest header accepted: a v1 header is at most 107 bytes; v2 headers carrying TLVs
/// beyond this are refused rather than buffered.
const MAX_HEADER: usize = 1024;

/// The addresses a PROXY header carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The original client.
    pub source: SocketAddr,
    /// The address the client connected to.
    pub destination: SocketAddr,
}

/// Reads the PROXY header at the start of `stream`, consuming exactly its bytes (what
/// follows belongs to the protocol). `Ok(None)`: a valid header without addresses (v1
/// UNKNOWN, v2 LOCAL or a non-IP family): the connection's own addresses stand.
pub async fn read_header(stream: &TcpStream, within: Duration) -> io::Result<Option<Addresses>> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; MAX_HEADER];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .map_err(|_| invalid("no complete PROXY header in time"))??;
        if n == 0 {
            return Err(invalid("connection closed before the PROXY header"));
        }
        let seen = &buf[..n];
        let parsed = HeaderResult::parse(seen);
        if parsed.is_incomplete() {
            if n == buf.len() {
                return Err(invalid("PROXY header too long"));
            }
            // More bytes are on their way; peek returns at once while some are queued.
            tokio::time::sleep_until((Instant::now() + Duration::from_millis(2)).min(deadline))
                .await;
            continue;
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
            HeaderResult::V1(Err(e)) => return Err(invalid(&format!("bad PROXY v1 header: {e}"))),
            HeaderResult::V2(Err(e)) => return Err(invalid(&format!("bad PROXY v2 header: {e}"))),
        };
        consume(stream, len).await?;
        return Ok(addrs);
    }
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
async fn consume(stream: &TcpStream, mut len: usize) -> io::Result<()> {
    let mut sink = [0u8; MAX_HEADER];
    while len > 0 {
        stream.readable().await?;
        match stream.try_read(&mut sink[..len.min(MAX_HEADER)]) {
            Ok(0) => return Err(invalid("connection closed inside the PROXY header")),
            Ok(n) => len -= n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
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
            let bytes = encode(v, src, dst);
            let addrs = match HeaderResult::parse(&bytes) {
                HeaderResult::V1(Ok(h)) => v1_addresses(&h.addresses),
                HeaderResult::V2(Ok(h)) => v2_addresses(&h.addresses),
                other => panic!("{v:?}: {other:?}"),
            };
            assert_eq!(
                addrs,
                Some(Addresses {
                    source: src,
                    destination: dst
                })
            );
        }
        assert!(encode(ProxyProtocol::Off, src, dst).is_empty());
    }
}
