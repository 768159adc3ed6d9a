//! The `control` actor: owns the Unix socket `<state-dir>/control.sock` (mode 0600), accepts
//! any number of clients, and answers each request line with one response line.

use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use llmos_inference::Services;
use llmos_kernel::ractor::{Actor, ActorProcessingErr, ActorRef};
use llmos_kernel::ChildSpec;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::commands::{Console, Sample};
use crate::protocol::{Request, Response, MAX_LINE};

/// The socket's file name in the state directory.
pub const SOCKET_NAME: &str = "control.sock";

/// How often the actor samples message counters, so `ps` can show rates without waiting.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A live server already answers on the socket.
    #[error("another llmos server is already serving {0}; stop it or use another --state-dir")]
    InUse(PathBuf),
    /// Something that is not a socket sits where the socket goes.
    #[error("{0} exists and is not a socket; remove it or use another --state-dir")]
    NotASocket(PathBuf),
    /// An I/O error.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The control socket of a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// Sockets this process bound and has not yet given up: a restarted control actor takes
/// its predecessor's socket over instead of mistaking it for another server's.
fn owned() -> &'static Mutex<HashSet<PathBuf>> {
    static OWNED: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    OWNED.get_or_init(Mutex::default)
}

/// Checks that no live server owns the socket of `state_dir` (for a clear error before a
/// boot, rather than a control child that fails to start).
pub fn check_socket_free(state_dir: &Path) -> Result<(), ControlError> {
    let path = socket_path(state_dir);
    if owned()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&path)
    {
        return Ok(());
    }
    match std::fs::symlink_metadata(&path) {
        Err(_) => Ok(()),
        Ok(meta) if !meta.file_type().is_socket() => Err(ControlError::NotASocket(path)),
        Ok(_) => match std::os::unix::net::UnixStream::connect(&path) {
            Ok(_) => Err(ControlError::InUse(path)),
            // Nobody listens: a stale socket of a process that died.
            Err(_) => Ok(()),
        },
    }
}

/// The bound socket file; dropping it removes the file if it is still the one bound here.
struct SocketFile {
    path: PathBuf,
    inode: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // A successor may already have replaced the file: only remove our own inode.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.inode {
                let _ = std::fs::remove_file(&self.path);
            }
        }
        owned()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.path);
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ControlError + '_ {
    move |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Binds `path` with mode 0600. The socket is bound inside a fresh owner-only directory,
/// chmodded there, then renamed into place: it is never reachable with wider permissions,
/// and without touching the process-wide umask.
fn bind(path: &Path) -> Result<(std::os::unix::net::UnixListener, SocketFile), ControlError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let is_ours = owned()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(path);
    if !is_ours {
        check_socket_free(dir)?;
    }
    let staging = dir.join(format!(".control-{}-{:x}", std::process::id(), nonce()));
    std::fs::create_dir(&staging).map_err(io_error(&staging))?;
    let result = (|| {
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error(&staging))?;
        let temp = staging.join(SOCKET_NAME);
        let listener = std::os::unix::net::UnixListener::bind(&temp).map_err(io_error(&temp))?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))
            .map_err(io_error(&temp))?;
        // rename replaces a stale socket atomically; a live one was refused above.
        std::fs::rename(&temp, path).map_err(io_error(path))?;
        let meta = std::fs::symlink_metadata(path).map_err(io_error(path))?;
        Ok((listener, (meta.dev(), meta.ino())))
    })();
    let _ = std::fs::remove_dir_all(&staging);
    let (listener, inode) = result?;
    listener.set_nonblocking(true).map_err(io_error(path))?;
    owned()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(path.to_path_buf());
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            inode,
        },
    ))
}

fn nonce() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A child spec for the control actor (a permanent worker named `control`), to pass as an
/// extra root child through `Runtime::boot_with`.
pub fn control_spec(services: Arc<Services>) -> ChildSpec {
    ChildSpec::worker("control", move |_ctx| {
        (
            ControlActor {
                services: services.clone(),
            },
            (),
        )
    })
}

/// Messages of the control actor.
#[derive(Debug)]
pub enum ControlMsg {
    /// Take a sample of the tree's message counters (for `ps` rates).
    Sample,
}

/// The control actor.
pub struct ControlActor {
    services: Arc<Services>,
}

/// One instance's socket and server task. `post_stop` does not run when the actor is
/// killed, so everything is released on drop.
pub struct ControlState {
    console: Arc<Console>,
    server: JoinHandle<()>,
    _socket: SocketFile,
}

impl Drop for ControlState {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection.
        self.server.abort();
    }
}

impl Actor for ControlActor {
    type Msg = ControlMsg;
    type State = ControlState;
    type Arguments = ();

    async fn pre_start(
        &self,
        myself: ActorRef<ControlMsg>,
        _args: (),
    ) -> Result<ControlState, ActorProcessingErr> {
        let path = socket_path(self.services.state_dir());
        let (listener, socket) = bind(&path).inspect_err(|err| {
            // The start failure reaches the tree only as an escalation; say why here.
            tracing::error!(%err, "control: cannot serve the console");
        })?;
        let listener = UnixListener::from_std(listener).map_err(io_error(&path))?;
        let console = Arc::new(Console::new(self.services.clone()));
        let server = tokio::spawn(accept_loop(listener, console.clone()));
        drop(myself.send_interval(SAMPLE_EVERY, || ControlMsg::Sample));
        tracing::info!(socket = %path.display(), "control: listening");
        Ok(ControlState {
            console,
            server,
            _socket: socket,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ControlMsg>,
        message: ControlMsg,
        state: &mut ControlState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ControlMsg::Sample => {
                if let Some(kernel) = self.services.kernel_handle() {
                    state.console.record(Sample::take(kernel));
                }
            }
        }
        Ok(())
    }
}

async fn accept_loop(listener: UnixListener, console: Arc<Console>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, console.clone()));
                }
                Err(err) => {
                    // Out of descriptors and the like: back off rather than spin.
                    tracing::warn!(%err, "control: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Answers one client until it hangs up. Anything wrong with its input is answered with
/// an error; only an unreadable or overlong line ends the connection (the stream cannot be
/// resynchronised), and no other client notices.
async fn serve_connection(stream: UnixStream, console: Arc<Console>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await;
        let (response, close) = match read {
            Ok(0) | Err(_) => return,
            Ok(n) if n >= MAX_LINE && line.last() != Some(&b'\n') => (
                Response::err(format!("request longer than {MAX_LINE} bytes")),
                true,
            ),
            Ok(_) => match std::str::from_utf8(&line) {
                Err(_) => (Response::err("request is not UTF-8"), false),
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => match Request::parse(text) {
                    Err(err) => (Response::err(err), false),
                    Ok(request) => (console.run(&request).await, false),
                },
            },
        };
        if write
            .write_all(response.to_line().as_bytes())
            .await
            .is_err()
            || close
        {
            return;
        }
    }
}
