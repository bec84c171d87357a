//! The close policy: one pure decision, `decide`, for every connection waitless closes.
//!
//! Given the side a connection belongs to (a listener's client, or an upstream server) with
//! its settings, what the kernel said about the socket (`Facts`) and what the protocol says
//! about how the exchange ended (`Ending`), `decide` returns the `Step` to take: whether
//! waitless sends its FIN first, what to wait for and how long, how to close (FIN or RST) and
//! which ledger reason to record, both when the wait ends as hoped and when it runs out.
//! `Tracked` only carries steps out; nothing else in waitless chooses between FIN and RST.

use std::time::Duration;

use super::ledger::{How, Reason};

/// A listener's `time_wait`: where TIME_WAIT lands for client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientTimeWait {
    /// Wait for the client's FIN, then close passively: TIME_WAIT on the client. The wait
    /// lasts up to `linger`, but only a short grace once the client acknowledged everything.
    #[default]
    Client,
    /// Close first with FIN: TIME_WAIT on the proxy.
    Proxy,
    /// RST once every sent byte is acknowledged: TIME_WAIT nowhere.
    None,
}

/// A listener's `linger_fallback`: what to do when `linger` runs out before the client
/// closed, or for a client that will never close first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LingerFallback {
    #[default]
    Fin,
    Reset,
}

/// An upstream's `time_wait`: how waitless closes connections to its servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamTimeWait {
    /// waitless retires pooled connections itself with FIN; a server FIN is answered with RST.
    #[default]
    Proxy,
    /// Every close of a pooled connection is RST after the send queue drained.
    None,
}

/// The client-side close policy of a listener.
#[derive(Debug, Clone, Copy)]
pub struct ClientPolicy {
    /// Where TIME_WAIT should land for client connections.
    pub time_wait: ClientTimeWait,
    /// How long a close waits for the client (its FIN, or its acknowledgements), in
    /// milliseconds: every client connection's task carries this policy, and as a Duration
    /// it made the idle task outgrow its 512-byte block.
    linger_ms: u32,
    /// What to do when `linger` runs out, or for a client that will never close first.
    pub fallback: LingerFallback,
}

/// The close policy of connections to an upstream server.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamPolicy {
    /// The upstream's `time_wait` setting.
    pub time_wait: UpstreamTimeWait,
    /// How long a close may wait for the server to acknowledge what it was sent before the
    /// RST: the relay's listener `linger`; zero for pooled connections, which are dropped.
    pub linger: Duration,
}

/// Which side a connection is on, with that side's policy.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    /// A client connection accepted by a listener.
    Client(ClientPolicy),
    /// A connection from waitless to an upstream server.
    Upstream(UpstreamPolicy),
}

/// What the kernel (and the reads so far) said about the socket when the close began.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Facts {
    /// A TCP socket: TIME_WAIT, SO_LINGER and acknowledgements exist; a unix socket has none.
    pub tcp: bool,
    /// The peer's FIN (or RST) arrived, whether or not the protocol read the EOF.
    pub peer_fin: bool,
    /// waitless already sent its FIN (a relay forwarding a half-close).
    pub sent_fin: bool,
}

/// What the protocol says about how the connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The exchange is over, for `Reason` (done, idle, drain), and the client may close by
    /// itself once it has everything. For an upstream: a relay's exchange is over.
    Over(Reason),
    /// The client sees the end of the response only by the close (HTTP/1.0 without
    /// keep-alive): waiting for its FIN would only waste `linger`.
    ReadsToEof,
    /// A relay's server closed first and the client is to see the end now.
    ServerClosed,
    /// Turned away before anything was sent (`max_clients` without an answer, a bad PROXY
    /// header, no upstream server reachable).
    Refused,
    /// Turned away with an answer that must arrive whole (an HTTP 400, 414, 431, 501, or the
    /// 503 at `max_clients`): a malformed or hostile client is not waited for (nor for its
    /// FIN, whatever the policy), only for the acknowledgement of the answer.
    RefusedAfterAnswer,
    /// A health check's probe connection is done with, passed or failed.
    Checked,
    /// An I/O or protocol error, or a connection dropped before it was finished.
    Error,
    /// The pool let the connection go, for this reason.
    Retired(Reason),
}

