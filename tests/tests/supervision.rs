//! Supervision policy tests: strategies, restart types, intensity escalation, backoff,
//! ordered start and stop, failed starts, operator actions and snapshots. Every test
//! synchronises on kernel events; the only time limits are hang guards.

use std::time::{Duration, Instant};

use llmos_kernel::{
    Backoff, ChildSpec, Kernel, KernelError, KernelEvent, NodeKind, NodeState, RestartType,
    Shutdown, Strategy, SupervisorSpec, TreeExit,
};
use llmos_tests::*;

async fn boot(root: &str, spec: SupervisorSpec) -> Kernel {
    Kernel::boot(root, spec).await.expect("boot")
}

async fn ping(kernel: &Kernel, path: &str) -> u64 {
    kernel
        .addr::<ProbeMsg>(path)
        .unwrap()
        .call(ProbeMsg::Ping, Some(WAIT))
        .await
        .unwrap_or_else(|e| panic!("ping {path}: {e}"))
}

async fn cast(kernel: &Kernel, path: &str, msg: ProbeMsg) {
    kernel
        .addr::<ProbeMsg>(path)
        .unwrap()
        .cast(msg)
        .await
        .unwrap_or_else(|e| panic!("cast to {path}: {e}"));
}

/// Three probes a, b, c under one supervisor with `strategy`.
async fn three(root: &str, strategy: Strategy) -> (Kernel, Journal, Vec<ProbeControl>) {
    let journal = Journal::default();
    let mut spec = SupervisorSpec::new(strategy);
    let mut controls = Vec::new();
    for name in ["a", "b", "c"] {
        let (child, control) = probe(name, &journal);
        spec = spec.child(child);
        controls.push(control);
    }
    let kernel = boot(root, spec).await;
    (kernel, journal, controls)
}

