//! Shared helpers of the end-to-end tests: start the real `llmos serve` on a free loopback
//! port, a minimal HTTP/1.1 client over `std::net::TcpStream` with an SSE reader, and
//! `llmos ctl`. Each test binary uses a different subset, hence `allow(dead_code)`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use serde_json::Value;

/// Only catches hangs.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

pub fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models/stories260K/stories260K-f32.gguf")
}

/// A running `llmos serve`, killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Server {
    pub fn start(state_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let model = model();
        let mut args = vec!["--model", model.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        Self::start_bare(state_dir, &args, env)
    }

    /// Without the default `--model`.
    pub fn start_bare(state_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let log = state_dir.with_extension(format!("log{}", rand_suffix()));
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_llmos"));
        command
            .args(["serve", "--addr", "127.0.0.1:0", "--state-dir"])
            .arg(state_dir)
            .args(extra)
            .env_remove("LLMOS_FAILPOINTS")
            .env_remove("LLMOS_API_KEY")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn llmos serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(IO_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "server did not start: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let addr: SocketAddr = line
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("address");
        let server = Server { child, addr, log };
        // Readiness poll, bounded.
        for _ in 0..200 {
            if let Ok(resp) = try_request(server.addr, "GET", "/health", &[], None) {
                if resp.status == 200 {
                    return server;
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("server never became healthy: {}", server.logs());
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Response {
        try_request(self.addr, method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.logs()))
    }

    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.request("POST", path, &[], Some(&body.to_string()))
    }

    pub fn kill9(&mut self) {
        // Child::kill is SIGKILL on Unix.
        self.child.kill().expect("kill");
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

pub fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed) * 1000 + u64::from(std::process::id())
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Asserts an OpenAI-style error body with this status and code.
    pub fn assert_error(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "body: {}", self.body);
        let body = self.json();
        let error = &body["error"];
        assert_eq!(error["code"], code, "body: {}", self.body);
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(error["type"].is_string());
        assert!(error.get("param").is_some());
        body
    }
}

pub use llmos_tests::http::{Body, Headers, Sse, SseEvent};

/// Sends a request and reads the status line and headers; the body is left to read.
pub fn open(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> std::io::Result<(u16, Headers, Body)> {
    llmos_tests::http::open(addr, method, path, headers, body, IO_TIMEOUT)
}

pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> std::io::Result<Response> {
    let (status, headers, mut reader) = open(addr, method, path, headers, body)?;
    let mut body = String::new();
    reader.read_to_string(&mut body)?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

pub fn sse(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (u16, Vec<(String, String)>, Sse<impl BufRead>) {
    let body = body.map(Value::to_string);
    let (status, headers, reader) = open(server.addr, method, path, headers, body.as_deref())
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    (status, headers, Sse { reader })
}

/// A token a stream carried: (index, token id, text).
pub type Tok = (u32, u64, String);

/// The tokens and the end of a completion stream; checks ids and `[DONE]`.
pub fn tokens_of(events: &[SseEvent]) -> (Vec<Tok>, Value) {
    assert_eq!(
        events.last().map(|e| e.data.as_str()),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut tokens = Vec::new();
    let mut end = Value::Null;
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(&event.data).expect("chunk JSON");
        let choice = &chunk["choices"][0];
        if choice["finish_reason"].is_string() {
            end = chunk.clone();
            continue;
        }
        let index = chunk["llmos"]["index"].as_u64().expect("index") as u32;
        assert_eq!(
            event.id.as_deref(),
            Some(index.to_string().as_str()),
            "SSE id = token index"
        );
        let text = choice["text"]
            .as_str()
            .or_else(|| choice["delta"]["content"].as_str())
            .unwrap_or("")
            .to_string();
        tokens.push((
            index,
            chunk["llmos"]["token"].as_u64().expect("token"),
            text,
        ));
    }
    (tokens, end)
}

pub fn text(tokens: &[Tok]) -> String {
    tokens.iter().map(|t| t.2.as_str()).collect()
}

/// Sends `sig` to our own child.
#[allow(unsafe_code)]
pub fn signal(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill(2) takes plain integers; `pid` is a child this test started and still holds.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// Runs `llmos ctl --state-dir DIR ARGS…`; returns success and stdout (or stderr).
pub fn ctl(state: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmos"))
        .arg("ctl")
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("run llmos ctl");
    let text = if out.status.success() {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    (out.status.success(), text)
}