/// What to do to close a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Send FIN before the wait: waitless closes first.
    pub fin_first: bool,
    /// What to wait for before closing.
    pub wait: Wait,
    /// The close once the wait is over (at once when there is none).
    pub close: Close,
    /// The close when the wait runs out first.
    pub expired: Expired,
}

/// What a close waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Nothing: close now.
    Nothing,
    /// The peer's FIN, up to this long (what it sends meanwhile is read and dropped).
    PeerFin(Duration),
    /// The peer's FIN, up to this long; once the kernel says every byte sent was
    /// acknowledged, only up to `grace(rtt, within)` longer, and then close as `expired`
    /// says, labelled `eof_reader`: a client that has everything and did not close by then
    /// reads to EOF, and would wait the whole linger. (One duration: the step stays small,
    /// and it is copied into every close.)
    PeerFinOrGrace(Duration),
    /// The acknowledgement of every byte sent, up to this long.
    Acked(Duration),
}

/// One close, as the ledger records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub how: How,
    pub reason: Reason,
}

/// What to do when a wait runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// Close so.
    Close(Close),
    /// `linger_fallback = "reset"`: wait up to `within` for every byte to be acknowledged,
    /// then RST; FIN if they never were, so that no response byte is lost.
    ResetOnceAcked { within: Duration, reason: Reason },
}

// === impl Expired ===

impl Expired {
    /// The same close, recorded for `reason`.
    pub fn labelled(self, reason: Reason) -> Expired {
        match self {
            Expired::Close(close) => Expired::Close(Close {
                how: close.how,
                reason,
            }),
            Expired::ResetOnceAcked { within, .. } => Expired::ResetOnceAcked { within, reason },
        }
    }
}

/// The grace's floor: what a client that closes by itself may take, on this machine's
/// loopback under load, from acknowledging the response to sending its FIN (see README).
pub const GRACE_FLOOR: Duration = Duration::from_millis(40);

/// How many smoothed RTTs the grace allows for on a slower path.
const GRACE_RTTS: u32 = 4;

// === impl ClientPolicy ===

impl ClientPolicy {
    pub fn new(time_wait: ClientTimeWait, linger: Duration, fallback: LingerFallback) -> Self {
        ClientPolicy {
            time_wait,
            linger_ms: u32::try_from(linger.as_millis()).unwrap_or(u32::MAX),
            fallback,
        }
    }

    /// How long a close waits for the client.
    pub fn linger(&self) -> Duration {
        Duration::from_millis(u64::from(self.linger_ms))
    }

    /// A tcp relay ends the client connection as soon as its server closed (instead of
    /// passing the half-close on and relaying on), so that the client can be reset once it
    /// has everything: only where a reset is what the policy falls back to.
    pub fn ends_relay_at_server_close(&self) -> bool {
        self.time_wait != ClientTimeWait::Proxy && self.fallback == LingerFallback::Reset
    }
}

// === impl Step ===

impl Step {
    /// Close now.
    fn now(how: How, reason: Reason) -> Step {
        Step {
            fin_first: false,
            wait: Wait::Nothing,
            close: Close { how, reason },
            expired: Expired::Close(Close { how, reason }),
        }
    }

    /// Wait for `wait`, then close with `how`; close with `expired` if it runs out.
    fn after(wait: Wait, how: How, reason: Reason, expired: Expired) -> Step {
        Step {
            fin_first: false,
            wait,
            close: Close { how, reason },
            expired,
        }
    }
}

// === the decision ===

/// How long a client that acknowledged every byte may still take to send its FIN: a few of
/// its RTTs (the kernel's smoothed `tcpi_rtt`), at least `GRACE_FLOOR`, at most `linger`.
pub fn grace(rtt: Duration, linger: Duration) -> Duration {
    rtt.saturating_mul(GRACE_RTTS).max(GRACE_FLOOR).min(linger)
}

/// How to close a connection of `side`, given `facts`, which ended as `ending`.
pub fn decide(side: Side, facts: Facts, ending: Ending) -> Step {
    match side {
        Side::Client(policy) => client(policy, facts, ending),
        Side::Upstream(policy) => upstream(policy, facts, ending),
    }
}

