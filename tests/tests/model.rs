//! Model-based property test: random crash sequences against a reference model of OTP rules.
//!
//! Random crashes and normal exits hit a two-level tree, `root{w0, sub{a, b, c}, w2}`, with
//! random strategies, intensities and restart types; a plain-Rust model of the OTP
//! supervisor rules predicts the outcome. After every operation the live kernel must agree
//! with the model on each worker's number of successful starts, its node state in the
//! snapshot (running, stopped or absent), the `Escalated` events it published, and which
//! supervisor finished handling the exit; a root escalation must end the tree with
//! `RootFailed`.
//!
//! A failure prints the minimal case (configuration and operations) and the first mismatch,
//! and saves its seed in `model.regressions` next to this file, replayed on later runs.
//! `PROPTEST_CASES=N` changes the number of cases (default 256, about a second).
//!
//! Model notes (what the kernel does, checked against OTP):
//! - A supervisor that is restarted by its parent starts every child of its spec again,
//!   including temporary children it had removed: this is also what OTP does, since a
//!   restarted supervisor runs `init/1` again.
//! - A supervisor that exceeds its intensity fails; its parent sees an abnormal exit. OTP
//!   supervisors exit with reason `shutdown` instead, which a *transient* parent spec treats
//!   as normal (not restarted, not counted). The model follows the kernel here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use llmos_kernel::{
    ChildSpec, EventStream, Kernel, KernelEvent, NodeState, RestartType, SupervisorSpec, TreeExit,
};
use llmos_tests::{probe, Journal, ProbeControl, ProbeMsg, WAIT};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

/// Long enough that no restart ever leaves the intensity window during a test case.
const PERIOD: Duration = Duration::from_secs(3600);

/// Unique root names across the cases of this process.
static NEXT_TREE: AtomicU64 = AtomicU64::new(0);

// ---------------------------------------------------------------------------------------
// The generated case.

/// Restart type (mirrors the kernel's, so that the model does not depend on kernel code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Restart {
    Permanent,
    Transient,
    Temporary,
}

/// Supervisor strategy (mirrors the kernel's static strategies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strat {
    OneForOne,
    OneForAll,
    RestForOne,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SupCfg {
    strategy: Strat,
    max_restarts: u32,
}

/// The five workers: `w0` and `w2` under the root, `a`, `b`, `c` under `sub`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Worker {
    W0,
    A,
    B,
    C,
    W2,
}

const WORKERS: [Worker; 5] = [Worker::W0, Worker::A, Worker::B, Worker::C, Worker::W2];

