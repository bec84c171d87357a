//! The client side of a session's start: waitless greets as the server would (Handshake v10
//! with the server's version and capabilities), reads HandshakeResponse41 and checks the
//! password itself with mysql_native_password — switching clients that start with another
//! plugin (caching_sha2_password) over to it — before any server connection is touched.
//! On a listener with tls, CLIENT_SSL is offered too: a client's SSLRequest is followed by
//! the TLS handshake (the caller's: it changes the stream), then the login over TLS.

use std::io;

use mysql_common::constants::CapabilityFlags;
use mysql_common::io::ParseBuf;
use mysql_common::packets::{AuthPlugin, AuthSwitchRequest, HandshakePacket, HandshakeResponse};
use mysql_common::proto::MySerialize;
use mysql_common::scramble::scramble_native;
use tokio::io::{AsyncRead, AsyncWrite};

use super::backend::{Profile, SessionKey, SESSION_CAPS};
use super::packet::{err_payload, Packet, PacketIo, MAX_HANDSHAKE_PACKET};
use crate::config::MysqlUser;

/// A client that logged in.
#[derive(Debug)]
pub struct Login {
    /// Its account.
    pub user: MysqlUser,
    /// What a server connection must match to serve it.
    pub key: SessionKey,
    /// The database it asked for in the handshake.
    pub db: Option<Vec<u8>>,
    /// The sequence id of waitless's answer (OK or ERR) to the login.
    pub seq: u8,
}

/// Why a client did not get in.
#[derive(Debug)]
pub enum Refused {
    /// It was answered with ERR (wrong password, TLS, ...): the exchange ended normally.
    Answered(String),
    /// The connection failed or spoke nonsense.
    Io(io::Error),
}

/// What waitless offers clients: what it can relay and pool. Not offered: compression
/// (not supported yet), CLIENT_SSL (added when the listener has tls), optional result set metadata, query attributes and
/// MariaDB's extended capabilities (they change packet shapes the relay tracks).
const OFFER_CAPS: CapabilityFlags = CapabilityFlags::from_bits_truncate(
    SESSION_CAPS.bits()
        | CapabilityFlags::CLIENT_LONG_PASSWORD.bits()
        | CapabilityFlags::CLIENT_CONNECT_WITH_DB.bits()
        | CapabilityFlags::CLIENT_PROTOCOL_41.bits()
        | CapabilityFlags::CLIENT_IGNORE_SIGPIPE.bits()
        | CapabilityFlags::CLIENT_RESERVED.bits()
        | CapabilityFlags::CLIENT_SECURE_CONNECTION.bits()
        | CapabilityFlags::CLIENT_PLUGIN_AUTH.bits()
        | CapabilityFlags::CLIENT_CONNECT_ATTRS.bits()
        | CapabilityFlags::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA.bits(),
);

/// An SSLRequest is a HandshakeResponse cut after its fixed 32 bytes.
const SSL_REQUEST_LEN: usize = 32;

const ER_ACCESS_DENIED: u16 = 1045;
const ER_HANDSHAKE_ERROR: u16 = 1043;
const ER_NOT_SUPPORTED_AUTH_MODE: u16 = 1251;

/// What a client was greeted with, for the rest of its login.
#[derive(Debug)]
pub struct Greeted {
    /// The nonce its password is scrambled with.
    nonce: Vec<u8>,
    /// The capabilities offered to it.
    offered: CapabilityFlags,
    /// The server's default collation, for a client that names none.
    collation: u8,
}

