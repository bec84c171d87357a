//! Close control, the heart of waitless: who closes first on every connection, and the
//! accounting that proves where TIME_WAIT landed.
//!
//! - `policy`: `decide`, the one decision of how every connection is closed (who sends the
//!   first FIN, FIN or RST, what to wait for, which reason to record), from the side's
//!   settings, what the kernel says and how the protocol says the connection ended.
//! - `stream`: `Tracked<S>`, the socket wrapper every protocol uses; it carries out the
//!   steps `policy` decides and records each close once.
//! - `server`: `ServerSocket`, a tracked socket to an upstream server, TCP or unix.
//! - `ledger`: counts of closes per side, by who closed first, how and why.
//! - `census`: the kernel's own count of sockets by TCP state, to check the ledger against.

pub mod census;
pub mod ledger;
pub mod policy;
mod server;
mod stream;

pub use ledger::{Closer, How, Ledger, Reason, SideId, SideLedger, TimeWaitAt};
pub use policy::{ClientPolicy, Ending};
pub use server::ServerSocket;
pub use stream::{is_established, peek_one, CloseCtl, Socket, Tracked};
