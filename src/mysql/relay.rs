//! The command phase: a client command goes to its borrowed server connection and the
//! response comes back, bytes unchanged, as they arrive (`PacketIo::forward`). `Response`
//! follows the response packet by packet, from the start of each, to find where it ends —
//! result sets (column count, column definitions, EOF or OK terminators under
//! CLIENT_DEPRECATE_EOF, rows), more results (SERVER_MORE_RESULTS_EXISTS on an OK or a
//! terminator), procedure OUT parameters, cursors, prepared statement replies, LOCAL INFILE
//! uploads — so that the connection is known to be idle, and so resettable or lendable,
//! between commands. It also keeps what the response said that the session's bookkeeping
//! needs: the last status flags, warnings, errors and a prepared statement's id.

use std::io;

use mysql_common::constants::{CapabilityFlags, StatusFlags};
use mysql_common::io::ParseBuf;
use tokio::io::{AsyncRead, AsyncWrite};

use super::packet::{ok_fields, Fault, Flow, Head, PacketIo, PEEK};

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
    /// Packets up to a terminator: column definitions (COM_FIELD_LIST), rows
    /// (COM_STMT_FETCH).
    UntilTerminator,
}

/// What a relayed response said.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reply {
    /// The head byte of the response's first packet (0x00 OK, 0xFF ERR, ...), if any.
    pub head: Option<u8>,
    /// The status flags of the last OK or terminator, as the server sent them.
    pub status: Option<StatusFlags>,
    /// The warning count of the last OK or terminator.
    pub warnings: u16,
    /// An ERR ended it.
    pub failed: bool,
    /// COM_STMT_PREPARE answered with OK: the new statement's id.
    pub prepared: Option<u32>,
    /// The last insert id of the last OK of a result (0 when it generated none).
    pub insert_id: u64,
}

/// One command's response, followed packet by packet.
#[derive(Debug)]
pub struct Response {
    shape: Shape,
    state: State,
    /// CLIENT_DEPRECATE_EOF: no EOF after column definitions, an OK-shaped terminator.
    deprecate_eof: bool,
    /// COM_STMT_EXECUTE asked for a cursor: CURSOR_EXISTS on the column definitions' EOF
    /// means the rows come later, with COM_STMT_FETCH. (The flag also shows, leaked, on
    /// result sets of SELECTs inside a procedure's cursor loop: it means nothing there.)
    cursor: bool,
    /// The command answers OK with status flags (not COM_STATISTICS's string).
    one_is_ok: bool,
    reply: Reply,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The first packet of a result: OK, ERR, a LOCAL INFILE request or a column count.
    Start,
    /// Column definitions to go.
    Columns(u64),
    /// The EOF after the column definitions.
    ColumnsEof,
    /// Rows, up to a terminator or ERR.
    Rows,
    /// Packets to go that need no look (a prepared statement's definitions).
    Definitions(u64),
    /// The server asked for a LOCAL INFILE upload; its verdict comes after it.
    Upload,
    /// Nothing more belongs to this response.
    Done,
}

/// Where a `Response` is after a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The response is over.
    Done,
    /// The client's LOCAL INFILE upload goes to the server now; then the response goes on.
    Upload,
}

pub const COM_QUIT: u8 = 0x01;
pub const COM_INIT_DB: u8 = 0x02;
pub const COM_QUERY: u8 = 0x03;
pub const COM_STATISTICS: u8 = 0x09;
pub const COM_STMT_PREPARE: u8 = 0x16;
pub const COM_STMT_EXECUTE: u8 = 0x17;
pub const COM_STMT_CLOSE: u8 = 0x19;
pub const COM_SET_OPTION: u8 = 0x1B;

/// A row can start with 0xFE only as an 8-byte length prefix, which makes it at least
/// 16 MiB long: a first chunk shorter than that starting with 0xFE is a terminator.
const MAX_CHUNK: usize = 0xFF_FFFF;

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
            // COM_FIELD_LIST, COM_STMT_FETCH
            0x04 | 0x1C => Shape::UntilTerminator,
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

// === impl Response ===

impl Response {
    /// The response to `command` (its code, and for COM_STMT_EXECUTE whether it asked for a
    /// cursor) on a session with `caps`.
    pub fn new(command: u8, shape: Shape, cursor: bool, caps: CapabilityFlags) -> Response {
        Response {
            shape,
            state: if shape == Shape::Nothing {
                State::Done
            } else {
                State::Start
            },
            deprecate_eof: caps.contains(CapabilityFlags::CLIENT_DEPRECATE_EOF),
            cursor,
            one_is_ok: command != COM_STATISTICS,
            reply: Reply::default(),
        }
    }

