//! What a client session leaves behind on its server connection, followed command by
//! command, so that the connection can go to the next session without COM_RESET_CONNECTION
//! when the session provably left nothing: no transaction open, no prepared statement open,
//! no warning or error for `SHOW WARNINGS`, and only statements `statement::effect` can
//! vouch for. When in doubt, the connection is reset. Some state survives the reset too: a
//! connection that carried it is closed instead of reused.

use mysql_common::constants::StatusFlags;

use super::relay::{
    Reply, COM_INIT_DB, COM_QUERY, COM_SET_OPTION, COM_STMT_CLOSE, COM_STMT_PREPARE,
};
use super::statement::{self, Effect};

/// A session's leftovers so far.
#[derive(Debug, Default)]
pub struct Residue {
    /// Something ran that may have changed the session: it must be reset.
    dirty: bool,
    /// Something ran whose effect no reset undoes: the connection must not be lent again.
    unresettable: bool,
    /// Prepared statements not closed yet.
    open_statements: Vec<u32>,
    /// The status flags of the last response: an open transaction shows here.
    status: StatusFlags,
    /// A response had warnings or failed: `SHOW WARNINGS` may still list them.
    diagnostics: bool,
    /// The effect of the statement text of the command in flight.
    pending: Option<Effect>,
}

/// Commands that leave nothing behind whatever they carry: COM_PING, COM_STATISTICS,
/// COM_FIELD_LIST, COM_PROCESS_INFO, COM_PROCESS_KILL (another connection), COM_STMT_EXECUTE,
/// COM_STMT_FETCH, COM_STMT_RESET, COM_STMT_SEND_LONG_DATA (their statement was judged when
/// prepared and is closed by COM_STMT_CLOSE).
const HARMLESS: [u8; 9] = [0x0E, 0x09, 0x04, 0x0A, 0x0C, 0x17, 0x1C, 0x1A, 0x18];

// === impl Residue ===

impl Residue {
    /// The leftovers of a transaction-pooled session pinned to its connection: whatever
    /// pinned it, and the statements before on other connections, are not all noted here.
    pub fn pinned() -> Residue {
        Residue {
            dirty: true,
            ..Residue::default()
        }
    }

    /// Notes a command about to be relayed: its code and the start of its payload after the
    /// code (`complete` when that is all of it); the effect of its statement text, if any.
    pub fn command(&mut self, code: u8, args: &[u8], complete: bool) -> Option<Effect> {
        self.pending = None;
        match code {
            COM_QUERY | COM_STMT_PREPARE => {
                if survives_reset(args) {
                    self.unresettable = true;
                }
                // USE is harmless: the next session's database is set when it is lent.
                self.pending = Some(if complete {
                    statement::effect(args)
                } else {
                    Effect::Dirty
                });
            }
            COM_INIT_DB => {}
            // Multi-statements on or off: the connection's key follows it (MysqlConn::after).
            COM_SET_OPTION => {}
            COM_STMT_CLOSE => {
                if let [a, b, c, d, ..] = *args {
                    let id = u32::from_le_bytes([a, b, c, d]);
                    self.open_statements.retain(|s| *s != id);
                }
            }
            c if HARMLESS.contains(&c) => {}
            _ => self.dirty = true,
        }
        self.pending
    }

    /// Notes the response to the command last noted.
    pub fn reply(&mut self, reply: &Reply) {
        if self.pending.take() == Some(Effect::Dirty) {
            self.dirty = true;
        }
        if let Some(id) = reply.prepared {
            self.open_statements.push(id);
        }
        if reply.head.is_some() {
            if let Some(status) = reply.status {
                self.status = status;
            }
            // Sticky: a later statement that uses no table leaves the list as it was.
            self.diagnostics |= reply.failed || reply.warnings > 0;
        }
    }

    /// True when no reset makes the connection fit for another session.
    pub fn unresettable(&self) -> bool {
        self.unresettable
    }

    /// True when the connection must be reset before another session may use it.
    pub fn needs_reset(&self) -> bool {
        self.dirty
            || !self.open_statements.is_empty()
            || self.diagnostics
            || self.status.intersects(
                StatusFlags::SERVER_STATUS_IN_TRANS | StatusFlags::SERVER_STATUS_IN_TRANS_READONLY,
            )
    }
}

