//! The MySQL command phase (`src/mysql/relay.rs`) fed arbitrary server packets, and the
//! packet framing (`src/mysql/packet.rs`) fed arbitrary client bytes: the relay must end
//! with a reply or an error, never panic or loop, whatever the server sends.
//!
//! Both modules are private to the mysql front and use nothing but their own crates, so
//! they are compiled into this target from their source files.
#![no_main]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use libfuzzer_sys::fuzz_target;
use mysql_common::constants::CapabilityFlags;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

// At the crate root, so relay's `super::packet` finds its sibling.
#[allow(dead_code)]
#[path = "../../src/mysql/packet.rs"]
mod packet;
#[allow(dead_code)]
#[path = "../../src/mysql/relay.rs"]
mod relay;

use packet::{PacketIo, MAX_HANDSHAKE_PACKET};
use relay::{response, Response, Shape};

/// A peer that sends `input` in small reads, then EOF, and swallows what it is sent.
struct Peer<'a> {
    input: &'a [u8],
    /// Bytes handed out per read, so packets arrive split at every place.
    step: usize,
}

impl AsyncRead for Peer<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.input.len().min(self.step).min(buf.remaining());
        let (now, rest) = self.input.split_at(n);
        buf.put_slice(now);
        self.input = rest;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Peer<'_> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    // data = command byte, capability choice (and cursor), read step, then the server's bytes.
    let [command_byte, caps_choice, step, server_bytes @ ..] = data else {
        return;
    };
    let mut caps = CapabilityFlags::CLIENT_PROTOCOL_41 | CapabilityFlags::CLIENT_TRANSACTIONS;
    if caps_choice & 1 != 0 {
        caps |= CapabilityFlags::CLIENT_DEPRECATE_EOF;
    }
    if caps_choice & 2 != 0 {
        caps |= CapabilityFlags::CLIENT_SESSION_TRACK;
    }
    if caps_choice & 4 != 0 {
        caps |= CapabilityFlags::CLIENT_LOCAL_FILES;
    }
    let step = usize::from(*step).max(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // The command phase against an arbitrary server.
        if let Some(shape) = Shape::of(*command_byte) {
            let mut client = PacketIo::new(Peer { input: &[], step });
            let mut server = PacketIo::new(Peer {
                input: server_bytes,
                step,
            });
            let cursor = caps_choice & 8 != 0;
            let resp = Response::new(*command_byte, shape, cursor, caps);
            if let Ok(reply) = response(&mut client, &mut server, resp).await {
                assert_eq!(reply.head.is_none(), shape == Shape::Nothing);
            }
        }
        // The same bytes as a client's packets before authentication.
        let mut client = PacketIo::new(Peer {
            input: server_bytes,
            step,
        });
        while let Ok(Some(p)) = client.read(MAX_HANDSHAKE_PACKET).await {
            assert!(p.payload.len() <= MAX_HANDSHAKE_PACKET);
        }
    });
});