fn client(policy: ClientPolicy, facts: Facts, ending: Ending) -> Step {
    let linger = policy.linger();
    if !facts.tcp {
        // No TIME_WAIT on a unix socket, and no RST either: any close is free.
        return Step::now(How::Fin, label(ending, facts));
    }
    match ending {
        // Nothing was sent: an RST loses nothing, tells the client at once and leaves no
        // TIME_WAIT anywhere.
        Ending::Refused => Step::now(How::Rst, Reason::Refused),
        // The answer must arrive, but the client is not waited for: under `client` it would
        // hold the socket for `linger`, and a client that sent garbage may never close. Once
        // the answer is acknowledged (a close with the client's bytes unread would otherwise
        // reset at once and may discard it unsent), the close a client that will not close
        // first gets: RST where the policy resets (TIME_WAIT nowhere), else FIN; a FIN if the
        // acknowledgement never comes, so that no byte of the answer is lost.
        Ending::RefusedAfterAnswer => {
            let how = match (policy.time_wait, policy.fallback) {
                (ClientTimeWait::None, _) | (ClientTimeWait::Client, LingerFallback::Reset) => {
                    How::Rst
                }
                (ClientTimeWait::Client, LingerFallback::Fin) | (ClientTimeWait::Proxy, _) => {
                    How::Fin
                }
            };
            Step::after(
                Wait::Acked(linger),
                how,
                Reason::Refused,
                Expired::Close(Close {
                    how: How::Fin,
                    reason: Reason::Refused,
                }),
            )
        }
        // Nothing can be waited for from a connection being dropped.
        Ending::Error | Ending::Checked | Ending::Retired(_) => {
            let how = match policy.time_wait {
                ClientTimeWait::None => How::Rst,
                _ => How::Fin,
            };
            Step::now(how, label(ending, facts))
        }
        Ending::Over(reason) => match policy.time_wait {
            ClientTimeWait::Client if facts.peer_fin => Step::now(How::Fin, reason),
            ClientTimeWait::Client => Step::after(
                Wait::PeerFinOrGrace(linger),
                How::Fin,
                reason,
                fallback(policy, Reason::LingerExpired),
            ),
            ClientTimeWait::Proxy => proxy_first(linger, facts, reason),
            ClientTimeWait::None => Step::after(
                Wait::Acked(linger),
                How::Rst,
                reason,
                // Never drop unacknowledged response bytes: a graceful FIN keeps them.
                Expired::Close(Close {
                    how: How::Fin,
                    reason: Reason::LingerExpired,
                }),
            ),
        },
        // A client that will not close first gets the fallback at once, under "none" too: an
        // EOF reader takes an RST for an error even after it has every byte, and a FIN just
        // before the RST races the reader's own FIN (README, close control).
        Ending::ReadsToEof | Ending::ServerClosed => {
            let plain = label(ending, facts);
            let fell_back = match ending {
                Ending::ReadsToEof => Reason::EofReader,
                _ => plain,
            };
            match policy.time_wait {
                ClientTimeWait::Client if facts.peer_fin => Step::now(How::Fin, plain),
                ClientTimeWait::Proxy => proxy_first(linger, facts, plain),
                ClientTimeWait::Client | ClientTimeWait::None => match policy.fallback {
                    LingerFallback::Fin => Step::now(How::Fin, fell_back),
                    // A Linux client still reads acknowledged data after the RST.
                    LingerFallback::Reset => Step::after(
                        Wait::Acked(linger),
                        How::Rst,
                        fell_back,
                        Expired::Close(Close {
                            how: How::Fin,
                            reason: fell_back,
                        }),
                    ),
                },
            }
        }
    }
}

/// "proxy": waitless sends the first FIN, then reads what the client still sends until its
/// FIN, so that closing with unread data does not turn into an RST that destroys the response.
fn proxy_first(linger: Duration, facts: Facts, reason: Reason) -> Step {
    if facts.peer_fin {
        return Step::now(How::Fin, reason);
    }
    let close = Close {
        how: How::Fin,
        reason,
    };
    Step {
        fin_first: true,
        wait: Wait::PeerFin(linger),
        close,
        expired: Expired::Close(close),
    }
}

/// What `linger_fallback` says for a client that did not close within `linger`.
fn fallback(policy: ClientPolicy, reason: Reason) -> Expired {
    match policy.fallback {
        LingerFallback::Fin => Expired::Close(Close {
            how: How::Fin,
            reason,
        }),
        LingerFallback::Reset => Expired::ResetOnceAcked {
            within: policy.linger(),
            reason,
        },
    }
}