/// Statements whose effect outlives COM_RESET_CONNECTION on MariaDB: a prepared XA
/// transaction stays with the connection (closing it detaches the transaction, as for a
/// client that quits), and profiling keeps its history. A mere mention is enough.
fn survives_reset(sql: &[u8]) -> bool {
    let xa = match sql.trim_ascii_start() {
        [x, a, next, ..] => {
            x.eq_ignore_ascii_case(&b'x')
                && a.eq_ignore_ascii_case(&b'a')
                && !(next.is_ascii_alphanumeric() || *next == b'_')
        }
        _ => false,
    };
    xa || sql
        .windows(PROFILING.len())
        .any(|w| w.eq_ignore_ascii_case(PROFILING))
}

const PROFILING: &[u8] = b"profiling";

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Reply {
        Reply {
            head: Some(0),
            status: Some(StatusFlags::SERVER_STATUS_AUTOCOMMIT),
            ..Reply::default()
        }
    }

    #[test]
    fn plain_selects_and_closed_statements_leave_nothing() {
        let mut r = Residue::default();
        r.command(COM_QUERY, b"SELECT 1", true);
        r.reply(&ok());
        r.command(COM_STMT_PREPARE, b"SELECT id FROM t WHERE id = ?", true);
        r.reply(&Reply {
            prepared: Some(4),
            ..ok()
        });
        assert!(r.needs_reset(), "statement 4 is open");
        r.command(0x17, &[4, 0, 0, 0, 0], true);
        r.reply(&ok());
        r.command(COM_STMT_CLOSE, &[4, 0, 0, 0], true);
        assert!(!r.needs_reset());
    }

    #[test]
    fn dirt_of_every_kind_means_a_reset() {
        type Case<'a> = (&'a dyn Fn(&mut Residue), &'a str);
        let cases: [Case<'_>; 5] = [
            (
                &|r| {
                    r.command(COM_QUERY, b"SET @a = 1", true);
                    r.reply(&ok());
                },
                "a SET",
            ),
            (
                &|r| {
                    r.command(COM_QUERY, b"SELECT 1", false);
                    r.reply(&ok());
                },
                "a statement too long to judge",
            ),
            (
                &|r| {
                    r.command(COM_QUERY, b"SELECT 1", true);
                    r.reply(&Reply {
                        status: Some(StatusFlags::SERVER_STATUS_IN_TRANS),
                        ..ok()
                    });
                },
                "an open transaction",
            ),
            (
                &|r| {
                    r.command(COM_QUERY, b"SELECT 1/0", true);
                    r.reply(&Reply {
                        warnings: 1,
                        ..ok()
                    });
                },
                "a warning",
            ),
            (
                &|r| {
                    let _ = r.command(0x1F, &[], true);
                },
                "COM_RESET_CONNECTION",
            ),
        ];
        for (run, what) in cases {
            let mut r = Residue::default();
            run(&mut r);
            assert!(r.needs_reset(), "{what}");
        }
    }

    #[test]
    fn xa_and_profiling_outlive_a_reset() {
        for sql in [
            &b"XA PREPARE 'x'"[..],
            b"  xa start 'x'",
            b"SET profiling = 1",
        ] {
            let mut r = Residue::default();
            r.command(COM_QUERY, sql, true);
            assert!(r.unresettable(), "{}", String::from_utf8_lossy(sql));
        }
        let mut r = Residue::default();
        r.command(COM_QUERY, b"SELECT xaxis FROM t", true);
        r.command(COM_SET_OPTION, &[0, 0], true);
        assert!(!r.unresettable());
    }

    #[test]
    fn a_warning_stays_until_the_reset() {
        let mut r = Residue::default();
        r.command(COM_QUERY, b"SELECT 1/0", true);
        r.reply(&Reply {
            warnings: 1,
            ..ok()
        });
        r.command(COM_QUERY, b"SELECT 1", true);
        r.reply(&ok());
        assert!(r.needs_reset());
    }
}
