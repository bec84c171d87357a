//! HTTP/1.1 on the upstream connection's own bytes, for requests without a body: the
//! rewritten request head is written straight from its parts, the response head is parsed
//! with httparse, and the response body is decoded by its framing as the client reads it.
//!
//! hyper's client needs a task per connection and a channel hop each way per request; a
//! bodyless keep-alive exchange done here runs in the request's own task and costs about a
//! third fewer instructions. Requests with a body still go through hyper's client, which
//! sends the body while it reads the response.

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

use super::headers::{self, Named};
use super::validate;

/// Response heads larger than this are refused (hyper's client allows about as much).
pub const MAX_HEAD: usize = 64 * 1024;

/// Most header fields a head may carry, a request's (as hyper's server) or a response's.
pub const MAX_HEADERS: usize = 100;

/// A chunk-size line or a trailer line longer than this is refused.
const MAX_LINE: usize = 4096;

/// A parsed response head and how its body is delimited. Its fields stay where they came,
/// in the head's bytes: the simple path writes them to the client as they are, and only a
/// response hyper's server sends needs them in a map (`parts`).
#[derive(Debug)]
pub struct Head {
    /// The status.
    pub status: StatusCode,
    /// The version the server spoke.
    pub version: Version,
    /// The head as it came; the fields kept are slices of it.
    bytes: Bytes,
    /// Where each field kept (all but the hop-by-hop ones) has its name and value in `bytes`.
    fields: Vec<(Range<usize>, Range<usize>)>,
    /// A Content-Length is among them.
    pub has_length: bool,
    /// A Date is among them.
    pub has_date: bool,
    /// How the body ends.
    pub framing: Framing,
    /// The server keeps the connection open after this response.
    pub keep_alive: bool,
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy)]
pub enum Framing {
    /// Content-Length, or none at all (HEAD, 1xx, 204, 304): the bytes still to come.
    Length(u64),
    /// Transfer-Encoding: chunked.
    Chunked(Chunk),
    /// Neither: the body ends when the server closes.
    UntilClose,
}

/// Where a chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data: the bytes left.
    Data(u64),
    /// Expecting the CRLF that ends a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until the empty one.
    Trailer,
    /// The empty line after the trailers was read.
    Done,
}

/// One step of decoding a body.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// Nothing to give until more bytes are read.
    NeedMore,
    /// The body ended by its framing.
    End,
}

/// What the framing and the connection's fate depend on, gathered as the fields are read,
/// so none has to be looked up again.
#[derive(Debug, Default)]
struct Seen {
    /// What the Connection fields say.
    conn: Named,
    /// Transfer-Encoding is present (`validate` allows only `chunked`).
    chunked: bool,
    /// The Content-Length all values agree on.
    length: Option<u64>,
    /// Date is present.
    date: bool,
}

// === impl Framing ===

impl Framing {
    /// True once the body ended by its framing (a close-delimited one never does).
    pub fn is_done(&self) -> bool {
        matches!(self, Framing::Length(0) | Framing::Chunked(Chunk::Done))
    }

    /// Bytes still to come, when the framing says.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            Framing::Length(n) => Some(*n),
            _ => None,
        }
    }

    /// Takes the next piece of body out of `buf`; `Err` names a framing error.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, &'static str> {
        match self {
            Framing::Length(0) => Ok(Decoded::End),
            Framing::Length(left) => Ok(take(buf, left)),
            Framing::UntilClose if buf.is_empty() => Ok(Decoded::NeedMore),
            Framing::UntilClose => Ok(Decoded::Data(buf.split().freeze())),
            Framing::Chunked(state) => decode_chunked(state, buf),
        }
    }
}

// === request ===

/// Writes a request head as it goes upstream (`headers::forward_request`): `target` is the
/// origin-form path and query, `client` the X-Forwarded-For address, `rules` the listener's
/// and the connection's.
pub fn encode_request(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    client: Option<&HeaderValue>,
    rules: super::headers::Rules,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    super::headers::forward_request(headers, client, rules, |name, value| {
        write_field(out, name.as_str().as_bytes(), value.as_bytes())
    });
    out.extend_from_slice(b"\r\n");
}

