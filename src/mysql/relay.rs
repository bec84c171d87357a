//! The command phase: a client command goes to its borrowed server connection and the
//! response comes back packet for packet, unchanged. The state machine only finds where a
//! response ends — result sets (column count, column definitions, EOF or OK terminators
//! under CLIENT_DEPRECATE_EOF, rows), more results (SERVER_MORE_RESULTS_EXISTS), prepared
//! statement replies, LOCAL INFILE uploads — so that the connection is known to be idle, and
//! so resettable, between commands.

use std::io;

use mysql_common::constants::{CapabilityFlags, StatusFlags};
use mysql_common::io::ParseBuf;
use mysql_common::packets::{
    CommonOkPacket, OkPacketDeserializer, OldEofPacket, ResultSetTerminator, StmtPacket,
};
use tokio::io::{AsyncRead, AsyncWrite};

use super::packet::{Packet, PacketIo, MAX_PACKET};

/// What the response to a command looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// No response (COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA).
    Nothing,
    /// One packet: OK, ERR, EOF or a string (COM_STATISTICS).
    One,
    /// Result sets, OKs or LOCAL INFILE requests, chained by SERVER_MORE_RESULTS_EXISTS
    /// (COM_QUERY, COM_STMT_EXECUTE).
    Results,
    /// COM_STMT_PREPARE: OK with parameter and column definitions, or ERR.
    Prepare,
    /// Column definitions up to a terminator (COM_FIELD_LIST).
    Columns,
    /// Rows up to a terminator (COM_STMT_FETCH).
    Rows,
}

/// How a relayed command ended.
#[derive(Debug)]
pub struct Reply {
    /// The head byte of the response's first packet (0x00 OK, 0xFF ERR, ...), if any.
    pub head: Option<u8>,
}

pub const COM_QUIT: u8 = 0x01;
pub const COM_INIT_DB: u8 = 0x02;
pub const COM_QUERY: u8 = 0x03;
pub const COM_SET_OPTION: u8 = 0x1B;

// === impl Shape ===

impl Shape {
    /// The response shape of a command the relay passes through; None for commands it
    /// answers itself or refuses (COM_QUIT, COM_CHANGE_USER, replication, unknown ones).
    pub fn of(command: u8) -> Option<Shape> {
        Some(match command {
            // COM_QUERY, COM_PROCESS_INFO, COM_STMT_EXECUTE
            0x03 | 0x0A | 0x17 => Shape::Results,
            // COM_STMT_PREPARE
            0x16 => Shape::Prepare,
            // COM_FIELD_LIST
            0x04 => Shape::Columns,
            // COM_STMT_FETCH
            0x1C => Shape::Rows,
            // COM_STMT_SEND_LONG_DATA, COM_STMT_CLOSE
            0x18 | 0x19 => Shape::Nothing,
            // COM_INIT_DB, COM_CREATE_DB, COM_DROP_DB, COM_REFRESH, COM_SHUTDOWN,
            // COM_STATISTICS, COM_PROCESS_KILL, COM_DEBUG, COM_PING, COM_STMT_RESET,
            // COM_SET_OPTION, COM_RESET_CONNECTION
            0x02 | 0x05 | 0x06 | 0x07 | 0x08 | 0x09 | 0x0C | 0x0D | 0x0E | 0x1A | 0x1B | 0x1F => {
                Shape::One
            }
            _ => return None,
        })
    }
}

/// Sends `cmd` to the server and relays its whole response to the client.
pub async fn command<C, S>(
    client: &mut PacketIo<C>,
    server: &mut PacketIo<S>,
    cmd: &Packet,
    shape: Shape,
    caps: CapabilityFlags,
) -> io::Result<Reply>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    server.send(cmd.seq, &cmd.payload).await?;
    let mut r = Relay {
        client,
        server,
        caps,
    };
    let head = match shape {
        Shape::Nothing => None,
        Shape::One => Some(r.pass().await?.0),
        Shape::Results => Some(r.results().await?),
        Shape::Prepare => Some(r.prepare().await?),
        Shape::Columns => Some(r.until_terminator().await?),
        Shape::Rows => Some(r.until_terminator().await?),
    };
    r.client.flush().await?;
    Ok(Reply { head })
}

