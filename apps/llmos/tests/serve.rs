//! End-to-end tests of `llmos serve`: the real binary on a free loopback port, driven by
//! a minimal HTTP/1.1 client over `std::net::TcpStream` (and by `curl`).
//!
//! Readiness: the server prints `listening on http://ADDR` once it accepts connections;
//! the test then polls `/health` with a bounded retry loop. A guard kills a server that
//! outlives its test, so a bug fails the test instead of hanging CI. Slow generation for
//! the overload and SIGKILL tests comes from the `task.step=sleep(MS)` fault point, so
//! "mid-stream" is a fact, not a race.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

/// Only catches hangs.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models/stories260K/stories260K-f32.gguf")
}

/// A running `llmos serve`, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Server {
    fn start(state_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let model = model();
        let mut args = vec!["--model", model.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        Self::start_bare(state_dir, &args, env)
    }

    /// Without the default `--model`.
    fn start_bare(state_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
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

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Response {
        try_request(self.addr, method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.logs()))
    }

    fn post(&self, path: &str, body: &Value) -> Response {
        self.request("POST", path, &[], Some(&body.to_string()))
    }

    fn kill9(&mut self) {
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

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed) * 1000 + u64::from(std::process::id())
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Asserts an OpenAI-style error body with this status and code.
    fn assert_error(&self, status: u16, code: &str) -> Value {
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

/// Reads an HTTP/1.1 body with `Transfer-Encoding: chunked` as a plain byte stream.
struct Dechunk<R> {
    inner: R,
    left: usize,
    chunked: bool,
    done: bool,
}

impl<R: BufRead> Read for Dechunk<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.chunked {
            return self.inner.read(buf);
        }
        if self.done {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            self.inner.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                self.done = true;
                return Ok(0);
            }
            self.left = size;
        }
        let want = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n;
        if self.left == 0 {
            let mut crlf = [0u8; 2];
            self.inner.read_exact(&mut crlf)?;
        }
        Ok(n)
    }
}

/// A response's body, readable as it arrives.
type Body = BufReader<Dechunk<BufReader<TcpStream>>>;

/// Response headers in order.
type Headers = Vec<(String, String)>;

/// Sends a request and reads the status line and headers; the body is left to read.
fn open(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> std::io::Result<(u16, Headers, Body)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let body = body.unwrap_or("");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = BufReader::new(Dechunk {
        inner: reader,
        left: 0,
        chunked,
        done: false,
    });
    Ok((status, headers, body))
}

fn try_request(
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

/// One SSE event: its `id:` and `data:`.
#[derive(Clone, Debug, PartialEq)]
struct SseEvent {
    id: Option<String>,
    data: String,
}

/// Reads SSE events one at a time.
struct Sse<R> {
    reader: R,
}

impl<R: BufRead> Sse<R> {
    fn next(&mut self) -> Option<SseEvent> {
        let mut id = None;
        let mut data: Option<String> = None;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).ok()? == 0 {
                return data.map(|data| SseEvent { id, data });
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if let Some(data) = data {
                    return Some(SseEvent { id, data });
                }
                continue;
            }
            if let Some(v) = line.strip_prefix("id:") {
                id = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                let v = v.strip_prefix(' ').unwrap_or(v);
                data = Some(match data {
                    Some(d) => format!("{d}\n{v}"),
                    None => v.to_string(),
                });
            }
        }
    }

    fn rest(&mut self) -> Vec<SseEvent> {
        std::iter::from_fn(|| self.next()).collect()
    }
}

