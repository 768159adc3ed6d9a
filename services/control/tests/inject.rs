//! `inject` through the console: an engine step that panics once shows in `faults`, the
//! engine restarts (visible in `tree`), the request completes unchanged, and `clear`
//! removes the configuration. (Its own test binary: fault points are process-wide.)

mod common;

use std::time::Duration;

use common::{boot, ctl, generate, greedy};
use llmos_kernel::KernelEvent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_engine_panic_shows_and_the_engine_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = boot(dir.path()).await;
    let prompt = "Once upon a time";
    let expected = generate(&runtime, prompt, greedy(24)).await;

    let set = ctl(dir.path(), "inject", &["engine.step", "1*panic->off"])
        .await
        .unwrap();
    assert!(set.contains("engine.step = 1*panic->off"), "{set}");
    let faults = ctl(dir.path(), "faults", &[]).await.unwrap();
    let row = faults
        .lines()
        .find(|l| l.starts_with("engine.step"))
        .expect(&faults);
    assert!(row.contains("1*panic->off"), "{row}");

    let mut events = runtime.kernel().subscribe();
    let text = generate(&runtime, prompt, greedy(24)).await;
    assert_eq!(text, expected);
    events
        .wait_for(Duration::from_secs(30), |e| {
            matches!(e, KernelEvent::Started { path, restarts }
                if path.as_str() == "llmos/devices/cpu:0/engine" && *restarts >= 1)
        })
        .await
        .expect("the engine restarts");
    let tree = ctl(dir.path(), "tree", &["llmos/devices/cpu:0"])
        .await
        .unwrap();
    let engine = tree.lines().find(|l| l.contains("engine")).expect(&tree);
    assert!(
        engine.contains("restarts=1") && engine.contains("running"),
        "{tree}"
    );
    assert!(engine.contains("last_failure="), "{engine}");

    let cleared = ctl(dir.path(), "clear", &["engine.step"]).await.unwrap();
    assert!(cleared.contains("cleared"));
    let faults = ctl(dir.path(), "faults", &[]).await.unwrap();
    let row = faults
        .lines()
        .find(|l| l.starts_with("engine.step"))
        .expect(&faults);
    assert!(!row.contains("panic"), "{row}");
    runtime.shutdown("test").await;
}