impl Worker {
    fn name(self) -> &'static str {
        match self {
            Worker::W0 => "w0",
            Worker::A => "a",
            Worker::B => "b",
            Worker::C => "c",
            Worker::W2 => "w2",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn in_sub(self) -> bool {
        matches!(self, Worker::A | Worker::B | Worker::C)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// The worker panics: an abnormal exit.
    Crash(Worker),
    /// The worker stops itself: a normal exit.
    Exit(Worker),
}

impl Op {
    fn worker(self) -> Worker {
        match self {
            Op::Crash(w) | Op::Exit(w) => w,
        }
    }

    fn abnormal(self) -> bool {
        matches!(self, Op::Crash(_))
    }
}

/// One generated test case: the tree's configuration and the operations to apply.
#[derive(Clone, Debug)]
struct Case {
    root: SupCfg,
    sub: SupCfg,
    sub_restart: Restart,
    w0: Restart,
    a: Restart,
    b: Restart,
    c: Restart,
    w2: Restart,
    ops: Vec<Op>,
}

impl Case {
    fn restart_of(&self, worker: Worker) -> Restart {
        match worker {
            Worker::W0 => self.w0,
            Worker::A => self.a,
            Worker::B => self.b,
            Worker::C => self.c,
            Worker::W2 => self.w2,
        }
    }
}

fn restart_strategy() -> impl Strategy<Value = Restart> {
    prop_oneof![
        Just(Restart::Permanent),
        Just(Restart::Transient),
        Just(Restart::Temporary),
    ]
}

fn sup_cfg_strategy() -> impl Strategy<Value = SupCfg> {
    (
        prop_oneof![
            Just(Strat::OneForOne),
            Just(Strat::OneForAll),
            Just(Strat::RestForOne),
        ],
        0u32..=3,
    )
        .prop_map(|(strategy, max_restarts)| SupCfg {
            strategy,
            max_restarts,
        })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let worker = prop::sample::select(WORKERS.to_vec());
    (any::<bool>(), worker).prop_map(|(crash, w)| if crash { Op::Crash(w) } else { Op::Exit(w) })
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        sup_cfg_strategy(),
        sup_cfg_strategy(),
        prop_oneof![
            2 => Just(Restart::Permanent),
            1 => Just(Restart::Transient),
            1 => Just(Restart::Temporary),
        ],
        [
            restart_strategy(),
            restart_strategy(),
            restart_strategy(),
            restart_strategy(),
            restart_strategy(),
        ],
        prop::collection::vec(op_strategy(), 1..=12),
    )
        .prop_map(|(root, sub, sub_restart, [w0, a, b, c, w2], ops)| Case {
            root,
            sub,
            sub_restart,
            w0,
            a,
            b,
            c,
            w2,
            ops,
        })
}

// ---------------------------------------------------------------------------------------
// The reference model.

/// What a child of a model supervisor is, and how to start it again.
#[derive(Clone, Debug)]
enum Template {
    Worker(Worker, Restart),
    Sup {
        name: &'static str,
        restart: Restart,
        cfg: SupCfg,
        children: Vec<Template>,
    },
}

impl Template {
    fn restart(&self) -> Restart {
        match self {
            Template::Worker(_, restart) | Template::Sup { restart, .. } => *restart,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Template::Worker(w, _) => w.name(),
            Template::Sup { name, .. } => name,
        }
    }
}

#[derive(Clone, Debug)]
enum ChildState {
    Stopped,
    RunningWorker,
    RunningSup(Box<ModelSup>),
}

#[derive(Clone, Debug)]
struct ModelChild {
    template: Template,
    state: ChildState,
}

/// Counters the model keeps across restarts.
#[derive(Clone, Debug, Default)]
struct Log {
    /// Successful starts per worker (indexed by [`Worker::index`]).
    starts: [u64; 5],
    /// Paths of supervisors that escalated, in order.
    escalated: Vec<String>,
}

/// A supervisor exceeded its intensity (its children are stopped; it fails).
#[derive(Debug)]
struct Escalation;

#[derive(Clone, Debug)]
struct ModelSup {
    path: String,
    cfg: SupCfg,
    children: Vec<ModelChild>,
    /// Restarts counted against the intensity (the period never runs out).
    restarts: u32,
}

fn start(template: &Template, parent: &str, log: &mut Log) -> ChildState {
    match template {
        Template::Worker(worker, _) => {
            log.starts[worker.index()] += 1;
            ChildState::RunningWorker
        }
        Template::Sup {
            name,
            cfg,
            children,
            ..
        } => ChildState::RunningSup(Box::new(ModelSup::boot(
            format!("{parent}/{name}"),
            *cfg,
            children,
            log,
        ))),
    }
}

impl ModelSup {
    /// A fresh instance: every child of the spec started, in order; no restarts counted.
    fn boot(path: String, cfg: SupCfg, spec: &[Template], log: &mut Log) -> Self {
        let children = spec
            .iter()
            .map(|t| ModelChild {
                template: t.clone(),
                state: start(t, &path, log),
            })
            .collect();
        Self {
            path,
            cfg,
            children,
            restarts: 0,
        }
    }

    fn child_path(&self, idx: usize) -> String {
        format!("{}/{}", self.path, self.children[idx].template.name())
    }

