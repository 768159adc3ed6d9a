//! End-to-end tests of `llmos serve`: the real binary on a free loopback port, driven by
//! a minimal HTTP/1.1 client over `std::net::TcpStream` (and by `curl`).
//!
//! Readiness: the server prints `listening on http://ADDR` once it accepts connections;
//! the test then polls `/health` with a bounded retry loop. A guard kills a server that
//! outlives its test, so a bug fails the test instead of hanging CI. Slow generation for
//! the overload and SIGKILL tests comes from the `task.step=sleep(MS)` fault point, so
//! "mid-stream" is a fact, not a race.

mod common;

use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

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
    assert_eq!(health.json()["journal"]["state"], "open");

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

/// Beyond `--max-active`, requests wait in the admission queue: a burst of six on one
/// slot is served in full, each with the same text.
#[test]
fn a_burst_beyond_max_active_waits_in_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("state"),
        &["--max-active", "1"],
        &[("LLMOS_FAILPOINTS", "task.step=sleep(5)")],
    );
    let request = json!({"prompt": PROMPT, "max_tokens": 12, "temperature": 0});
    let (addr, body) = (server.addr, request.to_string());
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
    let texts: Vec<Value> = results
        .iter()
        .map(|r| {
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()["choices"][0]["text"].clone()
        })
        .collect();
    assert!(texts.iter().all(|t| *t == texts[0]), "{texts:?}");
}

/// With no room to queue, overload answers 429 with `Retry-After`, and every admitted
/// request is complete.
#[test]
fn overload_answers_429_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("state"),
        &["--max-active", "1", "--max-queued", "0"],
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
