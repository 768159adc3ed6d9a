//! End-to-end tests of the chat-session example app and of the app host around it, on
//! the real binary: history survives a crash of the app and a SIGKILL of the server, a
//! turn in flight survives both, a crash-looping app is given up without disturbing
//! anything else, and `--config` files are applied (flags winning) or refused clearly.

mod common;

use std::path::Path;
use std::thread;

use common::*;
use serde_json::{json, Value};

const APPS: &[&str] = &["--apps", "openai,chat"];
const MESSAGES: [&str; 3] = ["Once upon a time", "What did the dog do?", "The end"];

fn new_session(server: &Server) -> String {
    let created = server.post(
        "/apps/chat/sessions",
        &json!({"max_tokens": 16, "temperature": 0}),
    );
    assert_eq!(created.status, 201, "{}", created.body);
    created.json()["id"].as_str().expect("id").to_string()
}

fn say(server: &Server, session: &str, content: &str) -> Value {
    let answer = server.post(
        &format!("/apps/chat/sessions/{session}/messages"),
        &json!({ "content": content }),
    );
    assert_eq!(answer.status, 200, "{}\n{}", answer.body, server.logs());
    answer.json()
}

fn session(server: &Server, id: &str, wait_turn: Option<u32>) -> Value {
    let path = match wait_turn {
        Some(turn) => format!("/apps/chat/sessions/{id}?wait_turn={turn}"),
        None => format!("/apps/chat/sessions/{id}"),
    };
    let answer = server.request("GET", &path, &[], None);
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.json()
}

/// The replies of a fault-free conversation of `MESSAGES`.
fn reference_replies(dir: &Path) -> Vec<String> {
    let server = Server::start(dir, APPS, &[]);
    let id = new_session(&server);
    MESSAGES
        .iter()
        .map(|m| say(&server, &id, m)["reply"].as_str().unwrap().to_string())
        .collect()
}

/// Polls the session until `turn` is in progress (the state we want to crash in).
fn wait_pending(server: &Server, id: &str, turn: u32) {
    for _ in 0..2000 {
        if session(server, id, None)["pending_turn"] == turn {
            return;
        }
        thread::yield_now();
    }
    panic!("turn {turn} never became pending");
}

#[test]
fn history_survives_an_app_crash_and_a_server_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let expected = reference_replies(&dir.path().join("reference"));
    assert!(expected.iter().all(|r| !r.is_empty()), "{expected:?}");

    let state = dir.path().join("state");
    let mut server = Server::start(&state, APPS, &[]);
    let id = new_session(&server);
    assert_eq!(say(&server, &id, MESSAGES[0])["reply"], expected[0]);

    let (ok, killed) = ctl(&state, &["kill", "llmos/apps/chat/main"]);
    assert!(ok, "{killed}");
    // The next call reaches the restarted instance, which rebuilt its sessions.
    let view = session(&server, &id, None);
    assert_eq!(view["turns"].as_array().unwrap().len(), 1, "{view}");
    let (ok, node) = ctl(&state, &["tree", "llmos/apps/chat/main"]);
    assert!(ok && node.contains("restarts=1"), "{node}");
    assert_eq!(say(&server, &id, MESSAGES[1])["reply"], expected[1]);

    server.kill9();
    let server = Server::start(&state, APPS, &[]);
    let view = session(&server, &id, None);
    let messages: Vec<(&str, &str)> = view["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        messages,
        vec![
            ("user", MESSAGES[0]),
            ("assistant", expected[0].as_str()),
            ("user", MESSAGES[1]),
            ("assistant", expected[1].as_str()),
        ],
        "the history after SIGKILL and restart"
    );
    assert_eq!(say(&server, &id, MESSAGES[2])["reply"], expected[2]);
}

#[test]
fn a_turn_in_flight_survives_an_app_crash_and_a_server_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let expected = reference_replies(&dir.path().join("reference"));
    let state = dir.path().join("state");
    // Slow tokens, so each turn is still generating when the crash comes.
    let slow = [("LLMOS_FAILPOINTS", "task.step=sleep(40)")];
    let mut server = Server::start(&state, APPS, &slow);
    let id = new_session(&server);

    // The app crashes under a waiting client: the client still gets the same reply.
    let addr = server.addr;
    let (path, body) = (
        format!("/apps/chat/sessions/{id}/messages"),
        json!({ "content": MESSAGES[0] }).to_string(),
    );
    let waiting = thread::spawn(move || try_request(addr, "POST", &path, &[], Some(&body)));
    wait_pending(&server, &id, 1);
    let (ok, killed) = ctl(&state, &["kill", "llmos/apps/chat/main"]);
    assert!(ok, "{killed}");
    let answer = waiting.join().unwrap().expect("the reply");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["reply"], expected[0]);
    assert_eq!(answer.json()["request"], 1, "one request for the turn");

    // The whole server dies mid-turn: after the restart the turn completes by itself.
    let (path, body) = (
        format!("/apps/chat/sessions/{id}/messages"),
        json!({ "content": MESSAGES[1] }).to_string(),
    );
    let lost = thread::spawn(move || try_request(addr, "POST", &path, &[], Some(&body)));
    wait_pending(&server, &id, 2);
    server.kill9();
    let _ = lost.join();
    let server = Server::start(&state, APPS, &[]);
    let view = session(&server, &id, Some(2));
    let turns = view["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 2, "{view}");
    assert_eq!(turns[1]["reply"], expected[1]);
    assert_eq!(
        turns[1]["request"], 2,
        "re-attached to the journaled request, not submitted again"
    );
    assert_eq!(say(&server, &id, MESSAGES[2])["reply"], expected[2]);
}