/// One command's response in flight.
struct Relay<'a, C, S> {
    client: &'a mut PacketIo<C>,
    server: &'a mut PacketIo<S>,
    /// The session's capabilities (DEPRECATE_EOF, SESSION_TRACK shape the packets).
    caps: CapabilityFlags,
}

impl<C, S> Relay<'_, C, S>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Relays the next server packet; returns its head byte and the packet.
    async fn pass(&mut self) -> io::Result<(u8, Packet)> {
        let p = self
            .server
            .read_relaying(MAX_PACKET, self.client)
            .await?
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection in the middle of a response",
                )
            })?;
        self.client.queue(p.seq, &p.payload);
        Ok((p.head().unwrap_or(0), p))
    }

    /// Relays `n` packets (column or parameter definitions).
    async fn pass_n(&mut self, n: u64) -> io::Result<()> {
        for _ in 0..n {
            self.pass().await?;
        }
        Ok(())
    }

    fn deprecate_eof(&self) -> bool {
        self.caps.contains(CapabilityFlags::CLIENT_DEPRECATE_EOF)
    }

    /// COM_QUERY / COM_STMT_EXECUTE: results until one without SERVER_MORE_RESULTS_EXISTS.
    async fn results(&mut self) -> io::Result<u8> {
        let mut first = None;
        loop {
            let (head, p) = self.pass().await?;
            first.get_or_insert(head);
            let status = match head {
                0x00 => ok_status(&p, self.caps)?,
                0xFF => return Ok(*first.get_or_insert(head)),
                0xFB => {
                    self.local_infile().await?;
                    // The server's OK or ERR for the upload follows, possibly with more.
                    continue;
                }
                _ => match self.result_set(&p).await? {
                    Some(status) => status,
                    // ERR in place of a row, or a cursor opened: the response is over.
                    None => return Ok(first.unwrap_or(head)),
                },
            };
            if !status.contains(StatusFlags::SERVER_MORE_RESULTS_EXISTS) {
                return Ok(first.unwrap_or(head));
            }
        }
    }

    /// One result set after its column count packet; the terminator's status, or None when
    /// the response ended (ERR, or a cursor whose rows come with COM_STMT_FETCH).
    async fn result_set(&mut self, count: &Packet) -> io::Result<Option<StatusFlags>> {
        let columns = ParseBuf(&count.payload)
            .checked_eat_lenenc_int()
            .ok_or_else(|| bad("column count"))?;
        self.pass_n(columns).await?;
        if !self.deprecate_eof() {
            let (head, eof) = self.pass().await?;
            if head == 0xFF {
                return Ok(None);
            }
            if is_terminator(&eof)
                && terminator_status(&eof, self.caps)?
                    .contains(StatusFlags::SERVER_STATUS_CURSOR_EXISTS)
            {
                return Ok(None);
            }
        }
        loop {
            let (head, row) = self.pass().await?;
            if head == 0xFF {
                return Ok(None);
            }
            if is_terminator(&row) {
                return terminator_status(&row, self.caps).map(Some);
            }
        }
    }

    /// Packets up to and including a terminator or ERR (COM_FIELD_LIST, COM_STMT_FETCH).
    async fn until_terminator(&mut self) -> io::Result<u8> {
        let mut first = None;
        loop {
            let (head, p) = self.pass().await?;
            first.get_or_insert(head);
            if head == 0xFF || is_terminator(&p) {
                return Ok(first.unwrap_or(head));
            }
        }
    }

    /// COM_STMT_PREPARE: the statement OK, then its parameter and column definitions, each
    /// group closed by EOF unless CLIENT_DEPRECATE_EOF.
    async fn prepare(&mut self) -> io::Result<u8> {
        let (head, p) = self.pass().await?;
        if head != 0x00 {
            return Ok(head);
        }
        let stmt: StmtPacket = ParseBuf(&p.payload)
            .parse(())
            .map_err(|_| bad("prepared statement OK"))?;
        for n in [stmt.num_params(), stmt.num_columns()] {
            if n > 0 {
                self.pass_n(u64::from(n)).await?;
                if !self.deprecate_eof() {
                    self.pass().await?;
                }
            }
        }
        Ok(head)
    }

    /// LOAD DATA LOCAL INFILE: the client's file, packet by packet, up to an empty packet.
    async fn local_infile(&mut self) -> io::Result<()> {
        self.client.flush().await?;
        loop {
            let p = self
                .client
                .read_relaying(MAX_PACKET, self.server)
                .await?
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "client closed the connection during LOAD DATA LOCAL INFILE",
                    )
                })?;
            self.server.queue(p.seq, &p.payload);
            if p.payload.is_empty() {
                return self.server.flush().await;
            }
        }
    }
}