/// Writes one `name: value` line of a head.
pub fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

// === response ===

/// Parses a response head at the start of `buf` and takes it out; Ok(None) while it is
/// incomplete. Interim 1xx responses are skipped. `head_request`: the request was HEAD, so
/// the response has no body whatever its headers say.
pub fn parse_response(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, String> {
    loop {
        // Uninitialised: zeroing a hundred slots would cost more than parsing a short head.
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut slots);
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(format!("response head over {MAX_HEAD} bytes"))
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(format!("invalid response head: {e}")),
        };
        let code = resp.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| format!("invalid status {code}"))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            // 100 Continue, 103 Early Hints: the final response follows.
            buf.advance(len);
            continue;
        }
        let version = match resp.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        // Where each field lies in the head, to slice it out once the head is frozen.
        let base = buf.as_ptr() as usize;
        let span = |s: &[u8]| {
            let at = (s.as_ptr() as usize).wrapping_sub(base);
            at..at.saturating_add(s.len())
        };
        let mut seen = Seen::default();
        let mut fields = Vec::with_capacity(resp.headers.len());
        for h in resp.headers.iter() {
            let mut lower = [0u8; 24];
            let name = headers::lower(h.name.as_bytes(), &mut lower);
            seen.note(name, h.value)?;
            if !headers::is_hop_by_hop_name(name) {
                fields.push((span(h.name.as_bytes()), span(h.value)));
            }
        }
        if seen.chunked || status == StatusCode::SWITCHING_PROTOCOLS {
            let te = resp.headers.iter();
            let te = te.filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
            validate::response_framing(status, te.map(|h| h.value), seen.length.is_some())?;
        }
        let head = buf.split_to(len).freeze();
        if seen.conn.close || !seen.conn.others.is_empty() {
            // The fields Connection names are hop-by-hop too.
            fields.retain(|(name, _)| !head.get(name.clone()).is_some_and(|n| seen.conn.names(n)));
        }
        let framing = seen.framing(status, head_request);
        let keep_alive = !matches!(framing, Framing::UntilClose) && seen.conn.keeps_alive(version);
        return Ok(Some(Head {
            status,
            version,
            bytes: head,
            fields,
            has_length: seen.length.is_some(),
            has_date: seen.date,
            framing,
            keep_alive,
        }));
    }
}

// === impl Head ===

impl Head {
    /// Status, version and the fields kept, in a map, for hyper's server.
    pub fn parts(&self) -> http::response::Parts {
        let mut headers = HeaderMap::with_capacity(self.fields.len());
        for (name, value) in self.fields() {
            // httparse let only tchars into a name, all of which a HeaderName takes.
            let Ok(name) = HeaderName::from_bytes(name) else {
                continue;
            };
            // SAFETY: httparse let only HTAB, SP, visible ASCII and obs-text into a value,
            // the bytes a HeaderValue may hold; checking them again cost 2% of a request.
            let value =
                unsafe { HeaderValue::from_maybe_shared_unchecked(self.bytes.slice_ref(value)) };
            headers.append(name, value);
        }
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = self.status;
        parts.version = self.version;
        parts.headers = headers;
        parts
    }

    /// Writes the fields kept as they came, each on its line; `skip_length` leaves out
    /// Content-Length.
    pub fn write_fields(&self, out: &mut Vec<u8>, skip_length: bool) {
        for (name, value) in self.fields() {
            if skip_length && name.eq_ignore_ascii_case(b"content-length") {
                continue;
            }
            write_field(out, name, value);
        }
    }

    /// The fields kept, as names and values.
    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields.iter().filter_map(|(name, value)| {
            Some((
                self.bytes.get(name.clone())?,
                self.bytes.get(value.clone())?,
            ))
        })
    }
}

