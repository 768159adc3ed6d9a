//! Orderly shutdown on SIGTERM and SIGINT: the tree stops in reverse start order.
//! Alone in its test binary because signals are process-wide.

use std::process::Command;

use llmos_kernel::{ChildSpec, Kernel, KernelEvent, Strategy, SupervisorSpec, TreeExit};
use llmos_tests::*;

fn send_signal(signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), std::process::id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

async fn tree(root: &str, journal: &Journal) -> Kernel {
    let (a, _) = probe("a", journal);
    let (b, _) = probe("b", journal);
    let (c, _) = probe("c", journal);
    let spec = SupervisorSpec::new(Strategy::OneForOne)
        .child(a)
        .child(ChildSpec::supervisor(
            "inner",
            SupervisorSpec::new(Strategy::OneForAll).child(b),
        ))
        .child(c);
    Kernel::boot(root, spec).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_shut_the_tree_down_in_reverse_order() {
    for signal in ["TERM", "INT"] {
        let journal = Journal::default();
        let kernel = tree(&format!("sig{signal}"), &journal).await;
        let mut events = kernel.subscribe();
        let until_signal = kernel.shutdown_on_signal().unwrap();
        journal.clear();
        send_signal(signal);
        let exit = tokio::time::timeout(WAIT, until_signal)
            .await
            .expect("shutdown on signal");
        assert_eq!(exit, TreeExit::Shutdown);
        assert_eq!(
            journal.entries(),
            ["stop c", "stop b", "stop a"],
            "SIG{signal}"
        );
        let seen = events
            .collect_until(WAIT, |e| matches!(e, KernelEvent::ShutdownComplete))
            .await
            .unwrap();
        assert!(matches!(&seen[0], KernelEvent::ShutdownStarted { reason } if reason == "signal"));
    }
}
