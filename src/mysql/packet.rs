//! MySQL packets on a stream: mysql_common's framing (3-byte length, sequence id, payloads
//! over 16 MiB split into 0xFFFFFF-byte chunks) with a read buffer and a write buffer.
//!
//! Handshakes and waitless's own commands read and write whole packets (`read`, `send`). The
//! command phase does not: `forward` passes packets through as their bytes arrive, whole
//! reads at a time, and shows the relay only the start of each packet (`Head`) — no copy,
//! no re-framing, and a 64 MiB row never held whole.

use std::io;

use bytes::{Buf, BytesMut};
use mysql_common::constants::{CapabilityFlags, StatusFlags};
use mysql_common::io::ParseBuf;
use mysql_common::packets::{ErrPacket, ServerError, SqlState};
use mysql_common::proto::codec::{packet_to_chunks, ChunkDecoder, ChunkInfo};
use mysql_common::proto::MySerialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// One logical packet.
#[derive(Debug)]
pub struct Packet {
    /// Sequence id of its first chunk.
    pub seq: u8,
    /// The payload, all chunks joined.
    pub payload: BytesMut,
}

/// A stream read and written in MySQL packets.
#[derive(Debug)]
pub struct PacketIo<S> {
    /// The stream.
    io: S,
    /// Bytes read and not yet decoded.
    rbuf: BytesMut,
    /// Framed bytes not yet written.
    wbuf: BytesMut,
    /// Chunk decoder state, kept across partial reads.
    decoder: ChunkDecoder,
    /// The packet being assembled.
    partial: BytesMut,
    /// Sequence id of the first chunk of `partial`.
    first_seq: Option<u8>,
}

/// Largest packet accepted once a session is authenticated: MariaDB's and MySQL's own
/// upper bound for max_allowed_packet.
pub const MAX_PACKET: usize = 1 << 30;

/// Largest packet accepted before authentication: a handshake is a few hundred bytes, and an
/// unauthenticated peer must not make us allocate more.
pub const MAX_HANDSHAKE_PACKET: usize = 64 << 10;

/// Write buffer size past which queued packets are flushed before more are decoded.
const FLUSH_AT: usize = 256 << 10;

/// A chunk of this length is followed by another of the same packet.
const MAX_CHUNK: usize = 0xFF_FFFF;

/// How much of a packet's start `forward` shows by default: enough for every field the relay
/// reads (a column count, an OK's or EOF's status and warnings, a prepare OK's counts).
pub const PEEK: usize = 32;

/// The start of a packet passing through `forward`.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    /// Length of its first chunk (MAX_CHUNK for a packet of 16 MiB or more).
    pub len: usize,
    /// Its sequence id.
    pub seq: u8,
    /// Its first `min(len, peek)` payload bytes.
    pub bytes: &'a [u8],
}

/// What `forward` does after a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on with the next packet.
    Go,
    /// Return once this packet has been passed on whole.
    Stop,
}

/// Which side of a `forward` failed.
#[derive(Debug)]
pub enum Fault {
    /// Reading the source (or what it sent made no sense to the caller).
    From(io::Error),
    /// Writing to the destination.
    To(io::Error),
}

// === impl Packet ===

impl Packet {
    /// The first payload byte (the packet's kind), if any.
    pub fn head(&self) -> Option<u8> {
        self.payload.first().copied()
    }
}

// === impl PacketIo ===

impl<S: AsyncRead + AsyncWrite + Unpin> PacketIo<S> {
    pub fn new(io: S) -> PacketIo<S> {
        PacketIo {
            io,
            rbuf: BytesMut::with_capacity(16 << 10),
            wbuf: BytesMut::with_capacity(16 << 10),
            decoder: ChunkDecoder::default(),
            partial: BytesMut::new(),
            first_seq: None,
        }
    }

    /// The stream, for close handling.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The stream, for an idle check that may take in what arrived (TLS records).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// The same framing over what `f` makes of the stream (the stream moved elsewhere).
    pub fn try_map<E>(self, f: impl FnOnce(S) -> Result<S, E>) -> Result<PacketIo<S>, E> {
        let io = f(self.io)?;
        Ok(PacketIo { io, ..self })
    }