// === impl Seen ===

impl Seen {
    /// Notes one field, by its name in lower case.
    fn note(&mut self, lower: &[u8], value: &[u8]) -> Result<(), String> {
        match lower {
            b"content-length" => {
                // Repeated values (or a list) must all agree, as hyper's client requires.
                for part in value.split(|&b| b == b',') {
                    let n = parse_length(part.trim_ascii()).ok_or("invalid Content-Length")?;
                    if self.length.is_some_and(|l| l != n) {
                        return Err("conflicting Content-Length values".into());
                    }
                    self.length = Some(n);
                }
            }
            b"transfer-encoding" => self.chunked = true,
            b"connection" => self.conn.note(value),
            b"date" => self.date = true,
            _ => {}
        }
        Ok(())
    }

    /// How the body ends (`validate::response_framing` refused the conflicting heads).
    fn framing(&self, status: StatusCode, head_request: bool) -> Framing {
        if head_request
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Length(0)
        } else if self.chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            self.length.map_or(Framing::UntilClose, Framing::Length)
        }
    }
}

fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// Up to `left` bytes of `buf`.
fn take(buf: &mut BytesMut, left: &mut u64) -> Decoded {
    if buf.is_empty() {
        return Decoded::NeedMore;
    }
    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
    *left -= n as u64;
    Decoded::Data(buf.split_to(n).freeze())
}