    /// True once nothing more belongs to the response (at once for COM_STMT_CLOSE).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    pub fn reply(&self) -> Reply {
        self.reply
    }

    /// Takes in the next packet of the response; Stop when it ends the response or asks for
    /// an upload.
    pub fn on(&mut self, p: Head<'_>) -> io::Result<Flow> {
        let head = p.bytes.first().copied();
        if self.reply.head.is_none() {
            self.reply.head = Some(head.unwrap_or(0));
        }
        let terminator = head == Some(0xFE) && p.len < MAX_CHUNK;
        self.state = match (self.state, self.shape) {
            (State::Done | State::Upload, _) => {
                return Err(bad("packet after the end of a response"))
            }
            (_, _) if head == Some(0xFF) => {
                self.reply.failed = true;
                State::Done
            }
            (State::Start, Shape::One) => {
                if head == Some(0x00) && self.one_is_ok {
                    self.status(ok_fields(p.bytes))?;
                }
                State::Done
            }
            (State::Start, Shape::Prepare) => {
                let (id, definitions) = self.prepared(p.bytes)?;
                self.reply.prepared = Some(id);
                match definitions {
                    0 => State::Done,
                    n => State::Definitions(n),
                }
            }
            (State::Definitions(n), _) => match n {
                0 | 1 => State::Done,
                n => State::Definitions(n - 1),
            },
            (State::Start, Shape::UntilTerminator) | (State::Rows, Shape::UntilTerminator) => {
                if terminator {
                    self.status(self.terminator_fields(p.bytes))?;
                    State::Done
                } else {
                    State::Rows
                }
            }
            (State::Start, _) => match head {
                Some(0x00) => {
                    let more = self.status(ok_fields(p.bytes))?;
                    self.reply.insert_id = insert_id(p.bytes).unwrap_or(0);
                    self.after_result(more)
                }
                Some(0xFB) => State::Upload,
                _ => {
                    let columns = ParseBuf(p.bytes)
                        .checked_eat_lenenc_int()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad("column count"))?;
                    State::Columns(columns)
                }
            },
            (State::Columns(n), _) => match n {
                0 | 1 if self.deprecate_eof => State::Rows,
                0 | 1 => State::ColumnsEof,
                n => State::Columns(n - 1),
            },
            (State::ColumnsEof, _) => {
                if !terminator {
                    return Err(bad("EOF after column definitions"));
                }
                let (status, warnings) = self
                    .terminator_fields(p.bytes)
                    .ok_or_else(|| bad("EOF after column definitions"))?;
                if self.cursor && status.contains(StatusFlags::SERVER_STATUS_CURSOR_EXISTS) {
                    self.reply.status = Some(status);
                    self.reply.warnings = warnings;
                    State::Done
                } else {
                    State::Rows
                }
            }
            (State::Rows, _) => {
                if terminator {
                    let more = self.status(self.terminator_fields(p.bytes))?;
                    self.after_result(more)
                } else {
                    State::Rows
                }
            }
        };
        Ok(match self.state {
            State::Done | State::Upload => Flow::Stop,
            _ => Flow::Go,
        })
    }

    /// After an upload, the server's verdict (and maybe more results) follows.
    fn uploaded(&mut self) {
        self.state = State::Start;
    }

    fn progress(&self) -> Progress {
        match self.state {
            State::Upload => Progress::Upload,
            _ => Progress::Done,
        }
    }

    fn after_result(&self, more: bool) -> State {
        if more {
            State::Start
        } else {
            State::Done
        }
    }

    /// Keeps an OK's or terminator's status and warnings; true when more results follow.
    fn status(&mut self, fields: Option<(StatusFlags, u16)>) -> io::Result<bool> {
        let (status, warnings) = fields.ok_or_else(|| bad("OK packet"))?;
        self.reply.status = Some(status);
        self.reply.warnings = warnings;
        Ok(status.contains(StatusFlags::SERVER_MORE_RESULTS_EXISTS))
    }

    /// A result set terminator's status and warnings: an EOF packet, or an OK packet with
    /// the EOF header under CLIENT_DEPRECATE_EOF.
    fn terminator_fields(&self, p: &[u8]) -> Option<(StatusFlags, u16)> {
        if self.deprecate_eof {
            return ok_fields(p);
        }
        let [_, w0, w1, s0, s1, ..] = *p else {
            return None;
        };
        Some((
            StatusFlags::from_bits_truncate(u16::from_le_bytes([s0, s1])),
            u16::from_le_bytes([w0, w1]),
        ))
    }

    /// A prepare OK: the statement id and how many definition packets follow it.
    fn prepared(&self, p: &[u8]) -> io::Result<(u32, u64)> {
        let [0x00, i0, i1, i2, i3, c0, c1, p0, p1, ..] = *p else {
            return Err(bad("prepared statement OK"));
        };
        let eof = u64::from(!self.deprecate_eof);
        let group = |n: u16| match n {
            0 => 0,
            n => u64::from(n) + eof,
        };
        let columns = group(u16::from_le_bytes([c0, c1]));
        let params = group(u16::from_le_bytes([p0, p1]));
        Ok((u32::from_le_bytes([i0, i1, i2, i3]), columns + params))
    }
}