    /// The stream back; buffered bytes are dropped.
    pub fn into_inner(self) -> S {
        self.io
    }

    /// True when bytes arrived that no packet was asked for yet.
    pub fn has_buffered(&self) -> bool {
        !self.rbuf.is_empty() || self.first_seq.is_some()
    }

    /// The next packet; None at a clean EOF between packets.
    pub async fn read(&mut self, max: usize) -> io::Result<Option<Packet>> {
        loop {
            if let Some(p) = self.decode(max)? {
                return Ok(Some(p));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// As `read`, for a packet of one chunk, without reading a byte past it: for the packet
    /// after which the stream changes hands (an SSLRequest, its TLS handshake right behind).
    pub async fn read_alone(&mut self, max: usize) -> io::Result<Option<Packet>> {
        if self.has_buffered() {
            return self.read(max).await;
        }
        let mut head = [0u8; 4];
        match self.io.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let [a, b, c, seq] = head;
        let len = usize::from(a) | usize::from(b) << 8 | usize::from(c) << 16;
        if len > max || len == MAX_CHUNK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("packet of {len} bytes where at most {max} are expected"),
            ));
        }
        let mut payload = BytesMut::zeroed(len);
        self.io.read_exact(&mut payload).await?;
        Ok(Some(Packet { seq, payload }))
    }