fn upstream(policy: UpstreamPolicy, facts: Facts, ending: Ending) -> Step {
    let reason = label(ending, facts);
    if !facts.tcp {
        return Step::now(How::Fin, reason);
    }
    match ending {
        // A server that closed first is answered with RST once it acknowledged everything
        // (kept either way), so that it keeps no TIME_WAIT; otherwise waitless's FIN already
        // went out and the close completes.
        Ending::Over(_) | Ending::ReadsToEof | Ending::ServerClosed => {
            if facts.peer_fin && !facts.sent_fin {
                let close = Close {
                    how: How::Rst,
                    reason: Reason::PeerClosed,
                };
                Step::after(
                    Wait::Acked(policy.linger),
                    How::Rst,
                    Reason::PeerClosed,
                    Expired::Close(close),
                )
            } else {
                Step::now(How::Fin, Reason::Done)
            }
        }
        // Checking a server every few seconds must leave no TIME_WAIT on either side.
        Ending::Checked | Ending::Refused | Ending::RefusedAfterAnswer => {
            Step::now(How::Rst, reason)
        }
        // Only a deliberate retirement of a healthy connection under "proxy" closes with FIN;
        // a server that closed (or announced it would) is answered with RST so that it keeps
        // no TIME_WAIT, and so is every error.
        Ending::Error | Ending::Retired(_) => {
            let deliberate = matches!(
                reason,
                Reason::Idle | Reason::Lifetime | Reason::PoolFull | Reason::Drain
            );
            let how = match policy.time_wait {
                UpstreamTimeWait::Proxy if deliberate => How::Fin,
                _ => How::Rst,
            };
            Step::now(how, reason)
        }
    }
}

