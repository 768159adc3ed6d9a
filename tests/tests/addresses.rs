//! Stable addresses: callers reach a child by path across restarts; every message is
//! delivered to a live instance or handed back with an error, never silently dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llmos_kernel::{
    Backoff, ChildSpec, Kernel, KernelError, KernelEvent, Strategy, SupervisorSpec,
};
use llmos_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_answered_or_fails_explicitly_while_the_child_keeps_crashing() {
    let journal = Journal::default();
    let (child, control) = probe("svc", &journal);
    let spec = SupervisorSpec::new(Strategy::OneForOne)
        .intensity(1000, Duration::from_secs(60))
        .child(child);
    let kernel = Kernel::boot("calls", spec).await.unwrap();
    let addr = kernel.addr::<ProbeMsg>("calls/svc").unwrap();
    let (ok, died) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut callers = Vec::new();
    for _ in 0..4 {
        let (addr, ok, died) = (addr.clone(), ok.clone(), died.clone());
        callers.push(tokio::spawn(async move {
            for _ in 0..500 {
                match addr.call(ProbeMsg::Ping, Some(WAIT)).await {
                    Ok(instance) => {
                        assert!(instance >= 1);
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(KernelError::DiedBeforeReply(_)) => {
                        died.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(other) => panic!("a call was lost or misrouted: {other}"),
                }
            }
        }));
    }
    let mut events = kernel.subscribe();
    for _ in 0..20 {
        addr.cast(ProbeMsg::Panic).await.unwrap();
        exit_handled(&mut events, "calls", "calls/svc").await;
    }
    for caller in callers {
        caller.await.unwrap();
    }
    let (ok, died) = (ok.load(Ordering::SeqCst), died.load(Ordering::SeqCst));
    assert_eq!(ok + died, 2000, "every call has an outcome");
    assert!(ok > 0);
    assert_eq!(control.started(), 21);
    assert_eq!(addr.call(ProbeMsg::Ping, Some(WAIT)).await.unwrap(), 21);
    kernel.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_while_restarting_reach_the_new_instance_in_order() {
    let journal = Journal::default();
    let (child, control) = probe("slow", &journal);
    let spec = SupervisorSpec::new(Strategy::OneForOne)
        .backoff(Backoff::exponential(
            Duration::from_millis(100),
            Duration::from_millis(100),
        ))
        .child(child);
    let kernel = Kernel::boot("window", spec).await.unwrap();
    let addr = kernel.addr::<ProbeMsg>("window/slow").unwrap();
    let mut events = kernel.subscribe();
    addr.cast(ProbeMsg::Panic).await.unwrap();
    events
        .wait_for(WAIT, |e| matches!(e, KernelEvent::RestartScheduled { .. }))
        .await
        .unwrap();
    assert!(addr.current().is_none(), "restarting: no live instance");
    // Several senders, each with an ordered stream, all inside the restart window.
    let mut senders = Vec::new();
    for sender in 0..5 {
        let addr = addr.clone();
        senders.push(tokio::spawn(async move {
            for seq in 0..10 {
                addr.cast(ProbeMsg::Note(format!("{sender}:{seq}")))
                    .await
                    .unwrap();
            }
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
    assert_eq!(addr.call(ProbeMsg::Ping, Some(WAIT)).await.unwrap(), 2);
    assert_eq!(control.started(), 2);
    let entries = journal.entries();
    let restart_at = entries.iter().rposition(|e| e == "start slow").unwrap();
    let notes = journal.with_prefix("slow got ");
    assert_eq!(notes.len(), 50, "all delivered");
    assert!(
        entries[..restart_at].iter().all(|e| !e.contains(" got ")),
        "nothing reached the dead instance"
    );
    for sender in 0..5 {
        let seqs: Vec<u32> = notes
            .iter()
            .filter_map(|n| n.strip_prefix(&format!("{sender}:")))
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            seqs,
            (0..10).collect::<Vec<_>>(),
            "sender {sender} in order"
        );
    }
    kernel.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_longer_than_the_caller_waits_hands_the_message_back() {
    let journal = Journal::default();
    let (child, _) = probe("late", &journal);
    let spec = SupervisorSpec::new(Strategy::OneForOne)
        .backoff(Backoff::exponential(
            Duration::from_secs(2),
            Duration::from_secs(2),
        ))
        .child(child);
    let kernel = Kernel::boot("impatient", spec).await.unwrap();
    let addr = kernel
        .addr::<ProbeMsg>("impatient/late")
        .unwrap()
        .with_resolve_wait(Duration::from_millis(20));
    let mut events = kernel.subscribe();
    addr.cast(ProbeMsg::Panic).await.unwrap();
    events
        .wait_for(WAIT, |e| matches!(e, KernelEvent::RestartScheduled { .. }))
        .await
        .unwrap();
    let undelivered = addr
        .cast(ProbeMsg::Note("keep me".into()))
        .await
        .unwrap_err();
    assert!(matches!(undelivered.error, KernelError::Unavailable { .. }));
    assert!(matches!(undelivered.message, ProbeMsg::Note(ref n) if n == "keep me"));
    let call = addr.call(ProbeMsg::Ping, None).await.unwrap_err();
    assert!(matches!(call, KernelError::Unavailable { .. }), "{call}");
    kernel.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_survives_the_restart_of_its_parent_supervisor() {
    let journal = Journal::default();
    let (child, control) = probe("leaf", &journal);
    let mid = SupervisorSpec::new(Strategy::OneForOne)
        .intensity(0, Duration::from_secs(60))
        .child(child);
    let spec = SupervisorSpec::new(Strategy::OneForOne).child(ChildSpec::supervisor("mid", mid));
    let kernel = Kernel::boot("deep", spec).await.unwrap();
    let addr = kernel.addr::<ProbeMsg>("deep/mid/leaf").unwrap();
    let mut events = kernel.subscribe();
    addr.cast(ProbeMsg::Panic).await.unwrap();
    exit_handled(&mut events, "deep", "deep/mid").await;
    assert_eq!(addr.call(ProbeMsg::Ping, Some(WAIT)).await.unwrap(), 2);
    assert_eq!(control.started(), 2);
    let snapshot = kernel.snapshot();
    assert_eq!(snapshot.find("deep/mid").unwrap().restarts, 1);
    assert_eq!(snapshot.find("deep/mid/leaf").unwrap().restarts, 1);
    kernel.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_message_types_and_unknown_paths_are_clear_errors() {
    let journal = Journal::default();
    let (child, _) = probe("p", &journal);
    let kernel = Kernel::boot(
        "typed",
        SupervisorSpec::new(Strategy::OneForOne).child(child),
    )
    .await
    .unwrap();
    assert!(matches!(
        kernel.addr::<String>("typed/p"),
        Err(KernelError::WrongMessageType { .. })
    ));
    assert!(matches!(
        kernel.addr::<ProbeMsg>("typed/nope"),
        Err(KernelError::NotFound(_))
    ));
    let (dup, _) = probe("bad/name", &journal);
    let err = kernel.start_child("typed", dup).await.unwrap_err();
    assert!(matches!(err, KernelError::InvalidSpec { .. }), "{err}");
    let (leaf, _) = probe("x", &journal);
    assert!(matches!(
        kernel.start_child("typed/p", leaf).await,
        Err(KernelError::NotASupervisor(_))
    ));
    kernel.shutdown("test").await;
    let after = kernel.addr::<ProbeMsg>("typed/p").unwrap();
    assert!(matches!(
        after.cast(ProbeMsg::Note("x".into())).await,
        Err(ref u) if matches!(u.error, KernelError::Stopped(_))
    ));
}