    /// As `read`, flushing `other` before waiting for bytes, so that what was relayed so
    /// far reaches its peer while this side is slow.
    pub async fn read_relaying<T>(
        &mut self,
        max: usize,
        other: &mut PacketIo<T>,
    ) -> io::Result<Option<Packet>>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            if other.wbuf.len() < FLUSH_AT {
                if let Some(p) = self.decode(max)? {
                    return Ok(Some(p));
                }
            }
            other.flush().await?;
            if let Some(p) = self.decode(max)? {
                return Ok(Some(p));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Queues a packet for writing; returns the sequence id that follows it.
    pub fn queue(&mut self, seq: u8, mut payload: &[u8]) -> u8 {
        packet_to_chunks(seq, &mut payload, &mut self.wbuf)
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.io.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        self.io.flush().await
    }

    /// Queues and writes one packet; returns the sequence id that follows it.
    pub async fn send(&mut self, seq: u8, payload: &[u8]) -> io::Result<u8> {
        let next = self.queue(seq, payload);
        self.flush().await?;
        Ok(next)
    }

    /// Passes packets from this stream on to `to` unchanged, as their bytes arrive, calling
    /// `each` with the start of every packet (its first `peek` bytes buffered) until it says
    /// Stop and that packet is through. Bytes after it stay buffered here.
    pub async fn forward<T, F>(
        &mut self,
        to: &mut PacketIo<T>,
        peek: usize,
        mut each: F,
    ) -> Result<(), Fault>
    where
        T: AsyncRead + AsyncWrite + Unpin,
        F: FnMut(Head<'_>) -> io::Result<Flow>,
    {
        // Bytes of the current chunk not yet scanned, and whether another chunk of the same
        // packet follows it.
        let mut body = 0usize;
        let mut continued = false;
        let mut stop = false;
        if !to.wbuf.is_empty() {
            to.flush().await.map_err(Fault::To)?;
        }
        loop {
            let mut at = 0usize;
            let buf = &self.rbuf[..];
            loop {
                if body > 0 {
                    let take = body.min(buf.len() - at);
                    at += take;
                    body -= take;
                    if body > 0 {
                        break;
                    }
                }
                if stop && !continued {
                    break;
                }
                let Some(&[a, b, c, seq]) = buf.get(at..at + 4) else {
                    break;
                };
                let len = usize::from(a) | usize::from(b) << 8 | usize::from(c) << 16;
                if !continued {
                    let Some(bytes) = buf.get(at + 4..at + 4 + len.min(peek)) else {
                        break;
                    };
                    if each(Head { len, seq, bytes }).map_err(Fault::From)? == Flow::Stop {
                        stop = true;
                    }
                }
                at += 4;
                body = len;
                continued = len == MAX_CHUNK;
            }
            if let Some(scanned) = self.rbuf.get(..at).filter(|s| !s.is_empty()) {
                to.io.write_all(scanned).await.map_err(Fault::To)?;
                self.rbuf.advance(at);
            }
            if stop && body == 0 && !continued {
                return to.io.flush().await.map_err(Fault::To);
            }
            match self.fill().await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(Fault::From(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed before the packet ended",
                    )))
                }
                Err(e) => return Err(Fault::From(e)),
            }
        }
    }

    /// The first payload byte of the next packet (a command's code), left buffered; None at a
    /// clean EOF between packets. Cancel-safe: nothing read is lost.
    pub async fn next_head(&mut self) -> io::Result<Option<u8>> {
        loop {
            if let Some(&[_, _, _, _, code]) = self.rbuf.get(..5) {
                return Ok(Some(code));
            }
            if let Some(&[0, 0, 0, _]) = self.rbuf.get(..4) {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "empty packet"));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// The start of the next packet, left buffered: its first `limit` payload bytes (all of
    /// them if it is shorter), and whether that is the whole packet. Cancel-safe.
    pub async fn peek_packet(&mut self, limit: usize) -> io::Result<(&[u8], bool)> {
        let (want, complete) = loop {
            if let Some(&[a, b, c, _]) = self.rbuf.get(..4) {
                let len = usize::from(a) | usize::from(b) << 8 | usize::from(c) << 16;
                let want = len.min(limit);
                if self.rbuf.len() >= 4 + want {
                    break (want, len <= limit && len != MAX_CHUNK);
                }
            }
            if !self.fill().await? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before a packet",
                ));
            }
        };
        Ok((self.rbuf.get(4..4 + want).unwrap_or_default(), complete))
    }

    /// Waits until bytes arrive (or EOF); false at EOF. Cancel-safe: nothing read is lost.
    pub async fn readable(&mut self) -> io::Result<bool> {
        if !self.rbuf.is_empty() {
            return Ok(true);
        }
        self.fill().await
    }

    /// The bytes read and not yet used, and the stream: for passing a session through blind.
    pub fn parts(&mut self) -> (&mut S, BytesMut) {
        (&mut self.io, std::mem::take(&mut self.rbuf))
    }

    /// Decodes one packet from what was read, if it is all there.
    fn decode(&mut self, max: usize) -> io::Result<Option<Packet>> {
        loop {
            let info = self
                .decoder
                .decode(&mut self.rbuf, &mut self.partial, max)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            match info {
                None => return Ok(None),
                Some(ChunkInfo::Middle(seq)) => {
                    self.first_seq.get_or_insert(seq);
                }
                Some(ChunkInfo::Last(seq)) => {
                    let seq = self.first_seq.take().unwrap_or(seq);
                    let payload = std::mem::take(&mut self.partial);
                    return Ok(Some(Packet { seq, payload }));
                }
            }
        }
    }

    /// Reads more bytes; false at EOF with nothing pending, an error at EOF mid-packet.
    async fn fill(&mut self) -> io::Result<bool> {
        self.rbuf.reserve(16 << 10);
        let n = self.io.read_buf(&mut self.rbuf).await?;
        if n > 0 {
            return Ok(true);
        }
        if self.has_buffered() || !self.partial.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of a packet",
            ));
        }
        Ok(false)
    }
}

/// An ERR packet's payload, as a server words it (`#` and the SQLSTATE under protocol 4.1).
pub fn err_payload(code: u16, state: &[u8; 5], message: &str) -> Vec<u8> {
    let err = ErrPacket::Error(ServerError::new(
        code,
        Some(SqlState::new(*state)),
        message.as_bytes(),
    ));
    let mut buf = Vec::with_capacity(message.len() + 9);
    err.serialize(&mut buf);
    buf
}

/// An OK packet's payload: no rows affected, no insert id, `status`, no warnings.
pub fn ok_payload(status: u16) -> Vec<u8> {
    let [lo, hi] = status.to_le_bytes();
    vec![0x00, 0, 0, lo, hi, 0, 0]
}