fn decode_chunked(state: &mut Chunk, buf: &mut BytesMut) -> Result<Decoded, &'static str> {
    loop {
        match state {
            Chunk::Size => match httparse::parse_chunk_size(buf) {
                Ok(httparse::Status::Complete((len, size))) => {
                    buf.advance(len);
                    *state = if size == 0 {
                        Chunk::Trailer
                    } else {
                        Chunk::Data(size)
                    };
                }
                Ok(httparse::Status::Partial) if buf.len() > MAX_LINE => {
                    return Err("chunk size line too long")
                }
                Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                Err(_) => return Err("invalid chunk size line"),
            },
            Chunk::Data(left) => {
                let got = take(buf, left);
                if *left == 0 {
                    *state = Chunk::DataEnd;
                }
                return Ok(got);
            }
            Chunk::DataEnd => match buf.get(..2) {
                None => return Ok(Decoded::NeedMore),
                Some(b"\r\n") => {
                    buf.advance(2);
                    *state = Chunk::Size;
                }
                Some(_) => return Err("chunk data longer than its size"),
            },
            Chunk::Trailer => match buf.windows(2).position(|w| w == b"\r\n") {
                // Trailers are dropped: hyper's server would not send them to an HTTP/1.1
                // client that did not ask with `TE: trailers` anyway.
                Some(0) => {
                    buf.advance(2);
                    *state = Chunk::Done;
                }
                Some(at) => buf.advance(at + 2),
                None if buf.len() > MAX_LINE => return Err("trailer line too long"),
                None => return Ok(Decoded::NeedMore),
            },
            Chunk::Done => return Ok(Decoded::End),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    fn parse(text: &str, head_request: bool) -> (Head, BytesMut) {
        let mut buf = BytesMut::from(text);
        let head = parse_response(&mut buf, head_request).unwrap().unwrap();
        (head, buf)
    }

    fn body(framing: &mut Framing, buf: &mut BytesMut) -> Result<Vec<u8>, &'static str> {
        let mut out = Vec::new();
        loop {
            match framing.decode(buf)? {
                Decoded::Data(b) => out.extend_from_slice(&b),
                Decoded::NeedMore => return Err("incomplete"),
                Decoded::End => return Ok(out),
            }
        }
    }

    #[test]
    fn a_sized_response_leaves_the_next_bytes_in_the_buffer() {
        let (mut head, mut buf) = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhelloHTTP/1.1",
            false,
        );
        assert_eq!(head.parts().headers["x-a"], "1");
        assert!(head.keep_alive);
        let mut out = Vec::new();
        while let Decoded::Data(b) = head.framing.decode(&mut buf).unwrap() {
            out.extend_from_slice(&b);
        }
        assert_eq!(out, b"hello");
        assert!(head.framing.is_done());
        assert_eq!(&buf[..], b"HTTP/1.1");
    }

    #[test]
    fn chunked_bodies_are_decoded_and_trailers_dropped() {
        let (mut head, mut buf) = parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
             5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nX-T: 1\r\n\r\nnext",
            false,
        );
        assert_eq!(body(&mut head.framing, &mut buf).unwrap(), b"hello!");
        assert_eq!(&buf[..], b"next");
    }

    #[test]
    fn header_values_hold_only_the_bytes_a_header_value_may() {
        // The map takes values unchecked: httparse must have refused every control byte.
        for bad in [&b"\x01"[..], b"\x7f", b"\x00", b"a\rb"] {
            let mut raw = b"HTTP/1.1 200 OK\r\nX-A: ".to_vec();
            raw.extend_from_slice(bad);
            raw.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
            let mut buf = BytesMut::from(&raw[..]);
            assert!(
                parse_response(&mut buf, false).is_err(),
                "{bad:?} let through"
            );
        }
        let (head, _) = parse("HTTP/1.1 200 OK\r\nX-A: caf\u{e9}\tx\r\n\r\n", false);
        assert_eq!(
            head.parts().headers["x-a"].as_bytes(),
            "caf\u{e9}\tx".as_bytes()
        );
    }

    #[test]
    fn a_chunk_longer_than_its_size_is_an_error() {
        let (mut head, mut buf) = parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
            false,
        );
        assert!(body(&mut head.framing, &mut buf).is_err());
    }

    #[test]
    fn interim_responses_are_skipped_and_bodyless_statuses_have_no_body() {
        let (head, buf) = parse(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false,
        );
        assert_eq!(head.status, 304);
        assert!(head.framing.is_done());
        assert!(buf.is_empty());
        let (head, _) = parse("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true);
        assert!(head.framing.is_done());
    }

    #[test]
    fn close_delimited_and_http10_responses_end_the_connection() {
        let (head, _) = parse("HTTP/1.1 200 OK\r\n\r\n", false);
        assert!(matches!(head.framing, Framing::UntilClose));
        assert!(!head.keep_alive);
        let (head, _) = parse("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false);
        assert!(!head.keep_alive);
        let (head, _) = parse(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert!(!head.keep_alive);
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_left_out() {
        let (head, _) = parse(
            "HTTP/1.1 200 OK\r\nX-Hop: 1\r\nConnection: x-hop, Keep-Alive\r\n\
             Keep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nX-Kept: 1\r\n\r\n",
            false,
        );
        let parts = head.parts();
        let names: Vec<&str> = parts.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        assert!(head.keep_alive);
        assert!(matches!(head.framing, Framing::Chunked(_)));
    }

    #[test]
    fn conflicting_or_invalid_lengths_are_refused() {
        for text in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(text);
            assert!(parse_response(&mut buf, false).is_err(), "{text}");
        }
        let (head, _) = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            false,
        );
        assert_eq!(head.framing.remaining(), Some(5));
    }

    #[test]
    fn an_incomplete_head_waits_for_more() {
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\nContent-Le");
        assert!(parse_response(&mut buf, false).unwrap().is_none());
        assert_eq!(buf.len(), 27);
    }

    #[test]
    fn the_request_head_is_written_from_its_parts() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.append("x-b", HeaderValue::from_static("1"));
        h.append("x-b", HeaderValue::from_static("2"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        let mut out = Vec::new();
        encode_request(&mut out, &Method::GET, "/p?q", &h, None, Default::default());
        let want = "GET /p?q HTTP/1.1\r\nhost: a\r\nx-b: 1\r\nx-b: 2\r\n\
                    x-forwarded-proto: http\r\n\r\n";
        assert_eq!(String::from_utf8(out).unwrap(), want);
    }
}