/// The ledger reason an ending stands for when nothing else (a wait running out) changes it.
fn label(ending: Ending, facts: Facts) -> Reason {
    match ending {
        Ending::Over(reason) => reason,
        // `eof_reader` only where the fallback is taken for it; otherwise (a unix socket,
        // "proxy", a client that closed already) it closes as after any exchange.
        Ending::ReadsToEof => Reason::Done,
        Ending::ServerClosed => Reason::ServerClosed,
        Ending::Refused | Ending::RefusedAfterAnswer => Reason::Refused,
        Ending::Checked => Reason::HealthCheck,
        _ if facts.peer_fin => Reason::PeerClosed,
        Ending::Error => Reason::Error,
        Ending::Retired(reason) => reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINGER: Duration = Duration::from_secs(5);

    fn client(time_wait: ClientTimeWait, fallback: LingerFallback) -> Side {
        Side::Client(ClientPolicy::new(time_wait, LINGER, fallback))
    }

    fn upstream(time_wait: UpstreamTimeWait) -> Side {
        Side::Upstream(UpstreamPolicy {
            time_wait,
            linger: LINGER,
        })
    }

    /// A TCP socket whose peer has not closed, before any FIN of waitless's.
    fn open() -> Facts {
        Facts {
            tcp: true,
            ..Facts::default()
        }
    }

    fn peer_closed() -> Facts {
        Facts {
            peer_fin: true,
            ..open()
        }
    }

    fn close(how: How, reason: Reason) -> Close {
        Close { how, reason }
    }

    fn at_once(how: How, reason: Reason) -> Step {
        Step {
            fin_first: false,
            wait: Wait::Nothing,
            close: close(how, reason),
            expired: Expired::Close(close(how, reason)),
        }
    }

    const POLICIES: [ClientTimeWait; 3] = [
        ClientTimeWait::Client,
        ClientTimeWait::Proxy,
        ClientTimeWait::None,
    ];
    const FALLBACKS: [LingerFallback; 2] = [LingerFallback::Fin, LingerFallback::Reset];

    #[test]
    fn client_policy_waits_for_the_client_fin_then_closes_passively() {
        let step = decide(
            client(ClientTimeWait::Client, LingerFallback::Fin),
            open(),
            Ending::Over(Reason::Done),
        );
        assert_eq!(
            step,
            Step {
                fin_first: false,
                // A client that acknowledged everything and is still silent after the grace
                // reads to EOF: it gets the fallback, labelled so.
                wait: Wait::PeerFinOrGrace(LINGER),
                close: close(How::Fin, Reason::Done),
                expired: Expired::Close(close(How::Fin, Reason::LingerExpired)),
            }
        );
    }

    #[test]
    fn client_policy_closes_at_once_when_the_client_fin_already_arrived() {
        let step = decide(
            client(ClientTimeWait::Client, LingerFallback::Reset),
            peer_closed(),
            Ending::Over(Reason::Idle),
        );
        assert_eq!(step, at_once(How::Fin, Reason::Idle));
    }

    #[test]
    fn client_policy_with_reset_fallback_resets_once_acked_when_linger_runs_out() {
        let step = decide(
            client(ClientTimeWait::Client, LingerFallback::Reset),
            open(),
            Ending::Over(Reason::Done),
        );
        assert_eq!(step.wait, Wait::PeerFinOrGrace(LINGER));
        assert_eq!(
            step.expired.labelled(Reason::EofReader),
            Expired::ResetOnceAcked {
                within: LINGER,
                reason: Reason::EofReader
            }
        );
        assert_eq!(step.close, close(How::Fin, Reason::Done));
        assert_eq!(
            step.expired,
            Expired::ResetOnceAcked {
                within: LINGER,
                reason: Reason::LingerExpired
            }
        );
    }

    #[test]
    fn client_policy_closes_eof_readers_at_once_with_fin_under_fin_fallback() {
        let step = decide(
            client(ClientTimeWait::Client, LingerFallback::Fin),
            open(),
            Ending::ReadsToEof,
        );
        assert_eq!(step, at_once(How::Fin, Reason::EofReader));
    }

    #[test]
    fn client_policy_resets_eof_readers_once_acked_under_reset_fallback() {
        let step = decide(
            client(ClientTimeWait::Client, LingerFallback::Reset),
            open(),
            Ending::ReadsToEof,
        );
        assert_eq!(
            step,
            Step {
                fin_first: false,
                wait: Wait::Acked(LINGER),
                close: close(How::Rst, Reason::EofReader),
                expired: Expired::Close(close(How::Fin, Reason::EofReader)),
            }
        );
    }

    #[test]
    fn eof_reader_that_closed_already_is_closed_as_after_any_exchange() {
        let step = decide(
            client(ClientTimeWait::Client, LingerFallback::Reset),
            peer_closed(),
            Ending::ReadsToEof,
        );
        assert_eq!(step, at_once(How::Fin, Reason::Done));
    }

    #[test]
    fn proxy_policy_sends_the_first_fin_then_reads_until_the_client_fin() {
        for fallback in FALLBACKS {
            let step = decide(
                client(ClientTimeWait::Proxy, fallback),
                open(),
                Ending::Over(Reason::Drain),
            );
            assert_eq!(
                step,
                Step {
                    fin_first: true,
                    wait: Wait::PeerFin(LINGER),
                    close: close(How::Fin, Reason::Drain),
                    expired: Expired::Close(close(How::Fin, Reason::Drain)),
                },
                "{fallback:?}"
            );
        }
    }

    #[test]
    fn proxy_policy_closes_at_once_when_the_client_closed_first() {
        let step = decide(
            client(ClientTimeWait::Proxy, LingerFallback::Fin),
            peer_closed(),
            Ending::Over(Reason::Done),
        );
        assert_eq!(step, at_once(How::Fin, Reason::Done));
    }

    #[test]
    fn proxy_policy_closes_eof_readers_first_with_fin_too() {
        let step = decide(
            client(ClientTimeWait::Proxy, LingerFallback::Reset),
            open(),
            Ending::ReadsToEof,
        );
        assert!(step.fin_first);
        assert_eq!(step.wait, Wait::PeerFin(LINGER));
        assert_eq!(step.close, close(How::Fin, Reason::Done));
    }

    #[test]
    fn none_policy_resets_once_every_byte_is_acknowledged() {
        let step = decide(
            client(ClientTimeWait::None, LingerFallback::Fin),
            open(),
            Ending::Over(Reason::Done),
        );
        assert_eq!(
            step,
            Step {
                fin_first: false,
                wait: Wait::Acked(LINGER),
                close: close(How::Rst, Reason::Done),
                expired: Expired::Close(close(How::Fin, Reason::LingerExpired)),
            }
        );
    }

    #[test]
    fn none_policy_gives_eof_readers_the_fallback_not_a_bare_reset() {
        let step = decide(
            client(ClientTimeWait::None, LingerFallback::Fin),
            open(),
            Ending::ReadsToEof,
        );
        assert_eq!(step, at_once(How::Fin, Reason::EofReader));
    }

    #[test]
    fn grace_is_a_few_rtts_with_a_floor_capped_by_linger() {
        let ms = Duration::from_millis;
        assert_eq!(grace(Duration::from_micros(50), LINGER), GRACE_FLOOR);
        assert_eq!(grace(ms(30), LINGER), ms(120));
        assert_eq!(grace(ms(30), ms(100)), ms(100));
        assert_eq!(grace(Duration::ZERO, ms(5)), ms(5));
    }

    #[test]
    fn refused_clients_are_reset_at_once_under_every_policy() {
        for time_wait in POLICIES {
            for fallback in FALLBACKS {
                for facts in [open(), peer_closed()] {
                    let step = decide(client(time_wait, fallback), facts, Ending::Refused);
                    assert_eq!(
                        step,
                        at_once(How::Rst, Reason::Refused),
                        "{time_wait:?} {fallback:?} {facts:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn clients_refused_after_an_answer_are_closed_once_it_is_acknowledged_never_waited_for() {
        for time_wait in POLICIES {
            for fallback in FALLBACKS {
                // The close a client that will not close first gets.
                let how = match (time_wait, fallback) {
                    (ClientTimeWait::None, _) => How::Rst,
                    (ClientTimeWait::Client, LingerFallback::Reset) => How::Rst,
                    _ => How::Fin,
                };
                for facts in [open(), peer_closed()] {
                    let step = decide(
                        client(time_wait, fallback),
                        facts,
                        Ending::RefusedAfterAnswer,
                    );
                    assert_eq!(
                        step,
                        Step {
                            fin_first: false,
                            wait: Wait::Acked(LINGER),
                            close: close(how, Reason::Refused),
                            // Never at the cost of the answer: unacknowledged, it gets a FIN.
                            expired: Expired::Close(close(How::Fin, Reason::Refused)),
                        },
                        "{time_wait:?} {fallback:?} {facts:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn unix_sockets_close_at_once_with_fin_whatever_the_policy() {
        let unix = Facts::default();
        for time_wait in POLICIES {
            for fallback in FALLBACKS {
                for (ending, reason) in [
                    (Ending::Over(Reason::Done), Reason::Done),
                    (Ending::ReadsToEof, Reason::Done),
                    (Ending::Refused, Reason::Refused),
                    (Ending::RefusedAfterAnswer, Reason::Refused),
                    (Ending::Error, Reason::Error),
                ] {
                    let step = decide(client(time_wait, fallback), unix, ending);
                    assert_eq!(step, at_once(How::Fin, reason), "{time_wait:?} {ending:?}");
                }
            }
        }
        let step = decide(upstream(UpstreamTimeWait::None), unix, Ending::Checked);
        assert_eq!(step, at_once(How::Fin, Reason::HealthCheck));
    }

    #[test]
    fn server_closed_first_resets_the_client_once_acked_labelled_server_closed() {
        for time_wait in [ClientTimeWait::Client, ClientTimeWait::None] {
            let step = decide(
                client(time_wait, LingerFallback::Reset),
                open(),
                Ending::ServerClosed,
            );
            assert_eq!(step.wait, Wait::Acked(LINGER), "{time_wait:?}");
            assert_eq!(step.close, close(How::Rst, Reason::ServerClosed));
            assert_eq!(
                step.expired,
                Expired::Close(close(How::Fin, Reason::ServerClosed))
            );
        }
    }

    #[test]
    fn relay_ends_at_server_close_only_where_the_fallback_is_a_reset() {
        for time_wait in POLICIES {
            for fallback in FALLBACKS {
                let policy = ClientPolicy::new(time_wait, LINGER, fallback);
                let expect =
                    time_wait != ClientTimeWait::Proxy && fallback == LingerFallback::Reset;
                assert_eq!(
                    policy.ends_relay_at_server_close(),
                    expect,
                    "{time_wait:?} {fallback:?}"
                );
            }
        }
    }

    #[test]
    fn dropped_client_closes_with_fin_labelled_error_or_peer_closed() {
        let side = client(ClientTimeWait::Client, LingerFallback::Reset);
        assert_eq!(
            decide(side, open(), Ending::Error),
            at_once(How::Fin, Reason::Error)
        );
        assert_eq!(
            decide(side, peer_closed(), Ending::Error),
            at_once(How::Fin, Reason::PeerClosed)
        );
    }

    #[test]
    fn dropped_client_under_none_is_reset() {
        let step = decide(
            client(ClientTimeWait::None, LingerFallback::Fin),
            open(),
            Ending::Error,
        );
        assert_eq!(step, at_once(How::Rst, Reason::Error));
    }

    #[test]
    fn upstream_that_closed_first_is_reset_once_acked_labelled_peer_closed() {
        for time_wait in [UpstreamTimeWait::Proxy, UpstreamTimeWait::None] {
            let step = decide(
                upstream(time_wait),
                peer_closed(),
                Ending::Over(Reason::Done),
            );
            assert_eq!(
                step,
                Step {
                    fin_first: false,
                    wait: Wait::Acked(LINGER),
                    close: close(How::Rst, Reason::PeerClosed),
                    // Reset even so: the server's FIN_WAIT_2 must not turn into TIME_WAIT.
                    expired: Expired::Close(close(How::Rst, Reason::PeerClosed)),
                },
                "{time_wait:?}"
            );
        }
    }

    #[test]
    fn upstream_that_answered_a_forwarded_fin_completes_the_close_with_fin() {
        let facts = Facts {
            sent_fin: true,
            ..peer_closed()
        };
        let step = decide(
            upstream(UpstreamTimeWait::Proxy),
            facts,
            Ending::Over(Reason::Done),
        );
        assert_eq!(step, at_once(How::Fin, Reason::Done));
    }

    #[test]
    fn deliberate_retirement_closes_with_fin_under_proxy_and_rst_under_none() {
        for reason in [
            Reason::Idle,
            Reason::Lifetime,
            Reason::PoolFull,
            Reason::Drain,
        ] {
            let ending = Ending::Retired(reason);
            assert_eq!(
                decide(upstream(UpstreamTimeWait::Proxy), open(), ending),
                at_once(How::Fin, reason)
            );
            assert_eq!(
                decide(upstream(UpstreamTimeWait::None), open(), ending),
                at_once(How::Rst, reason)
            );
        }
    }

    #[test]
    fn retirement_after_a_broken_exchange_is_reset() {
        let step = decide(
            upstream(UpstreamTimeWait::Proxy),
            open(),
            Ending::Retired(Reason::Done),
        );
        assert_eq!(step, at_once(How::Rst, Reason::Done));
    }

    #[test]
    fn pooled_connection_whose_server_closed_is_reset_labelled_peer_closed() {
        let step = decide(
            upstream(UpstreamTimeWait::Proxy),
            peer_closed(),
            Ending::Retired(Reason::Idle),
        );
        assert_eq!(step, at_once(How::Rst, Reason::PeerClosed));
    }

    #[test]
    fn upstream_error_is_reset() {
        for time_wait in [UpstreamTimeWait::Proxy, UpstreamTimeWait::None] {
            assert_eq!(
                decide(upstream(time_wait), open(), Ending::Error),
                at_once(How::Rst, Reason::Error)
            );
        }
    }

    #[test]
    fn health_check_probes_are_reset_under_either_policy() {
        for time_wait in [UpstreamTimeWait::Proxy, UpstreamTimeWait::None] {
            for facts in [open(), peer_closed()] {
                assert_eq!(
                    decide(upstream(time_wait), facts, Ending::Checked),
                    at_once(How::Rst, Reason::HealthCheck)
                );
            }
        }
    }

    #[test]
    fn drops_are_decided_without_a_wait() {
        let mut sides = vec![
            upstream(UpstreamTimeWait::Proxy),
            upstream(UpstreamTimeWait::None),
        ];
        for time_wait in POLICIES {
            for fallback in FALLBACKS {
                sides.push(client(time_wait, fallback));
            }
        }
        for side in sides {
            for facts in [open(), peer_closed(), Facts::default()] {
                for ending in [Ending::Error, Ending::Retired(Reason::Idle)] {
                    let step = decide(side, facts, ending);
                    assert!(!step.fin_first, "{side:?} {facts:?} {ending:?}");
                    assert_eq!(step.wait, Wait::Nothing, "{side:?} {facts:?} {ending:?}");
                }
            }
        }
    }
}
