//! The access log: one line per HTTP request and per tcp or mysql session, each with how its
//! client connection closed (who first, FIN or RST, why, where TIME_WAIT landed).
//!
//! Workers never wait for it. A connection's record is filled in as it goes (`Conn`), handed
//! to a bounded queue when it is complete, and formatted and written by one writer thread; a
//! full queue drops the line and counts it (`dropped`). The file is opened by the writer, so
//! a slow disk or a full pipe stalls only the writer, and reopened on SIGHUP (logrotate).
//!
//! An HTTP request's line waits for the next request on its connection, or its close: the
//! last request of a connection carries the close record, as a short connection's only one
//! does. A connection that ends with no request left unlogged gets a line of its own
//! (method `-`), so every close is in the log once.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::close::{Closer, How, Reason, TimeWaitAt};

/// Lines that may wait for the writer when `[log] queue` is not set; more are dropped (a
/// few MiB at most).
pub const DEFAULT_QUEUE: usize = 16 * 1024;

/// While lines keep coming, how long the writer lets them gather between writes.
const BATCH: Duration = Duration::from_millis(20);

/// Where the log goes (`[log] access`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Destination {
    /// No access log.
    #[default]
    Off,
    /// waitless's standard error.
    Stderr,
    /// A file, appended to.
    File(PathBuf),
}

/// How a line is written (`[log] format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// One JSON object per line.
    #[default]
    Json,
    /// A combined-log line plus the close fields.
    Text,
}

/// One line: a request, a session, or a connection's close alone.
#[derive(Debug, Clone)]
pub struct Record {
    /// When the request (or session) began.
    pub time: SystemTime,
    pub listener: Arc<str>,
    /// `http`, `tcp` or `mysql`.
    pub protocol: &'static str,
    /// The client (the PROXY header's when there is one).
    pub client: Option<SocketAddr>,
    /// HTTP: the request, when there was one.
    pub request: Option<Request>,
    /// mysql: the user the client logged in as.
    pub user: Option<String>,
    /// The upstream server that served it.
    pub server: Option<String>,
    /// Whether the upstream connection had served before.
    pub reused: Option<bool>,
    /// Bytes read from and written to the client.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// From its start to its end (the response written; the session's close).
    pub total: Option<Duration>,
    /// Getting an upstream connection (an idle one, or connecting).
    pub connect: Option<Duration>,
    /// HTTP: from the request sent to the response head read.
    pub head: Option<Duration>,
    /// How the client connection closed, on its last line.
    pub close: Option<Closed>,
}

/// An HTTP request line and its answer.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub target: String,
    /// The status sent back (waitless's own for refusals and upstream failures).
    pub status: u16,
}

/// How a client connection closed, as the ledger recorded it.
#[derive(Debug, Clone, Copy)]
pub struct Closed {
    pub closer: Closer,
    pub how: How,
    pub reason: Reason,
}

/// An HTTP request being served, for its line.
#[derive(Debug)]
pub struct Exchange {
    started: (Instant, SystemTime),
    method: String,
    target: String,
    /// The status sent back, once known.
    pub status: u16,
    /// What happened upstream.
    pub trip: Trip,
}

/// What happened upstream for one request or session.
#[derive(Debug, Clone, Default)]
pub struct Trip {
    pub server: Option<String>,
    pub reused: Option<bool>,
    pub connect: Option<Duration>,
    pub head: Option<Duration>,
}

/// The access log of one client connection: its byte counts and the line it will end with.
#[derive(Debug)]
pub struct Conn {
    listener: Arc<str>,
    protocol: &'static str,
    client: Option<SocketAddr>,
    /// When the connection was accepted.
    opened: (Instant, SystemTime),
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    state: Mutex<ConnState>,
}

#[derive(Debug, Default)]
struct ConnState {
    /// The byte counts already on a line.
    logged: (u64, u64),
    /// The line waiting for the next request, or the close.
    pending: Option<Box<Record>>,
    /// Since the last line: when this part of the connection began.
    since: Option<(Instant, SystemTime)>,
}