fn sse(
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
type Tok = (u32, u64, String);

/// The tokens and the end of a completion stream; checks ids and `[DONE]`.
fn tokens_of(events: &[SseEvent]) -> (Vec<Tok>, Value) {
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

fn text(tokens: &[Tok]) -> String {
    tokens.iter().map(|t| t.2.as_str()).collect()
}

const PROMPT: &str = "Once upon a time";

#[test]
fn completion_equals_llmos_run_and_models_health_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("state"), &[], &[]);

    let models = server.request("GET", "/v1/models", &[], None);
    assert_eq!(models.status, 200);
    let models = models.json();
    assert_eq!(models["object"], "list");
    let model_id = models["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(model_id, "stories260K-f32.gguf");

    let out = Command::new(env!("CARGO_BIN_EXE_llmos"))
        .args([
            "run",
            "--temperature",
            "0",
            "--max-tokens",
            "40",
            "--prompt",
            PROMPT,
            "--model",
        ])
        .arg(model())
        .env_remove("LLMOS_FAILPOINTS")
        .output()
        .unwrap();
    assert!(out.status.success());
    let expected = String::from_utf8(out.stdout).unwrap();
    let expected = expected.strip_suffix('\n').unwrap_or(&expected);

    let resp = server.post(
        "/v1/completions",
        &json!({"model": model_id, "prompt": PROMPT, "max_tokens": 40, "temperature": 0}),
    );
    assert_eq!(resp.status, 200, "{}", resp.body);
    let body = resp.json();
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], expected);
    let id = body["id"].as_str().unwrap();
    assert!(id.starts_with("cmpl-"), "{id}");
    assert_eq!(resp.header("x-request-id"), Some(id));
    let finish = body["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(finish == "stop" || finish == "length");
    let usage = &body["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=40).contains(&completion));
    assert_eq!(finish == "length", completion == 40);
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );

    let health = server.request("GET", "/health", &[], None);
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");
    assert_eq!(health.json()["journal"], "open");

    let metrics = server.request("GET", "/metrics", &[], None);
    assert_eq!(metrics.status, 200);
    for needle in [
        "llmos_requests_total 1",
        "llmos_tokens_total ",
        "llmos_tokens_per_second ",
        "llmos_queue_depth ",
        "llmos_kv_blocks{device=\"cpu:0\",state=\"used\"}",
        "llmos_kv_blocks{device=\"cpu:0\",state=\"free\"}",
        "llmos_actor_restarts_total{actor=\"llmos/devices/cpu:0/engine\"}",
        "llmos_actor_availability{actor=\"llmos/journal\"} 1",
        "llmos_http_requests_total{route=\"/v1/completions\",status=\"200\"} 1",
    ] {
        assert!(
            metrics.body.contains(needle),
            "missing {needle} in\n{}",
            metrics.body
        );
    }
}

#[test]
fn streaming_has_token_ids_usage_and_done() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("state"), &[], &[]);
    let request = json!({"prompt": PROMPT, "max_tokens": 30, "temperature": 0});
    let whole = server.post("/v1/completions", &request).json();

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (status, headers, mut events) =
        sse(&server, "POST", "/v1/completions", &[], Some(&streamed));
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("content-type")
                && v.starts_with("text/event-stream"))
    );
    let id = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("x-request-id"))
        .unwrap()
        .1
        .clone();
    let events = events.rest();
    let (tokens, end) = tokens_of(&events);
    let indices: Vec<u32> = tokens.iter().map(|t| t.0).collect();
    assert_eq!(indices, (0..tokens.len() as u32).collect::<Vec<_>>());
    assert_eq!(text(&tokens), whole["choices"][0]["text"].as_str().unwrap());
    assert_eq!(end["id"], id.as_str());
    assert_eq!(
        end["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    assert_eq!(
        end["usage"]["completion_tokens"].as_u64().unwrap(),
        tokens.len() as u64
    );
    // The final chunk's id repeats the last token's index.
    assert_eq!(
        events[events.len() - 2].id.as_deref(),
        Some((tokens.len() - 1).to_string().as_str())
    );

    // Reattach after the end with ?after=N: the rest, replayed, identical.
    let (status, _, mut again) = sse(
        &server,
        "GET",
        &format!("/v1/requests/{id}/events?after=4"),
        &[],
        None,
    );
    assert_eq!(status, 200);
    let (rest, _) = tokens_of(&again.rest());
    assert_eq!(rest, tokens[5..].to_vec());
}

#[test]
fn chat_completions_use_the_default_template() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("state"), &[], &[]);
    let messages = json!([{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me one."}]);
    let resp = server.post(
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 20, "temperature": 0}),
    );
    assert_eq!(resp.status, 200, "{}", resp.body);
    let body = resp.json();
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let content = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();

    // The same as a completion of the documented template.
    let prompt = "system: You tell stories.\nuser: Tell me one.\nassistant:";
    let plain = server
        .post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 20, "temperature": 0}),
        )
        .json();
    assert_eq!(plain["choices"][0]["text"], content.as_str());

    let (status, _, mut events) = sse(
        &server,
        "POST",
        "/v1/chat/completions",
        &[],
        Some(&json!({"messages": messages, "max_tokens": 20, "temperature": 0, "stream": true})),
    );
    assert_eq!(status, 200);
    let events = events.rest();
    let first: Value = serde_json::from_str(&events[0].data).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let (tokens, _) = tokens_of(&events);
    assert_eq!(text(&tokens), content);
}