/// An EOF packet, or an OK packet with the EOF header that ends a result set under
/// CLIENT_DEPRECATE_EOF. A row can start with 0xFE only as an 8-byte length prefix, which
/// makes it at least 16 MiB long.
fn is_terminator(p: &Packet) -> bool {
    p.head() == Some(0xFE) && p.payload.len() < 0xFF_FFFF
}

/// The status flags of a result set terminator.
fn terminator_status(p: &Packet, caps: CapabilityFlags) -> io::Result<StatusFlags> {
    let mut buf = ParseBuf(&p.payload);
    let ok = if caps.contains(CapabilityFlags::CLIENT_DEPRECATE_EOF) {
        buf.parse::<OkPacketDeserializer<'_, ResultSetTerminator>>(caps)
            .map(|d| d.into_inner())
    } else {
        buf.parse::<OkPacketDeserializer<'_, OldEofPacket>>(caps)
            .map(|d| d.into_inner())
    };
    ok.map(|ok| ok.status_flags())
        .map_err(|_| bad("result set terminator"))
}

/// The status flags of an OK packet.
fn ok_status(p: &Packet, caps: CapabilityFlags) -> io::Result<StatusFlags> {
    ParseBuf(&p.payload)
        .parse::<OkPacketDeserializer<'_, CommonOkPacket>>(caps)
        .map(|d| d.into_inner().status_flags())
        .map_err(|_| bad("OK packet"))
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed {what} from the server"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn packet(bytes: &[u8]) -> Packet {
        Packet {
            seq: 1,
            payload: BytesMut::from(bytes),
        }
    }

    #[test]
    fn terminators_are_short_fe_packets() {
        assert!(is_terminator(&packet(&[0xFE, 0, 0, 2, 0])));
        assert!(!is_terminator(&packet(&[0x00, 0, 0, 2, 0])));
        let mut long_row = vec![0xFE];
        long_row.resize(0xFF_FFFF, 0);
        assert!(!is_terminator(&packet(&long_row)));
    }

    #[test]
    fn status_comes_from_either_terminator_format() {
        let more = StatusFlags::SERVER_MORE_RESULTS_EXISTS | StatusFlags::SERVER_STATUS_AUTOCOMMIT;
        let [lo, hi] = more.bits().to_le_bytes();
        let base = CapabilityFlags::CLIENT_PROTOCOL_41;
        // EOF: header, warnings, status.
        let eof = packet(&[0xFE, 0, 0, lo, hi]);
        assert_eq!(terminator_status(&eof, base).unwrap(), more);
        // OK with the EOF header: header, affected rows, insert id, status, warnings.
        let ok = packet(&[0xFE, 0, 0, lo, hi, 0, 0]);
        let caps = base | CapabilityFlags::CLIENT_DEPRECATE_EOF;
        assert_eq!(terminator_status(&ok, caps).unwrap(), more);
        assert_eq!(
            ok_status(&packet(&[0x00, 1, 0, lo, hi, 0, 0]), base).unwrap(),
            more
        );
        assert!(ok_status(&packet(&[0x00, 1]), base).is_err());
    }

    #[test]
    fn commands_waitless_cannot_relay_have_no_shape() {
        for refused in [0x01, 0x11, 0x12, 0x14, 0x1E, 0xFA, 0x60] {
            assert_eq!(Shape::of(refused), None, "0x{refused:02x}");
        }
        assert_eq!(Shape::of(0x03), Some(Shape::Results));
        assert_eq!(Shape::of(0x19), Some(Shape::Nothing));
    }
}