/// The process's access log: the queue's sender while it is on.
struct Log {
    on: AtomicBool,
    sender: Mutex<Option<SyncSender<Msg>>>,
    /// Where the writer is to write from its next line on, when that changed.
    next: Arc<Mutex<Option<(Destination, Format)>>>,
    current: Mutex<(Destination, Format)>,
    dropped: AtomicU64,
    written: Arc<AtomicU64>,
}

enum Msg {
    Line(Box<Record>),
    /// Look at `next` now (a reopen while no line comes).
    Wake,
}

static LOG: OnceLock<Log> = OnceLock::new();

fn log() -> &'static Log {
    LOG.get_or_init(|| Log {
        on: AtomicBool::new(false),
        sender: Mutex::new(None),
        next: Arc::new(Mutex::new(None)),
        current: Mutex::new((Destination::Off, Format::Json)),
        dropped: AtomicU64::new(0),
        written: Arc::new(AtomicU64::new(0)),
    })
}

// === the process's log ===

/// Whether lines are being logged: a connection allocates its `Conn` only then.
pub fn on() -> bool {
    LOG.get().is_some_and(|l| l.on.load(Ordering::Relaxed))
}

/// Lines dropped because the writer could not keep up.
pub fn dropped() -> u64 {
    LOG.get().map_or(0, |l| l.dropped.load(Ordering::Relaxed))
}

/// Lines written.
pub fn written() -> u64 {
    LOG.get().map_or(0, |l| l.written.load(Ordering::Relaxed))
}

/// Sets where lines go (start-up and reload); a file is opened anew even when it did not
/// change, which is what logrotate's SIGHUP asks for.
pub fn configure(cfg: &crate::config::Log) {
    let (to, format) = (&cfg.access, cfg.format);
    let log = log();
    *log.current.lock().unwrap_or_else(|p| p.into_inner()) = (to.clone(), format);
    if *to == Destination::Off {
        log.on.store(false, Ordering::Relaxed);
        return;
    }
    *log.next.lock().unwrap_or_else(|p| p.into_inner()) = Some((to.clone(), format));
    let mut sender = log.sender.lock().unwrap_or_else(|p| p.into_inner());
    if sender.is_none() {
        let (tx, rx) = mpsc::sync_channel(cfg.queue);
        let (next, written) = (log.next.clone(), log.written.clone());
        let spawned = std::thread::Builder::new()
            .name("waitless-access".into())
            .spawn(move || write_lines(rx, next, written));
        match spawned {
            Ok(_) => *sender = Some(tx),
            Err(e) => {
                tracing::error!(error = %e, "access log: cannot start its writer thread");
                return;
            }
        }
    } else if let Some(tx) = sender.as_ref() {
        // Wakes an idle writer to reopen now, not at its next line.
        let _ = tx.try_send(Msg::Wake);
    }
    log.on.store(true, Ordering::Relaxed);
}

/// Opens the current destination anew (SIGHUP when the reload itself was refused).
pub fn reopen() {
    let log = log();
    let current = log
        .current
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if current.0 != Destination::Off {
        *log.next.lock().unwrap_or_else(|p| p.into_inner()) = Some(current);
        if let Some(tx) = log
            .sender
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = tx.try_send(Msg::Wake);
        }
    }
}