#[test]
fn a_crash_looping_app_is_given_up_and_disturbs_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let config = dir.path().join("llmos.toml");
    // The file asks for a port the flags override (the test harness passes port 0).
    std::fs::write(
        &config,
        format!(
            "addr = \"127.0.0.1:1\"\nmodel = {:?}\nlog_format = \"json\"\n\n[apps.chat]\nenabled = true\nmax_restarts = 2\nperiod_secs = 60\nmax_backoff_ms = 0\n",
            model()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    let server = Server::start_bare(
        &state,
        &["--config", &config],
        // Every message the chat app handles makes it panic.
        &[("LLMOS_FAILPOINTS", "app.handle:chat=panic(injected)")],
    );
    // A stream of the OpenAI app runs through the whole crash loop.
    let request =
        json!({"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0, "stream": true});
    let (status, _, mut events) = sse(&server, "POST", "/v1/completions", &[], Some(&request));
    assert_eq!(status, 200);
    let first = events.next().expect("a first token");

    // Listing retries through restarts (it is idempotent), so it drives the app through
    // its whole restart allowance: 3 crashes within the period, then it is given up.
    let refused = server.request("GET", "/apps/chat/sessions", &[], None);
    refused.assert_error(503, "app_unavailable");
    let apps = server.request("GET", "/apps", &[], None).json();
    let state_of = |name: &str| {
        apps["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .map(|a| a["state"].as_str().unwrap().to_string())
    };
    assert_eq!(state_of("chat").as_deref(), Some("given_up"), "{apps}");
    assert_eq!(state_of("openai").as_deref(), Some("running"), "{apps}");
    let health = server.request("GET", "/health", &[], None);
    assert_eq!(health.status, 503, "{}", health.body);
    assert!(health.body.contains("app chat given up"), "{}", health.body);
    // Later calls are refused at once, not after waiting on an actor that is gone.
    server
        .post("/apps/chat/sessions", &json!({}))
        .assert_error(503, "app_unavailable");

    let mut all = vec![first];
    all.extend(events.rest());
    let (tokens, end) = tokens_of(&all);
    assert_eq!(tokens.len(), 30, "the stream finished undisturbed");
    assert_eq!(end["choices"][0]["finish_reason"], "length");
    let again = server.post(
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0}),
    );
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["choices"][0]["text"], text(&tokens));
    let (ok, tree) = ctl(&state, &["tree"]);
    assert!(
        ok && tree.contains("openai") && !tree.contains("chat"),
        "{tree}"
    );
    // The file's other settings took effect: its model, and JSON log lines.
    let models = server.request("GET", "/v1/models", &[], None).json();
    assert_eq!(models["data"][0]["id"], "stories260K-f32.gguf", "{models}");
    let logs = server.logs();
    let first = logs.lines().next().expect("log lines");
    let record: Value = serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert!(record["level"].is_string(), "{record}");
}

#[test]
fn configuration_mistakes_are_refused_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = model();
    for (name, text, expect) in [
        ("typo", "modle = \"x\"\n".to_string(), "unknown field `modle`"),
        (
            "unknown-app",
            format!("model = {model:?}\n[apps.nope]\nenabled = true\n"),
            "unknown app `nope`",
        ),
        (
            "bad-settings",
            format!("model = {model:?}\n[apps.chat]\nenabled = true\n[apps.chat.settings]\nmax_sessions = 0\n"),
            "max_sessions",
        ),
        (
            "bad-quota",
            format!("model = {model:?}\n[apps.chat]\nenabled = true\nmax_concurrent_requests = 0\n"),
            "max_concurrent_requests",
        ),
        (
            "two-roots",
            format!("model = {model:?}\n[apps.chat]\nenabled = true\nmount_root = true\n"),
            "at most one",
        ),
        ("flush", "flush = \"sometimes\"\n".to_string(), "flush"),
    ] {
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(&file, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmos"))
            .args(["serve", "--addr", "127.0.0.1:0", "--config"])
            .arg(&file)
            .arg("--state-dir")
            .arg(dir.path().join(format!("state-{name}")))
            .env_remove("LLMOS_FAILPOINTS")
            .output()
            .expect("run llmos serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: started anyway");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && last.contains(expect),
            "{name}: {stderr}"
        );
    }
}