    /// Applies the OTP rules to the exit of child `idx` (already not running).
    fn handle_exit(&mut self, idx: usize, abnormal: bool, log: &mut Log) -> Result<(), Escalation> {
        self.children[idx].state = ChildState::Stopped;
        let restart_type = self.children[idx].template.restart();
        // Temporary: never restarted. Transient: restarted after abnormal exits only.
        let restart = !matches!(
            (restart_type, abnormal),
            (Restart::Temporary, _) | (Restart::Transient, false)
        );
        if !restart {
            if restart_type == Restart::Temporary {
                self.children.remove(idx);
            }
            return Ok(());
        }
        self.restarts += 1;
        if self.restarts > self.cfg.max_restarts {
            log.escalated.push(self.path.clone());
            for child in &mut self.children {
                child.state = ChildState::Stopped;
            }
            return Err(Escalation);
        }
        let group = match self.cfg.strategy {
            Strat::OneForOne => idx..idx + 1,
            Strat::OneForAll => 0..self.children.len(),
            Strat::RestForOne => idx..self.children.len(),
        };
        // Stop the other members (temporary ones leave for good), then start every member
        // still there, whatever its state before: a transient child that had exited
        // normally comes back too.
        let old = std::mem::take(&mut self.children);
        for (i, mut child) in old.into_iter().enumerate() {
            if group.contains(&i) {
                if i != idx && child.template.restart() == Restart::Temporary {
                    continue;
                }
                child.state = start(&child.template, &self.path, log);
            }
            self.children.push(child);
        }
        Ok(())
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.children.iter().position(|c| c.template.name() == name)
    }
}

/// What the live tree must publish to finish an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Settled {
    /// `ExitHandled { supervisor, child }` of the highest supervisor that handled it.
    Handled { supervisor: String, child: String },
    /// The root escalated: `RootFailed`.
    RootFailed,
}

/// Where a worker is expected to be after an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Presence {
    Running,
    /// Exited and not restarted, spec kept (a transient child after a normal exit).
    Stopped,
    /// Not in the tree (a removed temporary child, or under a removed `sub`).
    Absent,
}

#[derive(Clone, Debug)]
struct Model {
    /// `None` once the root has escalated.
    root: Option<ModelSup>,
    log: Log,
}

impl Model {
    fn boot(case: &Case, root_name: &str) -> Self {
        let sub = Template::Sup {
            name: "sub",
            restart: case.sub_restart,
            cfg: case.sub,
            children: [Worker::A, Worker::B, Worker::C]
                .iter()
                .map(|&w| Template::Worker(w, case.restart_of(w)))
                .collect(),
        };
        let spec = [
            Template::Worker(Worker::W0, case.w0),
            sub,
            Template::Worker(Worker::W2, case.w2),
        ];
        let mut log = Log::default();
        let root = ModelSup::boot(root_name.to_string(), case.root, &spec, &mut log);
        Self {
            root: Some(root),
            log,
        }
    }

    /// Applies `op`; `None` when its target is not running (the op is skipped).
    fn apply(&mut self, op: Op) -> Option<Settled> {
        let root = self.root.as_mut()?;
        let worker = op.worker();
        let outcome = if worker.in_sub() {
            let sub_idx = root.position("sub")?;
            let ChildState::RunningSup(sub) = &mut root.children[sub_idx].state else {
                return None;
            };
            let idx = sub.position(worker.name())?;
            if !matches!(sub.children[idx].state, ChildState::RunningWorker) {
                return None;
            }
            let child = sub.child_path(idx);
            match sub.handle_exit(idx, op.abnormal(), &mut self.log) {
                Ok(()) => Ok(Settled::Handled {
                    supervisor: sub.path.clone(),
                    child,
                }),
                Err(Escalation) => {
                    let child = root.child_path(sub_idx);
                    root.handle_exit(sub_idx, true, &mut self.log)
                        .map(|()| Settled::Handled {
                            supervisor: root.path.clone(),
                            child,
                        })
                }
            }
        } else {
            let idx = root.position(worker.name())?;
            if !matches!(root.children[idx].state, ChildState::RunningWorker) {
                return None;
            }
            let child = root.child_path(idx);
            root.handle_exit(idx, op.abnormal(), &mut self.log)
                .map(|()| Settled::Handled {
                    supervisor: root.path.clone(),
                    child,
                })
        };
        match outcome {
            Ok(sync) => Some(sync),
            Err(Escalation) => {
                self.root = None;
                Some(Settled::RootFailed)
            }
        }
    }

