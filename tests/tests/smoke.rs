//! First smoke test: boot, ping, crash, ping again.
use llmos_kernel::{Kernel, Strategy, SupervisorSpec};
use llmos_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_and_restart() {
    let journal = Journal::default();
    let (a, ctl) = probe("a", &journal);
    let kernel = Kernel::boot("smoke", SupervisorSpec::new(Strategy::OneForOne).child(a)).await.unwrap();
    let mut events = kernel.subscribe();
    let addr = kernel.addr::<ProbeMsg>("smoke/a").unwrap();
    assert_eq!(addr.call(ProbeMsg::Ping, None).await.unwrap(), 1);
    addr.cast(ProbeMsg::Panic).await.unwrap();
    exit_handled(&mut events, "smoke", "smoke/a").await;
    assert_eq!(addr.call(ProbeMsg::Ping, None).await.unwrap(), 2);
    assert_eq!(ctl.started(), 2);
    println!("{}", kernel.snapshot().render());
    kernel.shutdown("test").await;
    println!("{:?}", journal.entries());
}
