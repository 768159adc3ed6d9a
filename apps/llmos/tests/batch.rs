//! End to end: the batch app in the real `llmos serve` survives a SIGKILL of the whole
//! server in the middle of a job. The restarted server (same state directory) resumes the
//! unfinished requests, the app re-attaches to them, and the job completes with the texts
//! of a fault-free run — every item submitted exactly once.
//!
//! Generation is slowed with the `task.step=sleep(30)` fault point, so "mid-job" is a
//! fact, not a race; progress is followed with the app's long poll (`?wait_done=K`),
//! never with sleeps.

mod common;

use common::*;
use serde_json::{json, Value};

const PROMPTS: [&str; 4] = [
    "Once upon a time",
    "The cat",
    "Tom and Sue went",
    "Lily had a",
];

const MAX_TOKENS: u64 = 24;

const APPS: [&str; 2] = ["--apps", "openai,batch"];

fn submit(server: &Server) -> String {
    let body = json!({"prompts": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0, "seed": 0});
    let response = server.post("/apps/batch/jobs", &body);
    assert_eq!(response.status, 202, "{}\n{}", response.body, server.logs());
    let created = response.json();
    assert_eq!(created["total"], PROMPTS.len());
    created["id"].as_str().expect("a job id").to_string()
}

/// The job once at least `done` items are done or failed.
fn wait_done(server: &Server, id: &str, done: usize) -> Value {
    let path = format!("/apps/batch/jobs/{id}?wait_done={done}");
    let response = server.request("GET", &path, &[], None);
    assert_eq!(response.status, 200, "{}\n{}", response.body, server.logs());
    response.json()
}

fn items(job: &Value) -> &Vec<Value> {
    job["items"].as_array().expect("items")
}

/// Every item done, submitted once; returns the texts.
fn finished_texts(job: &Value) -> Vec<String> {
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["done"], PROMPTS.len(), "{job}");
    assert_eq!(job["failed"], 0, "{job}");
    items(job)
        .iter()
        .enumerate()
        .map(|(i, item)| {
            assert_eq!(item["state"], "done", "{item}");
            assert_eq!(item["prompt"], PROMPTS[i]);
            assert_eq!(
                item["submissions"], 1,
                "item {i} was submitted again: {item}"
            );
            assert!(item["request"].is_u64(), "{item}");
            item["text"].as_str().expect("a text").to_string()
        })
        .collect()
}

#[test]
fn a_batch_job_survives_sigkill_of_the_server_without_redoing_items() {
    let root = tempfile::tempdir().unwrap();

    // The reference: the same job on a fresh state directory, no faults; and each text
    // equals a plain completion of the same prompt with the same parameters.
    let expected = {
        let server = Server::start(&root.path().join("clean"), &APPS, &[]);
        let id = submit(&server);
        let texts = finished_texts(&wait_done(&server, &id, PROMPTS.len()));
        for (prompt, text) in PROMPTS.iter().zip(&texts) {
            let body =
                json!({"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "seed": 0});
            let completion = server.post("/v1/completions", &body);
            assert_eq!(completion.status, 200, "{}", completion.body);
            assert_eq!(completion.json()["choices"][0]["text"], text.as_str());
        }
        texts
    };
    assert!(expected.iter().any(|t| !t.is_empty()), "{expected:?}");

    let state = root.path().join("crash");
    let mut server = Server::start(
        &state,
        &APPS,
        &[("LLMOS_FAILPOINTS", "task.step=sleep(30)")],
    );
    let id = submit(&server);
    // With 4 prompts and the default concurrency of 2, once 2 items are done the other 2
    // are running: the long poll answers only after their submissions are recorded, so
    // the kill below lands while they generate and `before` shows their request ids (a
    // kill during a submission redoes nothing either: the app submits each item by a key
    // the runtime journals with the request; see the app's `worker`).
    let before = wait_done(&server, &id, 2);
    assert!(
        before["done"].as_u64().unwrap() < PROMPTS.len() as u64,
        "the kill must land mid-job: {before}"
    );
    server.kill9();

    let server = Server::start(&state, &APPS, &[]);
    let after = wait_done(&server, &id, PROMPTS.len());
    assert_eq!(finished_texts(&after), expected, "{after}");
    for (old, new) in items(&before).iter().zip(items(&after)) {
        if old["state"] == "done" || old["state"] == "running" {
            // Kept (done) or re-attached (running), never resubmitted.
            assert_eq!(old["request"], new["request"], "{old} vs {new}");
        }
    }
    // The app is healthy and lists the job.
    let list = server.request("GET", "/apps/batch/jobs", &[], None);
    assert_eq!(list.status, 200, "{}", list.body);
    assert_eq!(list.json()["jobs"][0]["state"], "done");
}
