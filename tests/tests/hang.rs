//! Hang detection: a blocking child that stops beating its heartbeat is declared hung,
//! abandoned (its late work is fenced off) and replaced by the strategy.

use std::sync::mpsc;
use std::time::Duration;

use llmos_kernel::ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use llmos_kernel::{
    Abandoned, ChildSpec, Heartbeat, Kernel, KernelEvent, NodeState, Strategy, SupervisorSpec,
};
use llmos_tests::WAIT;

/// Work handed to the blocking thread.
enum Work {
    /// Doubles the number; answered only if the instance is still current.
    Double(u64, RpcReplyPort<u64>),
    /// Blocks until the sender is dropped or sends, then tries to publish.
    Hang(mpsc::Receiver<()>),
}

/// An actor whose compute runs on its own thread, watched by a heartbeat.
struct Blocky {
    heartbeat: Heartbeat,
    outcomes: mpsc::Sender<String>,
    instance: u64,
}

#[derive(Debug)]
enum BlockyMsg {
    Double(u64, RpcReplyPort<u64>),
    Hang(mpsc::Receiver<()>),
}

struct BlockyState {
    work: mpsc::Sender<Work>,
}

impl Actor for Blocky {
    type Msg = BlockyMsg;
    type State = BlockyState;
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<BlockyMsg>,
        _args: (),
    ) -> Result<BlockyState, ActorProcessingErr> {
        let (tx, rx) = mpsc::channel::<Work>();
        let heartbeat = self.heartbeat.clone();
        let outcomes = self.outcomes.clone();
        let instance = self.instance;
        std::thread::spawn(move || worker_loop(rx, heartbeat, outcomes, instance));
        Ok(BlockyState { work: tx })
    }

    async fn handle(
        &self,
        _myself: ActorRef<BlockyMsg>,
        message: BlockyMsg,
        state: &mut BlockyState,
    ) -> Result<(), ActorProcessingErr> {
        let work = match message {
            BlockyMsg::Double(n, reply) => Work::Double(n, reply),
            BlockyMsg::Hang(release) => Work::Hang(release),
        };
        state
            .work
            .send(work)
            .map_err(|_| "worker thread is gone".into())
    }
}

fn worker_loop(
    rx: mpsc::Receiver<Work>,
    heartbeat: Heartbeat,
    outcomes: mpsc::Sender<String>,
    instance: u64,
) {
    loop {
        heartbeat.idle();
        let Ok(work) = rx.recv() else { return };
        if heartbeat.beat() == Err(Abandoned) {
            return;
        }
        match work {
            Work::Double(n, reply) => {
                if heartbeat.check().is_ok() {
                    let _ = reply.send(n * 2);
                }
            }
            Work::Hang(release) => {
                // Stuck "in a kernel": no beats until released.
                let _ = release.recv();
                let outcome = match heartbeat.check() {
                    Ok(()) => format!("instance {instance} published late work"),
                    Err(Abandoned) => format!("instance {instance} fenced off"),
                };
                let _ = outcomes.send(outcome);
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_heartbeat_is_a_failure_and_the_hung_instance_is_fenced_off() {
    let (outcomes, outcome_rx) = mpsc::channel();
    let instances = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let n = instances.clone();
    let engine = ChildSpec::worker("engine", move |ctx| {
        let instance = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let heartbeat = ctx
            .heartbeat()
            .cloned()
            .expect("blocking child has a heartbeat");
        (
            Blocky {
                heartbeat,
                outcomes: outcomes.clone(),
                instance,
            },
            (),
        )
    })
    .blocking(Duration::from_millis(100));
    let kernel = Kernel::boot(
        "hang",
        SupervisorSpec::new(Strategy::OneForOne).child(engine),
    )
    .await
    .unwrap();
    let addr = kernel.addr::<BlockyMsg>("hang/engine").unwrap();
    assert_eq!(
        addr.call(|r| BlockyMsg::Double(21, r), Some(WAIT))
            .await
            .unwrap(),
        42
    );

    let mut events = kernel.subscribe();
    let (release, release_rx) = mpsc::channel();
    addr.cast(BlockyMsg::Hang(release_rx)).await.unwrap();
    let hang = events
        .wait_for(WAIT, |e| matches!(e, KernelEvent::HangDetected { .. }))
        .await
        .unwrap();
    let KernelEvent::HangDetected { silent_for, .. } = hang else {
        unreachable!()
    };
    assert!(silent_for > Duration::from_millis(100));
    let failed = events
        .wait_for(WAIT, |e| matches!(e, KernelEvent::Failed { .. }))
        .await
        .unwrap();
    assert!(matches!(failed, KernelEvent::Failed { reason, .. } if reason.starts_with("hang")));
    llmos_tests::started(&mut events, "hang/engine").await;

    // The replacement answers while the old thread is still stuck.
    assert_eq!(
        addr.call(|r| BlockyMsg::Double(5, r), Some(WAIT))
            .await
            .unwrap(),
        10
    );
    let node = kernel.snapshot().find("hang/engine").cloned().unwrap();
    assert_eq!((node.state, node.restarts), (NodeState::Running, 1));
    assert!(node.last_failure.unwrap().reason.contains("no heartbeat"));

    // Releasing the stuck thread: it finds itself abandoned and publishes nothing.
    release.send(()).unwrap();
    let outcome = tokio::task::spawn_blocking(move || outcome_rx.recv_timeout(WAIT))
        .await
        .unwrap()
        .expect("the released thread reports");
    assert_eq!(outcome, "instance 1 fenced off");
    assert_eq!(
        addr.call(|r| BlockyMsg::Double(7, r), Some(WAIT))
            .await
            .unwrap(),
        14
    );
    kernel.shutdown("test").await;
}