fn starts(controls: &[ProbeControl]) -> Vec<u64> {
    controls.iter().map(ProbeControl::started).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_for_one_restarts_only_the_failed_child() {
    let (kernel, journal, controls) = three("o4o", Strategy::OneForOne).await;
    assert_eq!(journal.entries(), ["start a", "start b", "start c"]);
    let mut events = kernel.subscribe();
    journal.clear();
    cast(&kernel, "o4o/b", ProbeMsg::Panic).await;
    exit_handled(&mut events, "o4o", "o4o/b").await;
    assert_eq!(journal.entries(), ["start b"]);
    assert_eq!(starts(&controls), [1, 2, 1]);
    assert_eq!(ping(&kernel, "o4o/b").await, 2);
    kernel.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_for_all_stops_others_in_reverse_and_restarts_all_in_order() {
    let (kernel, journal, controls) = three("o4a", Strategy::OneForAll).await;
    let mut events = kernel.subscribe();
    journal.clear();
    cast(&kernel, "o4a/b", ProbeMsg::Fail).await;
    exit_handled(&mut events, "o4a", "o4a/b").await;
    assert_eq!(
        journal.entries(),
        ["stop c", "stop a", "start a", "start b", "start c"]
    );
    assert_eq!(starts(&controls), [2, 2, 2]);
    kernel.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_for_one_restarts_the_failed_child_and_those_after_it() {
    let (kernel, journal, controls) = three("r41", Strategy::RestForOne).await;
    let mut events = kernel.subscribe();
    journal.clear();
    cast(&kernel, "r41/b", ProbeMsg::Panic).await;
    exit_handled(&mut events, "r41", "r41/b").await;
    assert_eq!(journal.entries(), ["stop c", "start b", "start c"]);
    assert_eq!(starts(&controls), [1, 2, 2]);
    kernel.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_supervisor_adds_removes_and_restarts_children_one_by_one() {
    let journal = Journal::default();
    let spec = SupervisorSpec::new(Strategy::OneForOne).child(ChildSpec::supervisor(
        "requests",
        SupervisorSpec::new(Strategy::Dynamic).max_children(3),
    ));
    let kernel = boot("dyn", spec).await;
    let mut controls = Vec::new();
    for name in ["r1", "r2", "r3"] {
        let (child, control) = probe(name, &journal);
        let path = kernel
            .start_child("dyn/requests", child.restart(RestartType::Transient))
            .await
            .unwrap();
        assert_eq!(path.as_str(), format!("dyn/requests/{name}"));
        controls.push(control);
    }
    // The limit is admission control, with a clear error.
    let (extra, _) = probe("r4", &journal);
    let full = kernel.start_child("dyn/requests", extra).await.unwrap_err();
    assert!(full.to_string().contains("full"), "{full}");
    // Duplicate names are refused.
    let (dup, _) = probe("r1", &journal);
    assert!(matches!(
        kernel.start_child("dyn/requests", dup).await,
        Err(KernelError::AlreadyExists(_))
    ));

    let mut events = kernel.subscribe();
    cast(&kernel, "dyn/requests/r2", ProbeMsg::Panic).await;
    exit_handled(&mut events, "dyn/requests", "dyn/requests/r2").await;
    assert_eq!(starts(&controls), [1, 2, 1]);

    // A transient child that finishes normally leaves a dynamic supervisor.
    cast(&kernel, "dyn/requests/r1", ProbeMsg::Stop).await;
    exit_handled(&mut events, "dyn/requests", "dyn/requests/r1").await;
    assert!(kernel.snapshot().find("dyn/requests/r1").is_none());
    assert!(matches!(
        kernel.addr::<ProbeMsg>("dyn/requests/r1"),
        Err(KernelError::NotFound(_))
    ));

    kernel.terminate_child("dyn/requests/r3").await.unwrap();
    let snapshot = kernel.snapshot();
    let names: Vec<_> = snapshot
        .find("dyn/requests")
        .unwrap()
        .children
        .iter()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(names, ["r2"]);
    assert!(journal.entries().contains(&"stop r3".to_string()));
    kernel.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_types_decide_what_comes_back() {
    let journal = Journal::default();
    let (perm, perm_ctl) = probe("perm", &journal);
    let (trans, trans_ctl) = probe("trans", &journal);
    let (temp, _) = probe("temp", &journal);
    let spec = SupervisorSpec::new(Strategy::OneForOne)
        .child(perm.restart(RestartType::Permanent))
        .child(trans.restart(RestartType::Transient))
        .child(temp.restart(RestartType::Temporary));
    let kernel = boot("types", spec).await;
    let mut events = kernel.subscribe();

    // Permanent: restarted even after a normal exit.
    cast(&kernel, "types/perm", ProbeMsg::Stop).await;
    exit_handled(&mut events, "types", "types/perm").await;
    assert_eq!(perm_ctl.started(), 2);

    // Transient: restarted after a crash…
    cast(&kernel, "types/trans", ProbeMsg::Panic).await;
    exit_handled(&mut events, "types", "types/trans").await;
    assert_eq!(trans_ctl.started(), 2);
    // …but not after a normal exit; its spec stays, stopped.
    cast(&kernel, "types/trans", ProbeMsg::Stop).await;
    exit_handled(&mut events, "types", "types/trans").await;
    assert_eq!(trans_ctl.started(), 2);
    let snapshot = kernel.snapshot();
    assert_eq!(
        snapshot.find("types/trans").unwrap().state,
        NodeState::Stopped
    );
    // A caller holding its address learns it is stopped, and gets its message back.
    let undelivered = kernel
        .addr::<ProbeMsg>("types/trans")
        .unwrap()
        .cast(ProbeMsg::Note("late".into()))
        .await
        .unwrap_err();
    assert!(matches!(undelivered.error, KernelError::Stopped(_)));
    assert!(matches!(undelivered.message, ProbeMsg::Note(n) if n == "late"));

    // Temporary: never restarted, removed.
    cast(&kernel, "types/temp", ProbeMsg::Panic).await;
    exit_handled(&mut events, "types", "types/temp").await;
    assert!(kernel.snapshot().find("types/temp").is_none());
    assert_eq!(
        journal
            .with_prefix("start ")
            .iter()
            .filter(|n| *n == "temp")
            .count(),
        1
    );
    kernel.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intensity_escalates_through_two_levels() {
    let journal = Journal::default();
    let (worker, worker_ctl) = probe("w", &journal);
    let (bystander, bystander_ctl) = probe("bystander", &journal);
    let mid = SupervisorSpec::new(Strategy::OneForOne)
        .intensity(1, Duration::from_secs(60))
        .child(worker);
    let spec = SupervisorSpec::new(Strategy::OneForOne)
        .intensity(1, Duration::from_secs(60))
        .child(bystander)
        .child(ChildSpec::supervisor("mid", mid));
    let kernel = boot("esc", spec).await;
    let mut events = kernel.subscribe();

    // First crash: mid restarts w (1 restart ≤ 1).
    cast(&kernel, "esc/mid/w", ProbeMsg::Panic).await;
    exit_handled(&mut events, "esc/mid", "esc/mid/w").await;
    assert_eq!(worker_ctl.started(), 2);

    // Second crash: mid exceeds its intensity, stops w, fails; root restarts mid (fresh
    // intensity), which starts w again.
    cast(&kernel, "esc/mid/w", ProbeMsg::Panic).await;
    let seen = events
        .collect_until(WAIT, |e| {
            matches!(e, KernelEvent::ExitHandled { supervisor, child }
                if supervisor.as_str() == "esc" && child.as_str() == "esc/mid")
        })
        .await
        .unwrap();
    assert!(seen.iter().any(|e| matches!(e,
        KernelEvent::Escalated { path, max_restarts: 1, .. } if path.as_str() == "esc/mid")));
    assert!(seen.iter().any(|e| matches!(e,
        KernelEvent::Failed { path, reason } if path.as_str() == "esc/mid" && reason.contains("exceeded"))));
    assert_eq!(worker_ctl.started(), 3);
    assert_eq!(
        bystander_ctl.started(),
        1,
        "one_for_one at the root spares the bystander"
    );
    let snapshot = kernel.snapshot();
    let mid_node = snapshot.find("esc/mid").unwrap();
    assert_eq!(mid_node.restarts, 1);
    assert_eq!(mid_node.state, NodeState::Running);

    // Two more crashes: mid escalates again; the root's second restart exceeds its own
    // intensity, so the whole tree fails upward.
    cast(&kernel, "esc/mid/w", ProbeMsg::Panic).await;
    exit_handled(&mut events, "esc/mid", "esc/mid/w").await;
    cast(&kernel, "esc/mid/w", ProbeMsg::Panic).await;
    let seen = events
        .collect_until(WAIT, |e| matches!(e, KernelEvent::RootFailed { .. }))
        .await
        .unwrap();
    let escalated: Vec<_> = seen
        .iter()
        .filter_map(|e| match e {
            KernelEvent::Escalated { path, .. } => Some(path.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(escalated, ["esc/mid", "esc"]);
    assert!(matches!(kernel.wait().await, TreeExit::RootFailed(reason) if reason.contains("esc")));
    // The root stopped its children in reverse order before failing.
    let stops = journal.with_prefix("stop ");
    assert_eq!(stops.last().map(String::as_str), Some("bystander"));
    let addr = kernel.addr::<ProbeMsg>("esc/bystander").unwrap();
    assert!(addr.call(ProbeMsg::Ping, Some(WAIT)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_delays_grow_exponentially_and_are_honoured() {
    let journal = Journal::default();
    let (child, control) = probe("flaky", &journal);
    let spec = SupervisorSpec::new(Strategy::OneForOne)
        .intensity(10, Duration::from_secs(60))
        .backoff(Backoff::exponential(
            Duration::from_millis(20),
            Duration::from_millis(80),
        ))
        .child(child);
    let kernel = boot("backoff", spec).await;
    let mut events = kernel.subscribe();
    let mut delays = Vec::new();
    for round in 0..4 {
        cast(&kernel, "backoff/flaky", ProbeMsg::Panic).await;
        let failed_at = Instant::now();
        let scheduled = events
            .wait_for(WAIT, |e| matches!(e, KernelEvent::RestartScheduled { .. }))
            .await
            .unwrap();
        let KernelEvent::RestartScheduled { delay, .. } = scheduled else {
            unreachable!()
        };
        started(&mut events, "backoff/flaky").await;
        assert!(
            failed_at.elapsed() >= delay,
            "round {round}: restarted before its backoff delay {delay:?}"
        );
        delays.push(delay.as_millis());
    }
    assert_eq!(delays, [20, 40, 80, 80]);
    assert_eq!(control.started(), 5);
    kernel.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_jitter_reproduces_the_same_schedule() {
    async fn schedule(root: &str, seed: u64) -> Vec<Duration> {
        let journal = Journal::default();
        let (child, _) = probe("j", &journal);
        let spec = SupervisorSpec::new(Strategy::OneForOne)
            .intensity(10, Duration::from_secs(60))
            .backoff(
                Backoff::exponential(Duration::from_millis(2), Duration::from_millis(16))
                    .with_jitter(0.5, seed),
            )
            .child(child);
        let kernel = boot(root, spec).await;
        let mut events = kernel.subscribe();
        let path = format!("{root}/j");
        let mut delays = Vec::new();
        for _ in 0..5 {
            cast(&kernel, &path, ProbeMsg::Panic).await;
            if let KernelEvent::RestartScheduled { delay, .. } = events
                .wait_for(WAIT, |e| matches!(e, KernelEvent::RestartScheduled { .. }))
                .await
                .unwrap()
            {
                delays.push(delay);
            }
            started(&mut events, &path).await;
        }
        kernel.shutdown("test").await;
        delays
    }
    let first = schedule("jitter-a", 7).await;
    let second = schedule("jitter-b", 7).await;
    let other = schedule("jitter-c", 8).await;
    assert_eq!(first, second, "same seed, same delays");
    assert_ne!(first, other, "another seed, other delays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_start_in_order_and_stop_in_reverse_recursively() {
    let journal = Journal::default();
    let (a, _) = probe("a", &journal);
    let (b1, _) = probe("b1", &journal);
    let (b2, _) = probe("b2", &journal);
    let (c, _) = probe("c", &journal);
    let spec = SupervisorSpec::new(Strategy::OneForOne)
        .child(a)
        .child(ChildSpec::supervisor(
            "b",
            SupervisorSpec::new(Strategy::OneForAll).child(b1).child(b2),
        ))
        .child(c);
    let kernel = boot("order", spec).await;
    assert_eq!(
        journal.entries(),
        ["start a", "start b1", "start b2", "start c"]
    );
    journal.clear();
    let mut events = kernel.subscribe();
    assert_eq!(kernel.shutdown("test").await, TreeExit::Shutdown);
    assert_eq!(
        journal.entries(),
        ["stop c", "stop b2", "stop b1", "stop a"]
    );
    let stopped: Vec<String> = std::iter::from_fn(|| events.try_next())
        .filter_map(|e| match e {
            KernelEvent::Stopped {
                path,
                killed: false,
            } => Some(path.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(
        stopped,
        ["order/c", "order/b/b2", "order/b/b1", "order/b", "order/a"]
    );
    assert!(kernel
        .snapshot()
        .nodes()
        .iter()
        .all(|n| n.state == NodeState::Stopped));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_that_overruns_its_shutdown_timeout_is_killed() {
    let journal = Journal::default();
    let (first, _) = probe("first", &journal);
    let (slow, _) = probe_with("slow", &journal, Some(Duration::from_secs(3600)));
    let spec = SupervisorSpec::new(Strategy::OneForOne)
        .child(first)
        .child(slow.shutdown(Shutdown::Timeout(Duration::from_millis(50))));
    let kernel = boot("slowstop", spec).await;
    let mut events = kernel.subscribe();
    let began = Instant::now();
    kernel.shutdown("test").await;
    assert!(began.elapsed() < Duration::from_secs(5));
    let stopped: Vec<(String, bool)> = std::iter::from_fn(|| events.try_next())
        .filter_map(|e| match e {
            KernelEvent::Stopped { path, killed } => Some((path.to_string(), killed)),
            _ => None,
        })
        .collect();
    assert_eq!(
        stopped,
        [
            ("slowstop/slow".to_string(), true),
            ("slowstop/first".to_string(), false)
        ]
    );
    // The killed child never finished its post_stop; the one before it stopped cleanly.
    assert_eq!(journal.with_prefix("stop "), ["first"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_pre_start_is_a_failure_counted_and_retried() {
    let journal = Journal::default();
    let (child, control) = probe("shy", &journal);
    let spec = SupervisorSpec::new(Strategy::OneForOne)
        .intensity(3, Duration::from_secs(60))
        .child(child);
    let kernel = boot("prestart", spec).await;
    let mut events = kernel.subscribe();

    // The next two starts fail in pre_start: crash + 2 failed starts = 3 restarts ≤ 3.
    control.set_start(StartBehaviour::FailTimes(2));
    cast(&kernel, "prestart/shy", ProbeMsg::Panic).await;
    let seen = events
        .collect_until(WAIT, |e| matches!(e, KernelEvent::Started { .. }))
        .await
        .unwrap();
    let failed_starts = seen
        .iter()
        .filter(|e| matches!(e, KernelEvent::StartFailed { reason, .. } if reason.contains("pre_start")))
        .count();
    assert_eq!(failed_starts, 2);
    assert_eq!(control.started(), 2);
    let node = kernel.snapshot().find("prestart/shy").cloned().unwrap();
    assert_eq!(node.reliability.failures, 3);
    assert!(node
        .last_failure
        .unwrap()
        .reason
        .contains("refuses to start"));
    assert_eq!(
        journal.entries(),
        [
            "start shy",
            "failed-start shy",
            "failed-start shy",
            "start shy"
        ]
    );

    // A child that never starts exhausts the intensity: the supervisor escalates.
    control.set_start(StartBehaviour::Fail);
    cast(&kernel, "prestart/shy", ProbeMsg::Panic).await;
    events
        .wait_for(
            WAIT,
            |e| matches!(e, KernelEvent::Escalated { path, .. } if path.as_str() == "prestart"),
        )
        .await
        .unwrap();
    assert!(matches!(kernel.wait().await, TreeExit::RootFailed(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_that_never_starts_fails_the_boot_with_a_clear_error() {
    let journal = Journal::default();
    let (child, control) = probe("never", &journal);
    control.set_start(StartBehaviour::Fail);
    let spec = SupervisorSpec::new(Strategy::OneForOne)
        .intensity(2, Duration::from_secs(60))
        .child(child);
    let err = Kernel::boot("noboot", spec)
        .await
        .err()
        .expect("boot must fail");
    let text = err.to_string();
    assert!(
        text.contains("noboot") && text.contains("exceeded 2 restarts"),
        "{text}"
    );
    assert_eq!(journal.entries().len(), 3, "initial start + 2 restarts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dynamic_start_is_returned_to_the_caller() {
    let journal = Journal::default();
    let kernel = boot("dynfail", SupervisorSpec::new(Strategy::Dynamic)).await;
    let (child, control) = probe("bad", &journal);
    control.set_start(StartBehaviour::Fail);
    let err = kernel.start_child("dynfail", child).await.unwrap_err();
    assert!(
        matches!(&err, KernelError::StartFailed { path, reason }
            if path == "dynfail/bad" && reason.contains("refuses to start")),
        "{err}"
    );
    assert!(kernel.snapshot().root.children.is_empty());
    kernel.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_fault_point_fails_one_path_at_run_time() {
    let journal = Journal::default();
    let (a, a_ctl) = probe("a", &journal);
    let (b, b_ctl) = probe("b", &journal);
    let spec = SupervisorSpec::new(Strategy::OneForAll)
        .intensity(5, Duration::from_secs(60))
        .child(a)
        .child(b);
    let kernel = boot("startfault", spec).await;
    let mut events = kernel.subscribe();
    let point = format!("{}:startfault/b", llmos_kernel::START_FAULT_POINT);
    llmos_kernel::faults::configure(&point, "1*return->off").unwrap();
    cast(&kernel, "startfault/a", ProbeMsg::Panic).await;
    let seen = events
        .collect_until(WAIT, |e| {
            matches!(e, KernelEvent::ExitHandled { child, .. } if child.as_str() == "startfault/b")
        })
        .await
        .unwrap();
    llmos_kernel::faults::clear(&point);
    assert!(seen.iter().any(|e| matches!(e,
        KernelEvent::StartFailed { path, reason } if path.as_str() == "startfault/b" && reason.contains("injected"))));
    // one_for_all: a's crash restarts both; b's injected failed start restarts both again.
    assert_eq!((a_ctl.started(), b_ctl.started()), (3, 2));
    kernel.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_counts_as_a_failure_and_operator_restart_does_not() {
    let (kernel, _journal, controls) = three("ops", Strategy::OneForOne).await;
    let mut events = kernel.subscribe();
    kernel.kill("ops/a").unwrap();
    exit_handled(&mut events, "ops", "ops/a").await;
    kernel.restart_child("ops/b").await.unwrap();
    assert_eq!(starts(&controls), [2, 2, 1]);
    let snapshot = kernel.snapshot();
    let a = snapshot.find("ops/a").unwrap();
    let b = snapshot.find("ops/b").unwrap();
    assert_eq!(a.last_failure.as_ref().unwrap().reason, "killed");
    assert_eq!((a.restarts, a.reliability.failures), (1, 1));
    assert_eq!((b.restarts, b.reliability.failures), (1, 0));
    assert!(matches!(
        kernel.kill("ops/nope"),
        Err(KernelError::NotFound(_))
    ));
    assert!(matches!(
        kernel.restart_child("ops").await,
        Err(KernelError::InvalidSpec { .. })
    ));
    kernel.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_reports_state_counters_and_reliability_as_json() {
    let (kernel, _journal, _controls) = three("snap", Strategy::OneForOne).await;
    let mut events = kernel.subscribe();
    for _ in 0..3 {
        ping(&kernel, "snap/a").await;
    }
    cast(&kernel, "snap/b", ProbeMsg::Panic).await;
    exit_handled(&mut events, "snap", "snap/b").await;
    ping(&kernel, "snap/b").await;

    let snapshot = kernel.snapshot();
    let a = snapshot.find("snap/a").unwrap();
    assert_eq!(a.messages_handled, 3);
    assert_eq!(a.reliability.availability, 1.0);
    let b = snapshot.find("snap/b").unwrap();
    assert_eq!(b.state, NodeState::Running);
    assert_eq!(b.restarts, 1);
    let mttr = b.reliability.mttr_secs.unwrap();
    let mtbf = b.reliability.mtbf_secs.unwrap();
    assert!(mttr > 0.0 && mtbf > 0.0);
    assert!((b.reliability.availability - mtbf / (mtbf + mttr)).abs() < 1e-9);
    assert!(matches!(
        snapshot.root.kind,
        NodeKind::Supervisor {
            strategy: Strategy::OneForOne,
            restart: None
        }
    ));

    let json: serde_json::Value = serde_json::to_value(&snapshot).unwrap();
    let b_json = &json["root"]["children"][1];
    assert_eq!(b_json["path"], "snap/b");
    assert_eq!(b_json["kind"], "worker");
    assert_eq!(b_json["restart"], "permanent");
    assert_eq!(b_json["state"], "running");
    assert_eq!(b_json["restarts"], 1);
    assert!(b_json["last_failure"]["reason"]
        .as_str()
        .unwrap()
        .contains("told to panic"));
    assert!(b_json["last_failure"]["at_unix_ms"].as_u64().unwrap() > 0);
    assert!(b_json["reliability"]["mttr_secs"].as_f64().is_some());
    assert!(b_json["uptime_secs"].as_f64().is_some());
    assert_eq!(json["root"]["strategy"], "one_for_one");

    let rendered = snapshot.render();
    assert!(
        rendered.contains("snap/") || rendered.contains("└─ c"),
        "{rendered}"
    );
    kernel.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_supervisor_restarts_its_subtree_and_addresses_keep_working() {
    let journal = Journal::default();
    let (x, x_ctl) = probe("x", &journal);
    let (y, y_ctl) = probe("y", &journal);
    let inner = SupervisorSpec::new(Strategy::OneForOne).child(x).child(y);
    let spec = SupervisorSpec::new(Strategy::OneForOne)
        .intensity(100, Duration::from_secs(60))
        .child(ChildSpec::supervisor("inner", inner));
    let kernel = boot("killsup", spec).await;
    let mut events = kernel.subscribe();
    for round in 2..=6 {
        kernel.kill("killsup/inner").unwrap();
        exit_handled(&mut events, "killsup", "killsup/inner").await;
        assert_eq!(ping(&kernel, "killsup/inner/x").await, round);
        assert_eq!(ping(&kernel, "killsup/inner/y").await, round);
        let snapshot = kernel.snapshot();
        for path in ["killsup/inner", "killsup/inner/x", "killsup/inner/y"] {
            assert_eq!(
                snapshot.find(path).unwrap().state,
                NodeState::Running,
                "{path}"
            );
        }
    }
    assert_eq!((x_ctl.started(), y_ctl.started()), (6, 6));
    kernel.shutdown("test").await;
}