    fn presence(&self, worker: Worker) -> Presence {
        let Some(root) = &self.root else {
            return Presence::Absent;
        };
        let (sup, name) = if worker.in_sub() {
            let Some(sub_idx) = root.position("sub") else {
                return Presence::Absent;
            };
            match &root.children[sub_idx].state {
                ChildState::RunningSup(sub) => (&**sub, worker.name()),
                other => panic!("model: sub is {other:?} between operations"),
            }
        } else {
            (root, worker.name())
        };
        match sup.position(name).map(|i| &sup.children[i].state) {
            None => Presence::Absent,
            Some(ChildState::RunningWorker) => Presence::Running,
            Some(ChildState::Stopped) => Presence::Stopped,
            Some(ChildState::RunningSup(_)) => unreachable!("a worker is not a supervisor"),
        }
    }

    fn sub_present(&self) -> bool {
        self.root
            .as_ref()
            .is_some_and(|root| root.position("sub").is_some())
    }
}

// ---------------------------------------------------------------------------------------
// The live tree.

fn restart_type(restart: Restart) -> RestartType {
    match restart {
        Restart::Permanent => RestartType::Permanent,
        Restart::Transient => RestartType::Transient,
        Restart::Temporary => RestartType::Temporary,
    }
}

fn strategy(strat: Strat) -> llmos_kernel::Strategy {
    match strat {
        Strat::OneForOne => llmos_kernel::Strategy::OneForOne,
        Strat::OneForAll => llmos_kernel::Strategy::OneForAll,
        Strat::RestForOne => llmos_kernel::Strategy::RestForOne,
    }
}

fn sup_spec(cfg: SupCfg) -> SupervisorSpec {
    SupervisorSpec::new(strategy(cfg.strategy)).intensity(cfg.max_restarts, PERIOD)
}

/// The tree's spec and each worker's probe control (indexed by [`Worker::index`]).
fn build(case: &Case) -> (SupervisorSpec, Vec<ProbeControl>) {
    let journal = Journal::default();
    let mut controls = Vec::new();
    let mut specs: Vec<ChildSpec> = Vec::new();
    for w in WORKERS {
        let (spec, control) = probe(w.name(), &journal);
        specs.push(spec.restart(restart_type(case.restart_of(w))));
        controls.push(control);
    }
    let [w0, a, b, c, w2]: [ChildSpec; 5] = specs.try_into().expect("five workers");
    let sub = ChildSpec::supervisor("sub", sup_spec(case.sub).child(a).child(b).child(c))
        .restart(restart_type(case.sub_restart));
    let root = sup_spec(case.root).child(w0).child(sub).child(w2);
    (root, controls)
}

fn worker_path(root: &str, worker: Worker) -> String {
    if worker.in_sub() {
        format!("{root}/sub/{}", worker.name())
    } else {
        format!("{root}/{}", worker.name())
    }
}

