//! A blocking client for the control socket, for `llmos repl` / `llmos ctl` and tests:
//! blocking because both are a human or a script waiting on one answer at a time.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::protocol::{Request, Response};

/// One connection to a control socket.
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> std::io::Result<Client> {
        let stream = UnixStream::connect(path).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot connect to {} ({e}); is `llmos serve` running on this state directory?",
                    path.display()
                ),
            )
        })?;
        let writer = stream.try_clone()?;
        Ok(Client {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// The socket this client talks to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request and waits for its response.
    pub fn call(&mut self, request: &Request) -> std::io::Result<Response> {
        let mut line = serde_json::to_string(request).map_err(std::io::Error::other)?;
        line.push('\n');
        self.send_raw(&line)
    }

    /// Sends `cmd args…` and returns the text, or the server's error as `Err`.
    pub fn command(&mut self, cmd: &str, args: &[&str]) -> std::io::Result<Result<String, String>> {
        Ok(self
            .call(&Request::new(cmd, args.iter().copied()))?
            .into_result())
    }

    /// Sends a raw line (it should end in a newline) and reads one response line: for
    /// tests of what the server does with garbage.
    pub fn send_raw(&mut self, line: &str) -> std::io::Result<Response> {
        self.writer.write_all(line.as_bytes())?;
        self.writer.flush()?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        serde_json::from_str(answer.trim_end()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("malformed response: {e}"),
            )
        })
    }
}