/// Greets the client and reads its first answer: its HandshakeResponse, or an SSLRequest
/// when it wants TLS (`tls`: the listener offers it). The answer is read to its last byte
/// and no further: after an SSLRequest the client's TLS handshake follows at once, and it
/// must stay in the socket for the TLS layer to read.
pub async fn greet<S>(
    io: &mut PacketIo<S>,
    profile: &Profile,
    connection_id: u32,
    tls: bool,
) -> Result<(Greeted, Packet), Refused>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let nonce = nonce();
    // Bit 0 (CLIENT_MYSQL to MariaDB) set: no MariaDB extended capabilities are offered.
    let mut offered = (profile.caps & OFFER_CAPS) | CapabilityFlags::CLIENT_LONG_PASSWORD;
    if tls {
        // waitless's own TLS, whatever the server's: the client's session ends here.
        offered |= CapabilityFlags::CLIENT_SSL;
    }
    let (head, tail) = nonce.split_at(8);
    let mut scramble_1 = [0u8; 8];
    scramble_1.copy_from_slice(head);
    let mut scramble_2 = tail.to_vec();
    // Servers end the nonce with NUL; clients read 13 bytes for its second part.
    scramble_2.push(0);
    let greeting = HandshakePacket::new(
        10,
        profile.version.as_slice(),
        connection_id,
        scramble_1,
        Some(scramble_2),
        offered,
        profile.collation,
        profile.status,
        Some(AuthPlugin::MysqlNativePassword.as_bytes()),
    );
    let mut buf = Vec::new();
    greeting.serialize(&mut buf);
    io.send(0, &buf).await.map_err(Refused::Io)?;
    let reply = if tls {
        io.read_alone(MAX_HANDSHAKE_PACKET)
            .await
            .map_err(Refused::Io)?
            .ok_or_else(closed)?
    } else {
        read(io).await?
    };
    let greeted = Greeted {
        nonce,
        offered,
        collation: profile.collation,
    };
    Ok((greeted, reply))
}

/// True when the client's answer to the greeting is an SSLRequest and TLS was offered.
pub fn asks_tls(greeted: &Greeted, reply: &Packet) -> bool {
    greeted.offered.contains(CapabilityFlags::CLIENT_SSL) && is_ssl_request(reply)
}

/// Reads the HandshakeResponse that follows an SSLRequest, over TLS.
pub async fn response<S>(io: &mut PacketIo<S>) -> Result<Packet, Refused>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    read(io).await
}