/// Compares starts, snapshot states and (for escalations) published paths with the model.
fn compare(
    kernel: &Kernel,
    root: &str,
    model: &Model,
    controls: &[ProbeControl],
) -> Result<(), String> {
    let live_starts: Vec<u64> = controls.iter().map(ProbeControl::started).collect();
    if live_starts != model.log.starts {
        return Err(format!(
            "starts [w0, a, b, c, w2]: live {live_starts:?}, model {:?}",
            model.log.starts
        ));
    }
    if model.root.is_none() {
        return Ok(());
    }
    let snapshot = kernel.snapshot();
    for w in WORKERS {
        let path = worker_path(root, w);
        let live = snapshot.find(&path).map(|n| n.state);
        let expected = model.presence(w);
        let ok = matches!(
            (expected, live),
            (Presence::Running, Some(NodeState::Running))
                | (Presence::Stopped, Some(NodeState::Stopped))
                | (Presence::Absent, None)
        );
        if !ok {
            return Err(format!(
                "{path}: live state {live:?}, model {expected:?}\n{}",
                snapshot.render()
            ));
        }
    }
    let sub_path = format!("{root}/sub");
    let live_sub = snapshot.find(&sub_path).map(|n| n.state);
    let sub_ok = if model.sub_present() {
        live_sub == Some(NodeState::Running)
    } else {
        live_sub.is_none()
    };
    if !sub_ok {
        return Err(format!(
            "{sub_path}: live state {live_sub:?}, model present={}\n{}",
            model.sub_present(),
            snapshot.render()
        ));
    }
    Ok(())
}

/// Whether `event` ends the wait for an operation: the first `ExitHandled` (of any
/// supervisor: when `sub` escalates it publishes none, and the root's comes last) or
/// `RootFailed`. Which one it was is compared with the model afterwards.
fn ends_op(event: &KernelEvent) -> bool {
    matches!(
        event,
        KernelEvent::ExitHandled { .. } | KernelEvent::RootFailed { .. }
    )
}

fn observed(event: &KernelEvent) -> Option<Settled> {
    match event {
        KernelEvent::ExitHandled { supervisor, child } => Some(Settled::Handled {
            supervisor: supervisor.to_string(),
            child: child.to_string(),
        }),
        KernelEvent::RootFailed { .. } => Some(Settled::RootFailed),
        _ => None,
    }
}

/// Applies the case's operations to the model and to the live tree, comparing after each;
/// `Ok(true)` when the root escalated (as the model expected).
async fn drive(
    kernel: &Kernel,
    root: &str,
    case: &Case,
    controls: &[ProbeControl],
) -> Result<bool, String> {
    let mut model = Model::boot(case, root);
    compare(kernel, root, &model, controls).map_err(|e| format!("after boot: {e}"))?;
    let mut done: Vec<Op> = Vec::new();
    for (step, &op) in case.ops.iter().enumerate() {
        let escalated_before = model.log.escalated.len();
        let Some(expected) = model.apply(op) else {
            continue;
        };
        done.push(op);
        let context =
            |what: String| format!("step {step} {op:?} (applied so far: {done:?}): {what}");
        let mut events: EventStream = kernel.subscribe();
        let path = worker_path(root, op.worker());
        let addr = kernel
            .addr::<ProbeMsg>(&path)
            .map_err(|e| context(format!("no address for {path}: {e}")))?;
        let message = if op.abnormal() {
            ProbeMsg::Panic
        } else {
            ProbeMsg::Stop
        };
        addr.cast(message)
            .await
            .map_err(|e| context(format!("could not send to {path}: {e}")))?;
        let seen = events
            .collect_until(WAIT, ends_op)
            .await
            .map_err(|e| context(format!("waiting for {expected:?}: {e}")))?;
        let last = seen.last().and_then(observed);
        if last.as_ref() != Some(&expected) {
            return Err(context(format!(
                "ended with {last:?}, model expects {expected:?}; events: {seen:#?}"
            )));
        }
        let live_escalated: Vec<String> = seen
            .iter()
            .filter_map(|e| match e {
                KernelEvent::Escalated { path, .. } => Some(path.to_string()),
                _ => None,
            })
            .collect();
        let model_escalated = &model.log.escalated[escalated_before..];
        if live_escalated != model_escalated {
            return Err(context(format!(
                "escalated: live {live_escalated:?}, model {model_escalated:?}; events: {seen:#?}"
            )));
        }
        compare(kernel, root, &model, controls).map_err(context)?;
        if expected == Settled::RootFailed {
            return match tokio::time::timeout(WAIT, kernel.wait()).await {
                Ok(TreeExit::RootFailed(_)) => Ok(true),
                other => Err(context(format!(
                    "root escalated but Kernel::wait gave {other:?}"
                ))),
            };
        }
    }
    Ok(false)
}

