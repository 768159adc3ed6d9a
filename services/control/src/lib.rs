//! The control console of a running LLMasOS: a `control` actor in the supervision tree
//! that serves commands (`tree`, `ps`, `top`, `requests`, `devices`, `kill`, `restart`,
//! `inject`, `faults`, `stats`, `help`) on a Unix socket in the state directory, and the
//! blocking client that `llmos repl` and `llmos ctl` use.
//!
//! Protocol: one JSON request per line (`{"cmd":"tree","args":[]}`), one JSON response
//! per line (`{"ok":true,"text":"…"}` or `{"ok":false,"error":"…"}`). A plain line of
//! words (`kill llmos/journal`) is accepted too, so `socat` is enough to poke at it.

mod client;
mod commands;
mod protocol;
mod server;

pub use client::Client;
pub use commands::{CommandInfo, COMMANDS};
pub use protocol::{Request, Response, MAX_LINE};
pub use server::{check_socket_free, control_spec, socket_path, ControlError, SOCKET_NAME};
