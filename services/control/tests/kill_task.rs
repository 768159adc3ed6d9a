//! `kill` of an inference task mid-request, through the console: the kernel restarts it,
//! `tree` shows the restart, and the request still completes with the fault-free text.
//! (Its own test binary: fault points are process-wide.)

mod common;

use std::time::Duration;

use common::{boot, ctl, finish, generate, greedy, next_event};
use llmos_inference::StreamEvent;
use llmos_kernel::KernelEvent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_task_mid_request_restarts_it_and_the_text_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = boot(dir.path()).await;
    let prompt = "Once upon a time";
    let expected = generate(&runtime, prompt, greedy(48)).await;
    assert!(!expected.is_empty());

    // Slow every step so the request is surely in flight while we look and kill.
    ctl(dir.path(), "inject", &["task.step", "sleep(20)"])
        .await
        .unwrap();
    let mut events = runtime.kernel().subscribe();
    let mut stream = runtime.submit(prompt, greedy(48)).await.unwrap();
    let mut text = String::new();
    match next_event(&mut stream.events).await {
        StreamEvent::Token { text: piece, .. } => text.push_str(&piece),
        other => panic!("expected a token, got {other:?}"),
    }

    let requests = ctl(dir.path(), "requests", &[]).await.unwrap();
    let row = requests
        .lines()
        .find(|l| l.starts_with(&stream.id.to_string()))
        .unwrap_or_else(|| panic!("request {} missing from\n{requests}", stream.id));
    let path = row.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(path, format!("llmos/requests/req-{}", stream.id));
    // The engine's view: where it runs and in which state, with its rate.
    assert!(
        row.contains("cpu:0") && (row.contains("decode") || row.contains("prefill")),
        "{row}"
    );

    let killed = ctl(dir.path(), "kill", &[&path]).await.unwrap();
    assert!(killed.contains(&path), "{killed}");
    events
        .wait_for(Duration::from_secs(30), |e| {
            matches!(e, KernelEvent::Started { path: p, restarts } if p.as_str() == path && *restarts >= 1)
        })
        .await
        .expect("the task restarts");
    let tree = ctl(dir.path(), "tree", &[]).await.unwrap();
    let line = tree
        .lines()
        .find(|l| l.contains(&format!("req-{}", stream.id)))
        .unwrap_or_else(|| panic!("the task is gone from\n{tree}"));
    assert!(line.contains("restarts=1"), "{line}");

    ctl(dir.path(), "inject", &["task.step", "off"])
        .await
        .unwrap();
    let text = finish(&mut stream.events, text)
        .await
        .expect("the request completes");
    assert_eq!(text, expected, "the kill changed nothing the client sees");
    runtime.shutdown("test").await;
}