/// Queues a line; drops it when the queue is full.
fn submit(record: Box<Record>) {
    let log = log();
    let sender = log.sender.lock().unwrap_or_else(|p| p.into_inner());
    let Some(tx) = sender.as_ref() else { return };
    match tx.try_send(Msg::Line(record)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            log.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The writer thread: lines from the queue to the destination, flushed whenever the queue
/// runs empty (so `tail -f` sees a line at once, and a busy log writes in big blocks).
fn write_lines(
    rx: Receiver<Msg>,
    next: Arc<Mutex<Option<(Destination, Format)>>>,
    written: Arc<AtomicU64>,
) {
    let mut out: Option<(io::BufWriter<Box<dyn Write>>, Format)> = None;
    let mut line = String::with_capacity(512);
    let mut busy = false;
    loop {
        if let Some((to, format)) = next.lock().unwrap_or_else(|p| p.into_inner()).take() {
            if let Some((mut w, _)) = out.take() {
                let _ = w.flush();
            }
            out = open(&to).map(|w| (io::BufWriter::with_capacity(64 * 1024, w), format));
        }
        let msg = match rx.try_recv() {
            Ok(msg) => msg,
            Err(mpsc::TryRecvError::Empty) => {
                if let Some((w, _)) = out.as_mut() {
                    let _ = w.flush();
                }
                if busy {
                    // Lines keep coming: look again in a moment rather than be woken for
                    // each (a wake-up per line cost more CPU than the line itself).
                    busy = false;
                    std::thread::sleep(BATCH);
                    continue;
                }
                // Quiet: wait to be woken, and now and then pick up a reopen.
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(msg) => msg,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => return,
        };
        busy = true;
        let Msg::Line(record) = msg else { continue };
        let Some((w, format)) = out.as_mut() else {
            continue;
        };
        line.clear();
        match format {
            Format::Json => json(&record, &mut line),
            Format::Text => text(&record, &mut line),
        }
        line.push('\n');
        if w.write_all(line.as_bytes()).is_ok() {
            written.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn open(to: &Destination) -> Option<Box<dyn Write>> {
    match to {
        Destination::Off => None,
        Destination::Stderr => Some(Box::new(io::stderr())),
        Destination::File(path) => {
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                Ok(f) => Some(Box::new(f)),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e,
                        "access log: cannot open; lines are not written until a reload");
                    None
                }
            }
        }
    }
}

// === impl Conn ===

impl Conn {
    /// The log of a client connection accepted now, when the access log is on.
    pub fn new(
        listener: &str,
        protocol: &'static str,
        client: Option<SocketAddr>,
    ) -> Option<Arc<Conn>> {
        if !on() {
            return None;
        }
        let opened = (Instant::now(), SystemTime::now());
        Some(Arc::new(Conn {
            listener: listener.into(),
            protocol,
            client,
            opened,
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            state: Mutex::new(ConnState {
                since: Some(opened),
                ..ConnState::default()
            }),
        }))
    }

    /// Bytes read from the client.
    pub fn read(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes written to the client.
    pub fn wrote(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// An HTTP exchange that just ended: its line waits for the next request or the close;
    /// the one waiting before is written now.
    pub fn exchange(&self, ex: Exchange) {
        let mut state = self.lock();
        self.flush_locked(&mut state);
        let mut record = self.record(ex.started.1);
        record.request = Some(Request {
            method: ex.method,
            target: ex.target,
            status: ex.status,
        });
        record.total = Some(ex.started.0.elapsed());
        record.fill(ex.trip);
        state.pending = Some(Box::new(record));
        state.since = None;
    }

    /// What a tcp or mysql session did upstream, on the line its close will write.
    pub fn session(&self, trip: Trip, user: Option<String>) {
        let mut state = self.lock();
        let since = state.since.unwrap_or(self.opened);
        let record = state
            .pending
            .get_or_insert_with(|| Box::new(self.record(since.1)));
        record.fill(trip);
        if user.is_some() {
            record.user = user;
        }
    }

    /// Writes the line that waits, with no close (the connection goes on, idle).
    pub fn flush(&self) {
        let mut state = self.lock();
        self.flush_locked(&mut state);
    }

    /// The client connection closed: its last line, with the close.
    pub fn closed(&self, close: Closed) {
        let mut state = self.lock();
        let mut record = match state.pending.take() {
            Some(record) => record,
            None => {
                let since = state.since.unwrap_or((Instant::now(), SystemTime::now()));
                Box::new(self.record(since.1))
            }
        };
        if record.total.is_none() {
            let since = state.since.map_or(self.opened.0, |s| s.0);
            record.total = Some(since.elapsed());
        }
        record.close = Some(close);
        self.count_bytes(&mut state, &mut record);
        submit(record);
    }

    fn flush_locked(&self, state: &mut ConnState) {
        if let Some(mut record) = state.pending.take() {
            self.count_bytes(state, &mut record);
            submit(record);
            state.since = Some((Instant::now(), SystemTime::now()));
        }
    }

    /// The bytes since the last line go on this one.
    fn count_bytes(&self, state: &mut ConnState, record: &mut Record) {
        let now = (
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
        );
        record.bytes_in = now.0.saturating_sub(state.logged.0);
        record.bytes_out = now.1.saturating_sub(state.logged.1);
        state.logged = now;
    }

    fn record(&self, time: SystemTime) -> Record {
        Record::new(time, self.listener.clone(), self.protocol, self.client)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

// === impl Trip ===

impl Trip {
    /// A connection to `server` was lent, after `connect` (an idle one, or a new one).
    pub fn lent(&mut self, server: &str, reused: bool, connect: Option<std::time::Duration>) {
        self.server = Some(server.to_owned());
        self.reused = Some(reused);
        self.connect = connect;
    }
}

// === impl Exchange ===

impl Exchange {
    /// A request beginning now, by its method and target.
    pub fn new(method: &str, target: &str) -> Exchange {
        Exchange {
            started: (Instant::now(), SystemTime::now()),
            method: method.to_owned(),
            target: target.to_owned(),
            status: 0,
            trip: Trip::default(),
        }
    }

    /// A request beginning now, from its head's first line in `head`.
    pub fn begin(head: &[u8]) -> Exchange {
        let line = head
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .and_then(|at| head.get(at..))
            .unwrap_or_default();
        let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
        let mut words = line
            .split(|&b| b == b' ')
            .map(|w| String::from_utf8_lossy(w.strip_suffix(b"\r").unwrap_or(w)));
        let method = words.next().unwrap_or_default();
        let target = words.next().unwrap_or_default();
        Exchange::new(&method, &target)
    }
}

// === impl Record ===

impl Record {
    /// A line of `listener` about `client`, begun at `time`, with nothing else known yet.
    fn new(
        time: SystemTime,
        listener: Arc<str>,
        protocol: &'static str,
        client: Option<SocketAddr>,
    ) -> Record {
        Record {
            time,
            listener,
            protocol,
            client,
            request: None,
            user: None,
            server: None,
            reused: None,
            bytes_in: 0,
            bytes_out: 0,
            total: None,
            connect: None,
            head: None,
            close: None,
        }
    }

    fn fill(&mut self, trip: Trip) {
        if trip.server.is_some() {
            self.server = trip.server;
        }
        self.reused = trip.reused.or(self.reused);
        self.connect = trip.connect.or(self.connect);
        self.head = trip.head.or(self.head);
    }
}

// === formats ===

/// `{"time":"2026-12-03T06:14:11.123Z","listener":"web",...}`: every field always present
/// (null when it does not apply), durations in microseconds.
fn json(r: &Record, out: &mut String) {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        time: String,
        listener: &'a str,
        protocol: &'a str,
        client: Option<SocketAddr>,
        method: Option<&'a str>,
        target: Option<&'a str>,
        status: Option<u16>,
        user: Option<&'a str>,
        server: Option<&'a str>,
        reused: Option<bool>,
        bytes_in: u64,
        bytes_out: u64,
        total_us: Option<u64>,
        connect_us: Option<u64>,
        head_us: Option<u64>,
        close: Option<Close>,
    }
    #[derive(serde::Serialize)]
    struct Close {
        closer: &'static str,
        how: &'static str,
        reason: &'static str,
        time_wait: &'static str,
    }
    let micros = |d: Option<Duration>| d.map(|d| d.as_micros() as u64);
    let line = Line {
        time: rfc3339(r.time),
        listener: &r.listener,
        protocol: r.protocol,
        client: r.client,
        method: r.request.as_ref().map(|q| q.method.as_str()),
        target: r.request.as_ref().map(|q| q.target.as_str()),
        status: r.request.as_ref().map(|q| q.status),
        user: r.user.as_deref(),
        server: r.server.as_deref(),
        reused: r.reused,
        bytes_in: r.bytes_in,
        bytes_out: r.bytes_out,
        total_us: micros(r.total),
        connect_us: micros(r.connect),
        head_us: micros(r.head),
        close: r.close.map(|c| Close {
            closer: c.closer.as_str(),
            how: c.how.as_str(),
            reason: c.reason.as_str(),
            time_wait: TimeWaitAt::of(c.closer, c.how).as_str(),
        }),
    };
    if let Ok(text) = serde_json::to_string(&line) {
        out.push_str(&text);
    }
}

/// nginx's combined line, then waitless's fields:
/// `127.0.0.1:40312 - - [03/Dec/2026:06:14:11 +0000] "GET / HTTP/1.1" 200 612 in=78
/// listener=web server=127.0.0.1:8080 reused=1 total=0.000410 connect=0.000002
/// head=0.000213 close=proxy,fin,done time_wait=proxy`.
fn text(r: &Record, out: &mut String) {
    let client = r.client.map_or_else(|| "-".to_string(), |c| c.to_string());
    let user = r.user.as_deref().unwrap_or("-");
    let _ = write!(out, "{client} - {user} [{}] ", clf_time(r.time));
    match &r.request {
        Some(q) => {
            let target = q.target.replace('"', "%22");
            let _ = write!(out, "\"{} {target} HTTP/1.1\" {}", q.method, q.status);
        }
        None => {
            let _ = write!(out, "\"{}\" -", r.protocol.to_uppercase());
        }
    }
    let _ = write!(out, " {} in={}", r.bytes_out, r.bytes_in);
    let _ = write!(out, " listener={}", r.listener);
    let _ = write!(out, " server={}", r.server.as_deref().unwrap_or("-"));
    let reused = match r.reused {
        Some(true) => "1",
        Some(false) => "0",
        None => "-",
    };
    let _ = write!(out, " reused={reused}");
    for (key, d) in [("total", r.total), ("connect", r.connect), ("head", r.head)] {
        match d {
            Some(d) => {
                let _ = write!(out, " {key}={:.6}", d.as_secs_f64());
            }
            None => {
                let _ = write!(out, " {key}=-");
            }
        }
    }
    match r.close {
        Some(c) => {
            let tw = TimeWaitAt::of(c.closer, c.how).as_str();
            let _ = write!(
                out,
                " close={},{},{} time_wait={tw}",
                c.closer.as_str(),
                c.how.as_str(),
                c.reason.as_str()
            );
        }
        None => out.push_str(" close=- time_wait=-"),
    }
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's civil_from_days.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The UTC date and time of `t`, and its milliseconds.
fn parts(t: SystemTime) -> ((i64, u32, u32), (u64, u64, u64), u32) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let date = civil((secs / 86_400) as i64);
    let s = secs % 86_400;
    (date, (s / 3600, s / 60 % 60, s % 60), since.subsec_millis())
}

fn rfc3339(t: SystemTime) -> String {
    let ((y, mo, d), (h, mi, s), ms) = parts(t);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
}

fn clf_time(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let ((y, mo, d), (h, mi, s), _) = parts(t);
    let month = MONTHS.get(mo as usize - 1).copied().unwrap_or("???");
    format!("{d:02}/{month}/{y:04}:{h:02}:{mi:02}:{s:02} +0000")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_in_both_formats() {
        // 2026-12-03T06:14:11.123Z
        let t = UNIX_EPOCH + Duration::from_millis(1_796_278_451_123);
        assert_eq!(rfc3339(t), "2026-12-03T06:14:11.123Z");
        assert_eq!(clf_time(t), "03/Dec/2026:06:14:11 +0000");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // A leap day.
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn a_line_says_where_time_wait_landed() {
        let mut r = Record::new(UNIX_EPOCH, Arc::from("web"), "http", None);
        r.request = Some(Request {
            method: "GET".into(),
            target: "/a\"b".into(),
            status: 200,
        });
        r.close = Some(Closed {
            closer: Closer::Proxy,
            how: How::Fin,
            reason: Reason::Done,
        });
        let mut line = String::new();
        json(&r, &mut line);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["close"]["time_wait"], "proxy");
        assert_eq!(v["target"], "/a\"b");
        assert_eq!(v["server"], serde_json::Value::Null);
        line.clear();
        text(&r, &mut line);
        assert!(
            line.contains("\"GET /a%22b HTTP/1.1\" 200 0 in=0"),
            "{line}"
        );
        assert!(
            line.ends_with("close=proxy,fin,done time_wait=proxy"),
            "{line}"
        );
    }
}
