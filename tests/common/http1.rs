//! Reading HTTP/1.1 responses off a socket, as the tests' raw clients and the bench's load
//! generator do: just enough of the head to know the status and where the body ends.
//! Shared by the tests and the benches (which include this file by path).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// What a response head says about its response.
#[derive(Debug, Clone, Copy)]
pub struct ResponseHead {
    /// Bytes of the head, its blank line included.
    pub len: usize,
    /// The status code of its status line.
    pub status: u16,
    /// Content-Length, when it has one that parses.
    pub content_length: Option<usize>,
    /// Transfer-Encoding names `chunked`.
    pub chunked: bool,
    /// `Connection: close`: the server closes after this response.
    pub close: bool,
}

// === impl ResponseHead ===

impl ResponseHead {
    /// The head at the start of `raw`: None while its blank line has not arrived, an
    /// error when what arrived is not a response head.
    pub fn parse(raw: &[u8]) -> Option<io::Result<ResponseHead>> {
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        Some(ResponseHead::parse_whole(&raw[..end]).ok_or_else(bad_response))
    }

    /// `head` is a whole head, blank line included.
    fn parse_whole(head: &[u8]) -> Option<ResponseHead> {
        let text = std::str::from_utf8(head).ok()?;
        let mut lines = text.split("\r\n");
        let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
        let (mut content_length, mut chunked, mut close) = (None, false, false);
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim().to_ascii_lowercase();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => content_length = value.parse().ok(),
                "transfer-encoding" => chunked = value.contains("chunked"),
                "connection" => close = value.contains("close"),
                _ => {}
            }
        }
        Some(ResponseHead {
            len: head.len(),
            status,
            content_length,
            chunked,
            close,
        })
    }

    /// Whether `raw`, which starts with this head, holds the whole response; a body
    /// without length or chunking ends only at the close, which the caller sees.
    fn complete_in(&self, raw: &[u8]) -> bool {
        match (self.content_length, self.chunked) {
            (Some(n), _) => raw.len() >= self.len + n,
            (None, true) => raw.ends_with(b"0\r\n\r\n"),
            (None, false) => false,
        }
    }
}

/// True when `raw` is exactly one whole response with a Content-Length body.
pub fn is_complete_response(raw: &[u8]) -> bool {
    match ResponseHead::parse(raw) {
        Some(Ok(head)) => head.content_length == Some(raw.len() - head.len),
        _ => false,
    }
}

/// Reads one response from `s` into `buf` (cleared first); returns its status and whether
/// the server will close the connection after it.
pub async fn read_response<S>(s: &mut S, buf: &mut Vec<u8>) -> io::Result<(u16, bool)>
where
    S: AsyncRead + Unpin,
{
    buf.clear();
    let mut chunk = [0u8; 4096];
    let mut head: Option<ResponseHead> = None;
    loop {
        if head.is_none() {
            head = ResponseHead::parse(buf).transpose()?;
        }
        if let Some(h) = head {
            if h.complete_in(buf) {
                return Ok((h.status, h.close));
            }
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            // No length and no chunking: the body ends at the close.
            if let Some(h) = head.filter(|h| h.content_length.is_none() && !h.chunked) {
                return Ok((h.status, true));
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The error for a head that does not parse.
pub fn bad_response() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "unparsable response head")
}