/// Checks the login in `reply` (the HandshakeResponse) and returns who it is.
pub async fn log_in<S>(
    io: &mut PacketIo<S>,
    greeted: Greeted,
    reply: Packet,
    users: &[MysqlUser],
    host: &str,
) -> Result<Login, Refused>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Greeted {
        nonce,
        offered,
        collation: default_collation,
    } = greeted;
    let seq = reply.seq.wrapping_add(1);
    if is_ssl_request(&reply) {
        // Without tls on the listener CLIENT_SSL was not offered; with it, this is a second
        // SSLRequest, over TLS already.
        let msg = if offered.contains(CapabilityFlags::CLIENT_SSL) {
            "SSL requested twice"
        } else {
            "this waitless listener does not support TLS (it has no tls): connect without \
             TLS (mariadb --skip-ssl, mysql --ssl-mode=DISABLED) or give the listener tls"
        };
        return refuse(io, seq, ER_HANDSHAKE_ERROR, b"08S01", msg).await;
    }
    let resp: HandshakeResponse<'_> = ParseBuf(&reply.payload)
        .parse(())
        .map_err(|e| Refused::Io(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    let caps = resp.capabilities() & offered;
    if !caps
        .contains(CapabilityFlags::CLIENT_PROTOCOL_41 | CapabilityFlags::CLIENT_SECURE_CONNECTION)
    {
        let msg = "waitless needs a client that speaks protocol 4.1 with secure authentication";
        return refuse(io, seq, ER_NOT_SUPPORTED_AUTH_MODE, b"08004", msg).await;
    }
    let name = String::from_utf8_lossy(resp.user()).into_owned();
    let db = resp
        .db_name()
        .filter(|d| !d.is_empty() && caps.contains(CapabilityFlags::CLIENT_CONNECT_WITH_DB))
        .map(<[u8]>::to_vec);
    let collation = match resp.collation() {
        0 => default_collation,
        c => c,
    };

    // A client that started with another plugin is asked to answer our nonce with
    // mysql_native_password instead.
    let wants_other = resp
        .auth_plugin()
        .is_some_and(|p| *p != AuthPlugin::MysqlNativePassword);
    let (token, seq) = if wants_other && caps.contains(CapabilityFlags::CLIENT_PLUGIN_AUTH) {
        let mut data = nonce.clone();
        data.push(0);
        let switch = AuthSwitchRequest::new(AuthPlugin::MysqlNativePassword.as_bytes(), data);
        let mut buf = Vec::new();
        switch.serialize(&mut buf);
        io.send(seq, &buf).await.map_err(Refused::Io)?;
        let answer = read(io).await?;
        (answer.payload.to_vec(), answer.seq.wrapping_add(1))
    } else {
        (resp.scramble_buf().to_vec(), seq)
    };

    let user = users.iter().find(|u| u.user == name);
    let expected = scramble_native(&nonce, user.map_or(&b""[..], |u| u.password.as_bytes()));
    let good = match (user, expected) {
        (Some(_), Some(exp)) => same(&token, &exp),
        (Some(_), None) => token.is_empty(),
        (None, _) => false,
    };
    let Some(user) = user.filter(|_| good) else {
        let using = if token.is_empty() { "NO" } else { "YES" };
        let msg = format!("Access denied for user '{name}'@'{host}' (using password: {using})");
        return refuse(io, seq, ER_ACCESS_DENIED, b"28000", &msg).await;
    };
    Ok(Login {
        user: user.clone(),
        key: SessionKey {
            user: name,
            caps: caps & SESSION_CAPS,
            collation,
        },
        db,
        seq,
    })
}

/// Sends ERR to a client before it logged in.
async fn refuse<S, T>(
    io: &mut PacketIo<S>,
    seq: u8,
    code: u16,
    state: &[u8; 5],
    msg: &str,
) -> Result<T, Refused>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    io.send(seq, &err_payload(code, state, msg))
        .await
        .map_err(Refused::Io)?;
    Err(Refused::Answered(msg.to_string()))
}

async fn read<S>(io: &mut PacketIo<S>) -> Result<Packet, Refused>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    io.read(MAX_HANDSHAKE_PACKET)
        .await
        .map_err(Refused::Io)?
        .ok_or_else(closed)
}

fn closed() -> Refused {
    Refused::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "client closed during login",
    ))
}

/// An SSLRequest: a HandshakeResponse cut after its fixed part.
fn is_ssl_request(reply: &Packet) -> bool {
    reply.payload.len() == SSL_REQUEST_LEN
}

/// Compares without an early exit, so timing tells nothing about the password.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 20 random printable bytes without `$`, as servers make them (the nonce travels as a
/// NUL-terminated string).
fn nonce() -> Vec<u8> {
    let mut raw = [0u8; 20];
    // SAFETY: getrandom writes at most raw.len() bytes into raw.
    let n = unsafe { libc::getrandom(raw.as_mut_ptr().cast(), raw.len(), 0) };
    if n != raw.len() as isize {
        // The kernel's generator cannot fail for 20 bytes after boot; never send a
        // predictable nonce all the same.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for (i, b) in raw.iter_mut().enumerate() {
            *b = (t >> ((i % 16) * 8)) as u8 ^ (i as u8).wrapping_mul(151);
        }
    }
    raw.iter()
        .map(|b| match 0x21 + b % 94 {
            b'$' => b'#',
            c => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_printable_and_differ() {
        let a = nonce();
        assert_eq!(a.len(), 20);
        assert!(a.iter().all(|b| (0x21..0x7F).contains(b) && *b != b'$'));
        assert_ne!(a, nonce());
    }

    #[test]
    fn comparison_needs_every_byte() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }
}
