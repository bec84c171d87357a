//! Close control, the heart of waitless: who closes first on every connection, and the
//! accounting that proves where TIME_WAIT landed.
//!
//! - `stream`: `Tracked<S>`, the socket wrapper every protocol uses; it carries out the
//!   listener's or upstream's `time_wait` policy and records each close once.
//! - `server`: `ServerSocket`, a tracked socket to an upstream server, TCP or unix.
//! - `ledger`: counts of closes per side, by who closed first, how and why.
//! - `census`: the kernel's own count of sockets by TCP state, to check the ledger against.

pub mod census;
pub mod ledger;
mod server;
mod stream;

pub use ledger::{Closer, How, Ledger, Reason, SideId, SideLedger, TimeWaitAt};
pub use server::ServerSocket;
pub use stream::{is_established, peek_one, ClientPolicy, CloseCtl, Socket, Tracked};