#[test]
fn bad_input_gets_openai_errors_and_never_hurts_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("state"), &[], &[]);
    let post = |body: &str| server.request("POST", "/v1/completions", &[], Some(body));

    post("{not json").assert_error(400, "invalid_json");
    post("").assert_error(400, "invalid_json");
    post("\u{1}\u{2}").assert_error(400, "invalid_json");
    post("[1,2]").assert_error(422, "invalid_parameter");
    let e = post(r#"{"model":"gpt-4","prompt":"hi"}"#).assert_error(404, "model_not_found");
    assert_eq!(e["error"]["param"], "model");
    for (body, param) in [
        (r#"{"max_tokens":5}"#, "prompt"),
        (r#"{"prompt":7}"#, "prompt"),
        (r#"{"prompt":"hi","temperature":5}"#, "temperature"),
        (r#"{"prompt":"hi","temperature":"hot"}"#, "temperature"),
        (r#"{"prompt":"hi","top_p":0}"#, "top_p"),
        (r#"{"prompt":"hi","max_tokens":0}"#, "max_tokens"),
        (r#"{"prompt":"hi","max_tokens":-3}"#, "max_tokens"),
        (r#"{"prompt":"hi","stop":["a","b","c","d","e"]}"#, "stop"),
        (r#"{"prompt":"hi","n":3}"#, "n"),
        (
            r#"{"prompt":"hi","frequency_penalty":0.5}"#,
            "frequency_penalty",
        ),
        (r#"{"prompt":"hi","stream":"yes"}"#, "stream"),
    ] {
        let e = post(body).assert_error(422, "invalid_parameter");
        assert_eq!(e["error"]["param"], param, "{body}");
    }
    let chat = |body: &str| server.request("POST", "/v1/chat/completions", &[], Some(body));
    chat(r#"{"messages":[]}"#).assert_error(422, "invalid_parameter");
    chat(r#"{"messages":[{"role":"wizard","content":"x"}]}"#)
        .assert_error(422, "invalid_parameter");
    chat(r#"{"messages":[{"role":"user"}]}"#).assert_error(422, "invalid_parameter");

    let long = "once upon a time ".repeat(2000);
    let e = server
        .post("/v1/completions", &json!({"prompt": long, "max_tokens": 4}))
        .assert_error(400, "context_length_exceeded");
    assert_eq!(e["error"]["param"], "prompt");

    server
        .request("GET", "/v1/requests/cmpl-999/events", &[], None)
        .assert_error(404, "request_not_found");
    server
        .request("GET", "/v1/requests/banana/events", &[], None)
        .assert_error(404, "request_not_found");
    server
        .request(
            "GET",
            "/v1/requests/cmpl-1/events",
            &[("Last-Event-ID", "x")],
            None,
        )
        .assert_error(422, "invalid_parameter");
    server
        .request("GET", "/nope", &[], None)
        .assert_error(404, "not_found");

    // Garbage on the socket, then a client that hangs up mid-request.
    for junk in [
        "GARBAGE\r\n\r\n",
        "POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"pro",
    ] {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(junk.as_bytes()).unwrap();
    }
    let health = server.request("GET", "/health", &[], None);
    assert_eq!(health.status, 200, "{}", health.body);
    let ok = server.post(
        "/v1/completions",
        &json!({"prompt": PROMPT, "max_tokens": 3}),
    );
    assert_eq!(ok.status, 200);
}

#[test]
fn api_key_is_required_when_set() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("a"), &["--api-key", "sesame"], &[]);
    let body = json!({"prompt": PROMPT, "max_tokens": 2}).to_string();
    server
        .request("POST", "/v1/completions", &[], Some(&body))
        .assert_error(401, "invalid_api_key");
    server
        .request(
            "POST",
            "/v1/completions",
            &[("Authorization", "Bearer nope")],
            Some(&body),
        )
        .assert_error(401, "invalid_api_key");
    server
        .request("GET", "/v1/models", &[], None)
        .assert_error(401, "invalid_api_key");
    let ok = server.request(
        "POST",
        "/v1/completions",
        &[("Authorization", "Bearer sesame")],
        Some(&body),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(server.request("GET", "/health", &[], None).status, 200);
    drop(server);

    let server = Server::start(&dir.path().join("b"), &[], &[("LLMOS_API_KEY", "from-env")]);
    server
        .request("GET", "/v1/models", &[], None)
        .assert_error(401, "invalid_api_key");
    assert_eq!(
        server
            .request(
                "GET",
                "/v1/models",
                &[("Authorization", "Bearer from-env")],
                None
            )
            .status,
        200
    );
}

#[test]
fn overload_answers_429_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("state"),
        &["--max-active", "1"],
        &[("LLMOS_FAILPOINTS", "task.step=sleep(20)")],
    );
    let request = json!({"prompt": PROMPT, "max_tokens": 20, "temperature": 0});
    // The burst comes first, on a fresh server, so every slot is free when it starts.
    let addr = server.addr;
    let body = request.to_string();
    let results: Vec<Response> = (0..6)
        .map(|_| {
            let body = body.clone();
            thread::spawn(move || {
                try_request(addr, "POST", "/v1/completions", &[], Some(&body)).unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let (mut ok, mut refused) = (0, 0);
    let mut texts = Vec::new();
    for resp in &results {
        match resp.status {
            200 => {
                ok += 1;
                texts.push(resp.json()["choices"][0]["text"].clone());
            }
            429 => {
                refused += 1;
                resp.assert_error(429, "overloaded");
                assert_eq!(resp.header("retry-after"), Some("1"));
            }
            other => panic!("unexpected {other}: {}", resp.body),
        }
    }
    assert!(ok >= 1 && refused >= 1, "ok {ok}, refused {refused}");
    let health = server.request("GET", "/health", &[], None);
    assert_eq!(health.status, 200, "{}", health.body);
    // The slot is released just after the last response went out (the scheduler hears of
    // it asynchronously), so a client honours Retry-After, as OpenAI's clients do.
    let mut after = server.post("/v1/completions", &request);
    for _ in 0..5 {
        if after.status != 429 {
            break;
        }
        let wait: u64 = after.header("retry-after").unwrap().parse().unwrap();
        thread::sleep(Duration::from_secs(wait));
        after = server.post("/v1/completions", &request);
    }
    assert_eq!(after.status, 200, "{}", after.body);
    let expected = after.json()["choices"][0]["text"].clone();
    assert_eq!(after.json()["usage"]["completion_tokens"], 20);
    for text in texts {
        assert_eq!(text, expected, "an admitted request is complete");
    }
}

#[test]
fn sigkill_mid_stream_then_resume_with_last_event_id() {
    let dir = tempfile::tempdir().unwrap();
    let request =
        json!({"prompt": PROMPT, "max_tokens": 60, "temperature": 0.8, "seed": 11, "stream": true});

    // Fault-free reference.
    let reference = Server::start(&dir.path().join("reference"), &[], &[]);
    let (_, _, mut events) = sse(&reference, "POST", "/v1/completions", &[], Some(&request));
    let (expected, expected_end) = tokens_of(&events.rest());
    drop(reference);
    assert!(
        expected.len() > 8,
        "need a long enough stream, got {}",
        expected.len()
    );

    let state = dir.path().join("state");
    let mut first = Server::start(&state, &[], &[("LLMOS_FAILPOINTS", "task.step=sleep(50)")]);
    let (status, headers, mut events) = sse(&first, "POST", "/v1/completions", &[], Some(&request));
    assert_eq!(status, 200);
    let id = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("x-request-id"))
        .unwrap()
        .1
        .clone();
    let mut seen = Vec::new();
    while seen.len() < 4 {
        seen.push(events.next().expect("a token before the kill"));
    }
    first.kill9();
    let (before, _) = {
        let mut with_done = seen.clone();
        with_done.push(SseEvent {
            id: None,
            data: "[DONE]".into(),
        });
        tokens_of(&with_done)
    };
    let last_id = seen.last().unwrap().id.clone().unwrap();

    let second = Server::start(&state, &[], &[]);
    let (status, _, mut events) = sse(
        &second,
        "GET",
        &format!("/v1/requests/{id}/events"),
        &[("Last-Event-ID", &last_id)],
        None,
    );
    assert_eq!(status, 200);
    let (after, end) = tokens_of(&events.rest());
    let joined: Vec<Tok> = before.into_iter().chain(after).collect();
    assert_eq!(
        joined, expected,
        "joined stream equals the fault-free one token for token"
    );
    assert_eq!(
        end["choices"][0]["finish_reason"],
        expected_end["choices"][0]["finish_reason"]
    );
    assert_eq!(end["usage"], expected_end["usage"]);
    assert_eq!(second.request("GET", "/health", &[], None).status, 200);
}

#[test]
fn curl_streams_and_completes() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("curl not on PATH: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("state"), &[], &[]);
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let curl = |body: Value| {
        let out = Command::new("curl")
            .args([
                "-sS",
                "-N",
                "--max-time",
                "60",
                "-i",
                "-H",
                "Content-Type: application/json",
                "-d",
            ])
            .arg(body.to_string())
            .arg(&url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let whole = curl(json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10}));
    assert!(whole.starts_with("HTTP/1.1 200"), "{whole}");
    assert!(
        whole.to_lowercase().contains("x-request-id: chatcmpl-"),
        "{whole}"
    );
    assert!(whole.contains("\"chat.completion\""), "{whole}");
    let streamed = curl(
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10, "stream": true}),
    );
    assert!(
        streamed.contains("\nid: 0\n") || streamed.contains("\nid:0\n"),
        "{streamed}"
    );
    assert!(streamed.contains("\"chat.completion.chunk\""), "{streamed}");
    assert!(streamed.trim_end().ends_with("data: [DONE]"), "{streamed}");
}

#[test]
fn a_client_reconnects_mid_stream_and_a_second_viewer_sees_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let request =
        json!({"prompt": PROMPT, "max_tokens": 40, "temperature": 0.8, "seed": 3, "stream": true});
    let server = Server::start(
        &dir.path().join("state"),
        &[],
        &[("LLMOS_FAILPOINTS", "task.step=sleep(30)")],
    );
    let (_, headers, mut events) = sse(&server, "POST", "/v1/completions", &[], Some(&request));
    let id = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("x-request-id"))
        .unwrap()
        .1
        .clone();
    let seen: Vec<SseEvent> = (0..3).map(|_| events.next().unwrap()).collect();
    drop(events); // the client hangs up; the request goes on
    let last = seen.last().unwrap().id.clone().unwrap();
    let (_, _, mut viewer) = sse(
        &server,
        "GET",
        &format!("/v1/requests/{id}/events"),
        &[],
        None,
    );
    let (_, _, mut resumed) = sse(
        &server,
        "GET",
        &format!("/v1/requests/{id}/events"),
        &[("Last-Event-ID", &last)],
        None,
    );
    let (all, end) = tokens_of(&viewer.rest());
    let (rest, _) = tokens_of(&resumed.rest());
    let mut with_done = seen.clone();
    with_done.push(SseEvent {
        id: None,
        data: "[DONE]".into(),
    });
    let (before, _) = tokens_of(&with_done);
    let joined: Vec<Tok> = before.into_iter().chain(rest).collect();
    assert_eq!(joined, all);
    assert_eq!(
        end["usage"]["completion_tokens"].as_u64().unwrap(),
        all.len() as u64
    );
}

#[test]
fn without_a_model_it_serves_a_synthetic_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_bare(&dir.path().join("state"), &[], &[]);
    let models = server.request("GET", "/v1/models", &[], None).json();
    assert_eq!(models["data"][0]["id"], "synth-tiny.gguf");
    let resp = server.post(
        "/v1/completions",
        &json!({"prompt": "hello", "max_tokens": 5}),
    );
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert!(
        server.logs().contains("--model"),
        "the log says how to pass a real model"
    );
}

#[test]
fn sigterm_shuts_down_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("state"), &[], &[]);
    let pid = server.child.id() as libc::pid_t;
    signal(pid, libc::SIGTERM);
    let (tx, rx) = mpsc::channel();
    let mut child = std::mem::replace(
        &mut server.child,
        Command::new("true").spawn().expect("placeholder"),
    );
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = rx
        .recv_timeout(IO_TIMEOUT)
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}\n{}", server.logs());
    assert!(server.logs().contains("shut down"), "{}", server.logs());
}

/// Sends `sig` to our own child.
#[allow(unsafe_code)]
fn signal(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill(2) takes plain integers; `pid` is a child this test started and still holds.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// Runs `llmos ctl --state-dir DIR ARGS…`; returns success and stdout (or stderr).
fn ctl(state: &Path, args: &[&str]) -> (bool, String) {
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

#[test]
fn ctl_drives_a_running_server_and_a_killed_task_completes_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let request =
        json!({"prompt": PROMPT, "max_tokens": 40, "temperature": 0.8, "seed": 5, "stream": true});
    let reference = Server::start(&dir.path().join("reference"), &[], &[]);
    let (_, _, mut events) = sse(&reference, "POST", "/v1/completions", &[], Some(&request));
    let (expected, _) = tokens_of(&events.rest());
    drop(reference);

    let state = dir.path().join("state");
    // Slow tokens down so the request is still running when it is killed.
    let server = Server::start(&state, &[], &[("LLMOS_FAILPOINTS", "task.step=sleep(30)")]);
    let (ok, tree) = ctl(&state, &["tree"]);
    assert!(ok, "{tree}");
    for actor in [
        "journal",
        "models",
        "engine",
        "pool",
        "scheduler",
        "requests",
        "control",
    ] {
        assert!(tree.contains(actor), "tree lacks {actor}:\n{tree}");
    }

    let (status, headers, mut events) =
        sse(&server, "POST", "/v1/completions", &[], Some(&request));
    assert_eq!(status, 200);
    let id = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("x-request-id"))
        .unwrap()
        .1
        .clone();
    let number: u64 = id
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap();
    let task = format!("llmos/requests/req-{number}");
    let mut seen = vec![events.next().expect("a first token")];

    let (ok, requests) = ctl(&state, &["requests"]);
    assert!(
        ok && requests.contains(&format!("req-{number}")),
        "{requests}"
    );
    let (ok, killed) = ctl(&state, &["kill", &task]);
    assert!(ok, "{killed}");
    // The next token comes from the restarted task: the restart is visible now.
    seen.push(events.next().expect("a token after the kill"));
    let (ok, node) = ctl(&state, &["tree", &task]);
    assert!(ok && node.contains("restarts=1"), "{node}");
    assert!(node.contains("killed"), "last failure shown: {node}");

    seen.extend(events.rest());
    let (tokens, _) = tokens_of(&seen);
    assert_eq!(
        tokens, expected,
        "the killed request completes with the fault-free text"
    );

    let (ok, error) = ctl(&state, &["kill", "llmos/nope"]);
    assert!(!ok && error.contains("llmos/nope"), "{error}");
    let (ok, error) = ctl(&state, &["frobnicate"]);
    assert!(!ok && error.contains("frobnicate"), "{error}");
    assert!(
        ctl(&state, &["tree"]).0,
        "the server keeps serving its console"
    );
    drop(server);
}

#[test]
fn the_official_openai_python_client_works() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let have_openai = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !have_openai {
        // .ci/run installs the package and sets LLMOS_REQUIRE_OPENAI, so CI never skips.
        assert!(
            std::env::var_os("LLMOS_REQUIRE_OPENAI").is_none(),
            "the openai package is required (pip install openai)"
        );
        eprintln!("SKIPPED: python3 cannot import openai (pip install openai to run this test)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[], &[]);
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(format!("http://{}", server.addr))
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "openai client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    let completion = seen["completion"].as_str().unwrap();
    assert!(
        completion.starts_with(", there was a little girl named Lily."),
        "{seen}"
    );
    assert_eq!(
        seen["streamed"], seen["completion"],
        "streaming gives the same text"
    );
    assert_eq!(seen["completion_finish"], "length");
    assert_eq!(seen["completion_tokens"], 30);
    assert_eq!(seen["chat_role"], "assistant");
    assert!(!seen["chat"].as_str().unwrap().is_empty(), "{seen}");
    assert_eq!(
        seen["chat_streamed"], seen["chat"],
        "chat streaming gives the same text"
    );
}