/// An OK packet's last insert id: after the header and the affected rows.
fn insert_id(ok: &[u8]) -> Option<u64> {
    let mut buf = ParseBuf(ok.get(1..)?);
    buf.checked_eat_lenenc_int()?;
    buf.checked_eat_lenenc_int()
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed or unexpected {what} from the server"),
    )
}

/// Relays the server's whole response to the command just sent, with any LOCAL INFILE
/// upload it asks the client for.
pub async fn response<C, S>(
    client: &mut PacketIo<C>,
    server: &mut PacketIo<S>,
    mut resp: Response,
) -> Result<Reply, Fault>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    while !resp.is_done() {
        server.forward(client, PEEK, |p| resp.on(p)).await?;
        if resp.progress() == Progress::Upload {
            // The client's file, packet by packet, up to an empty packet; a failure is the
            // other way round from the response's.
            let upload = client.forward(server, 0, |p| {
                Ok(if p.len == 0 { Flow::Stop } else { Flow::Go })
            });
            upload.await.map_err(|f| match f {
                Fault::From(e) => Fault::To(e),
                Fault::To(e) => Fault::From(e),
            })?;
            resp.uploaded();
        }
    }
    Ok(resp.reply())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds whole packets to a response; the flow after each.
    fn feed(resp: &mut Response, packets: &[&[u8]]) -> Vec<Flow> {
        packets
            .iter()
            .map(|p| {
                let head = Head {
                    len: p.len(),
                    seq: 1,
                    bytes: &p[..p.len().min(PEEK)],
                };
                resp.on(head).unwrap()
            })
            .collect()
    }

    const BASE: CapabilityFlags = CapabilityFlags::CLIENT_PROTOCOL_41;

    fn status(flags: StatusFlags) -> [u8; 2] {
        flags.bits().to_le_bytes()
    }

    fn eof(flags: StatusFlags) -> Vec<u8> {
        let [lo, hi] = status(flags);
        vec![0xFE, 0, 0, lo, hi]
    }

    fn ok(flags: StatusFlags) -> Vec<u8> {
        let [lo, hi] = status(flags);
        vec![0x00, 0, 0, lo, hi, 0, 0]
    }

    const COLUMN: &[u8] = &[3, b'd', b'e', b'f', 0, 0, 0, 1, b'a', 0];
    const ROW: &[u8] = &[1, b'1'];

    #[test]
    fn a_result_set_ends_at_its_terminator_unless_more_follow() {
        let more = StatusFlags::SERVER_MORE_RESULTS_EXISTS;
        let none = StatusFlags::empty();
        let mut r = Response::new(COM_QUERY, Shape::Results, false, BASE);
        let flows = feed(
            &mut r,
            &[&[1], COLUMN, &eof(none), ROW, &eof(more), &[1], COLUMN],
        );
        assert!(flows.iter().all(|f| *f == Flow::Go));
        let flows = feed(&mut r, &[&eof(none), ROW, &eof(none)]);
        assert_eq!(flows, [Flow::Go, Flow::Go, Flow::Stop]);
        assert!(r.is_done());
        // A procedure's final OK comes after its result sets.
        let mut r = Response::new(COM_QUERY, Shape::Results, false, BASE);
        feed(&mut r, &[&[1], COLUMN, &eof(none), ROW]);
        assert_eq!(feed(&mut r, &[&eof(more), &ok(more)]), [Flow::Go, Flow::Go]);
        assert_eq!(feed(&mut r, &[&ok(none)]), [Flow::Stop]);
    }

    #[test]
    fn cursor_exists_ends_a_response_only_for_an_execute_that_asked_for_a_cursor() {
        let cursor = StatusFlags::SERVER_STATUS_CURSOR_EXISTS;
        // Leaked from a procedure's cursor loop into a COM_QUERY result set: rows follow.
        let mut r = Response::new(COM_QUERY, Shape::Results, false, BASE);
        assert_eq!(feed(&mut r, &[&[1], COLUMN, &eof(cursor)]), [Flow::Go; 3]);
        assert_eq!(
            feed(&mut r, &[ROW, &eof(StatusFlags::empty())]),
            [Flow::Go, Flow::Stop]
        );
        let mut r = Response::new(COM_STMT_EXECUTE, Shape::Results, true, BASE);
        assert_eq!(
            feed(&mut r, &[&[1], COLUMN, &eof(cursor)]),
            [Flow::Go, Flow::Go, Flow::Stop]
        );
        assert!(r.reply().status.unwrap().contains(cursor));
    }

    #[test]
    fn deprecate_eof_has_no_column_eof_and_ok_shaped_terminators() {
        let caps = BASE | CapabilityFlags::CLIENT_DEPRECATE_EOF;
        let mut r = Response::new(COM_QUERY, Shape::Results, false, caps);
        let [lo, hi] = status(StatusFlags::SERVER_STATUS_IN_TRANS);
        let end = [0xFE, 0, 0, lo, hi, 3, 0];
        assert_eq!(
            feed(&mut r, &[&[2], COLUMN, COLUMN, ROW, &end]),
            [Flow::Go, Flow::Go, Flow::Go, Flow::Go, Flow::Stop]
        );
        let reply = r.reply();
        assert_eq!(reply.warnings, 3);
        assert!(reply
            .status
            .unwrap()
            .contains(StatusFlags::SERVER_STATUS_IN_TRANS));
    }

    #[test]
    fn an_err_ends_any_response_and_a_long_row_is_not_a_terminator() {
        let mut r = Response::new(COM_QUERY, Shape::Results, false, BASE);
        feed(&mut r, &[&[1], COLUMN, &eof(StatusFlags::empty())]);
        let long = Head {
            len: MAX_CHUNK,
            seq: 4,
            bytes: &[0xFE, 0, 0, 0, 1, 0, 0, 0, 0],
        };
        assert_eq!(r.on(long).unwrap(), Flow::Go);
        assert_eq!(feed(&mut r, &[&[0xFF, 0x10, 0x04, b'#']]), [Flow::Stop]);
        assert!(r.reply().failed);
    }

    #[test]
    fn local_infile_asks_for_an_upload_then_reads_the_verdict() {
        let mut r = Response::new(COM_QUERY, Shape::Results, false, BASE);
        assert_eq!(feed(&mut r, &[&[0xFB, b'f']]), [Flow::Stop]);
        assert_eq!(r.progress(), Progress::Upload);
        r.uploaded();
        assert_eq!(feed(&mut r, &[&ok(StatusFlags::empty())]), [Flow::Stop]);
        assert_eq!(r.progress(), Progress::Done);
    }

    #[test]
    fn a_prepare_reply_counts_its_definitions() {
        // Statement 7, 1 column, 2 parameters: 2 + EOF + 1 + EOF packets follow.
        let prep: &[u8] = &[0x00, 7, 0, 0, 0, 1, 0, 2, 0, 0, 0, 0];
        let mut r = Response::new(COM_STMT_PREPARE, Shape::Prepare, false, BASE);
        let flows = feed(
            &mut r,
            &[prep, COLUMN, COLUMN, &eof(StatusFlags::empty()), COLUMN],
        );
        assert!(flows.iter().all(|f| *f == Flow::Go));
        assert_eq!(feed(&mut r, &[&eof(StatusFlags::empty())]), [Flow::Stop]);
        assert_eq!(r.reply().prepared, Some(7));
        let caps = BASE | CapabilityFlags::CLIENT_DEPRECATE_EOF;
        let mut r = Response::new(COM_STMT_PREPARE, Shape::Prepare, false, caps);
        assert_eq!(
            feed(&mut r, &[prep, COLUMN, COLUMN, COLUMN]),
            [Flow::Go, Flow::Go, Flow::Go, Flow::Stop]
        );
    }

    #[test]
    fn malformed_responses_are_errors_not_guesses() {
        let mut r = Response::new(COM_QUERY, Shape::Results, false, BASE);
        feed(&mut r, &[&[1], COLUMN]);
        let not_eof = Head {
            len: 2,
            seq: 3,
            bytes: &[1, b'x'],
        };
        assert!(r.on(not_eof).is_err());
        let mut r = Response::new(COM_QUERY, Shape::Results, false, BASE);
        let zero_columns = Head {
            len: 1,
            seq: 1,
            bytes: &[0xFC],
        };
        assert!(r.on(zero_columns).is_err());
        let mut r = Response::new(0x0E, Shape::One, false, BASE);
        feed(&mut r, &[&ok(StatusFlags::empty())]);
        assert!(r.on(not_eof).is_err());
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
