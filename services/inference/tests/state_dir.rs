//! The state directory's lock inside one process: a second runtime on a directory in use
//! is refused with `StateDirInUse` naming this process, and boots once the first has
//! shut down and gone.

mod common;

use common::*;
use llmos_device::DeviceId;
use llmos_inference::{InferenceError, Runtime};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_runtime_waits_for_the_first_to_shut_down() {
    let dir = tempfile::tempdir().unwrap();
    let first = Runtime::boot(config(dir.path(), &[DeviceId::cpu(0)]))
        .await
        .unwrap();
    match Runtime::boot(config(dir.path(), &[DeviceId::cpu(0)])).await {
        Err(InferenceError::StateDirInUse {
            dir: locked,
            holder,
        }) => {
            assert_eq!(locked, dir.path());
            assert!(
                holder.starts_with(&format!("pid {} ", std::process::id())),
                "{holder}"
            );
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("two runtimes on one state directory"),
    }
    // The refused boot changed nothing: the first still serves.
    let out = collect(
        first
            .submit("Once upon a time", params(0.0, 8))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(out.error, None);
    first.shutdown("test").await;
    drop(first);
    let second = Runtime::boot(config(dir.path(), &[DeviceId::cpu(0)]))
        .await
        .unwrap();
    second.shutdown("test").await;
}
