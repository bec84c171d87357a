//! MySQL packets on a stream: mysql_common's framing (3-byte length, sequence id, payloads
//! over 16 MiB split into 0xFFFFFF-byte chunks) with a read buffer and a write buffer.
//!
//! A relayed packet is decoded whole and re-framed with its own first sequence id; the
//! protocol's splitting is canonical, so the bytes that leave are the bytes that came in.

use std::io;

use bytes::BytesMut;
use mysql_common::constants::CapabilityFlags;
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

/// The code and message of an ERR payload, for logs.
pub fn describe_err(payload: &[u8], caps: CapabilityFlags) -> String {
    let mut buf = mysql_common::io::ParseBuf(payload);
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