/// An OK packet's status flags and warnings (header, affected rows, last insert id, status,
/// warnings).
pub fn ok_fields(p: &[u8]) -> Option<(StatusFlags, u16)> {
    let mut buf = ParseBuf(p.get(1..)?);
    buf.checked_eat_lenenc_int()?;
    buf.checked_eat_lenenc_int()?;
    let [s0, s1, w0, w1] = *buf.checked_eat(4)? else {
        return None;
    };
    Some((
        StatusFlags::from_bits_truncate(u16::from_le_bytes([s0, s1])),
        u16::from_le_bytes([w0, w1]),
    ))
}

/// The code and message of an ERR payload, for logs.
pub fn describe_err(payload: &[u8], caps: CapabilityFlags) -> String {
    let mut buf = ParseBuf(payload);
    match buf.parse::<ErrPacket<'_>>(caps) {
        Ok(ErrPacket::Error(e)) => format!("{} ({})", e.message_str(), e.error_code()),
        _ => "malformed ERR packet".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn packets_over_16_mib_reframe_to_the_same_bytes() {
        // 0xFFFFFF exactly needs an empty trailing chunk; one more byte a short one.
        for len in [0usize, 5, 0xFF_FFFF, 0xFF_FFFF + 1, 2 * 0xFF_FFFF] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut framed = BytesMut::new();
            let next = packet_to_chunks(7, &mut &payload[..], &mut framed);
            let wire = framed.to_vec();

            let (a, b) = tokio::io::duplex(1 << 20);
            let writer = tokio::spawn(async move {
                let mut a = a;
                a.write_all(&wire).await.unwrap();
                wire
            });
            let mut io = PacketIo::new(b);
            let p = io.read(MAX_PACKET).await.unwrap().unwrap();
            assert_eq!(p.seq, 7);
            assert_eq!(p.payload.len(), len);
            let wire = writer.await.unwrap();
            let mut again = PacketIo::new(std::io::Cursor::new(Vec::new()));
            assert_eq!(again.queue(p.seq, &p.payload), next);
            assert!(again.wbuf[..] == wire[..], "len {len}");
        }
    }

    #[tokio::test]
    async fn eof_mid_packet_is_an_error_and_between_packets_is_none() {
        let mut io = PacketIo::new(std::io::Cursor::new(vec![5u8, 0, 0, 0, 1, 2]));
        assert!(io.read(MAX_PACKET).await.is_err());
        let mut io = PacketIo::new(std::io::Cursor::new(vec![1u8, 0, 0, 3, 9]));
        let p = io.read(MAX_PACKET).await.unwrap().unwrap();
        assert_eq!((p.seq, &p.payload[..]), (3, &[9u8][..]));
        assert!(io.read(MAX_PACKET).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_packet_read_alone_leaves_what_follows_in_the_stream() {
        // An SSLRequest-sized packet, then the first bytes of a ClientHello.
        let mut bytes = vec![32u8, 0, 0, 1];
        bytes.extend([7u8; 32]);
        bytes.extend([0x16, 0x03, 0x01]);
        let mut io = PacketIo::new(std::io::Cursor::new(bytes));
        let p = io.read_alone(MAX_HANDSHAKE_PACKET).await.unwrap().unwrap();
        assert_eq!((p.seq, p.payload.len()), (1, 32));
        assert!(!io.has_buffered());
        assert_eq!(io.into_inner().position(), 36);
    }

    #[tokio::test]
    async fn oversized_packets_are_refused() {
        let mut io = PacketIo::new(std::io::Cursor::new(vec![0xFFu8, 0xFF, 0x00, 0]));
        assert!(io.read(MAX_HANDSHAKE_PACKET).await.is_err());
    }

    #[test]
    fn err_payload_reads_back() {
        let p = err_payload(1045, b"28000", "Access denied");
        assert_eq!(p[0], 0xFF);
        assert_eq!(
            describe_err(&p, CapabilityFlags::CLIENT_PROTOCOL_41),
            "Access denied (1045)"
        );
    }
}