/// Boots a tree for `case`, drives it, shuts it down; `Err` describes the first mismatch.
fn run_case(case: &Case) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    runtime.block_on(async {
        let root = format!("model-{}", NEXT_TREE.fetch_add(1, Ordering::Relaxed));
        let (spec, controls) = build(case);
        let kernel = Kernel::boot(&root, spec)
            .await
            .map_err(|e| format!("boot: {e}"))?;
        let result = drive(&kernel, &root, case, &controls).await;
        let shutdown = tokio::time::timeout(WAIT, kernel.shutdown("test")).await;
        let root_failed = result?;
        match shutdown {
            Ok(TreeExit::RootFailed(_)) if root_failed => Ok(()),
            Ok(TreeExit::Shutdown) if !root_failed => Ok(()),
            Ok(exit) => Err(format!("shutdown of {root} gave {exit:?}")),
            Err(_) => Err(format!("shutdown of {root} did not finish within {WAIT:?}")),
        }
    })
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Restarts, removals, escalations and root failure of the live tree follow the model.
    #[test]
    fn live_tree_follows_the_otp_model(case in case_strategy()) {
        if let Err(mismatch) = run_case(&case) {
            prop_assert!(false, "{}", mismatch);
        }
    }
}

/// The model itself, on hand-checked sequences (guards against a model that agrees with a
/// wrong kernel by accident).
#[test]
fn model_sanity() {
    let base = Case {
        root: SupCfg {
            strategy: Strat::OneForOne,
            max_restarts: 1,
        },
        sub: SupCfg {
            strategy: Strat::OneForAll,
            max_restarts: 1,
        },
        sub_restart: Restart::Permanent,
        w0: Restart::Permanent,
        a: Restart::Temporary,
        b: Restart::Transient,
        c: Restart::Permanent,
        w2: Restart::Permanent,
        ops: Vec::new(),
    };
    let mut m = Model::boot(&base, "r");
    assert_eq!(m.log.starts, [1; 5]);
    // b exits normally: transient, stays stopped, no restart counted.
    assert_eq!(
        m.apply(Op::Exit(Worker::B)),
        Some(Settled::Handled {
            supervisor: "r/sub".into(),
            child: "r/sub/b".into()
        })
    );
    assert_eq!(m.presence(Worker::B), Presence::Stopped);
    assert_eq!(m.apply(Op::Crash(Worker::B)), None);
    // c crashes: one_for_all removes temporary a, restarts stopped b and c.
    m.apply(Op::Crash(Worker::C));
    assert_eq!(m.log.starts, [1, 1, 2, 2, 1]);
    assert_eq!(m.presence(Worker::A), Presence::Absent);
    assert_eq!(m.presence(Worker::B), Presence::Running);
    // c again: sub escalates; the root restarts sub from its spec, a comes back.
    assert_eq!(
        m.apply(Op::Crash(Worker::C)),
        Some(Settled::Handled {
            supervisor: "r".into(),
            child: "r/sub".into()
        })
    );
    assert_eq!(m.log.escalated, ["r/sub"]);
    assert_eq!(m.log.starts, [1, 2, 3, 3, 1]);
    assert_eq!(m.presence(Worker::A), Presence::Running);
    // w0 crashes: the root's second restart escalates.
    assert_eq!(m.apply(Op::Crash(Worker::W0)), Some(Settled::RootFailed));
    assert_eq!(m.log.escalated, ["r/sub", "r"]);
    assert_eq!(m.apply(Op::Crash(Worker::W2)), None);
}
