//! The control console without faults: what `tree`, `ps`, `devices`… show, that bad input
//! is answered with errors while the socket keeps serving, that the socket is owner-only,
//! and that the control actor itself survives a kill and a stale or live socket.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{boot, ctl};
use llmos_control::{check_socket_free, socket_path, Client, ControlError, Request, MAX_LINE};
use llmos_kernel::KernelEvent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_and_the_read_commands_show_the_live_system() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = boot(dir.path()).await;

    let meta = std::fs::metadata(socket_path(dir.path())).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "owner only");

    let tree = ctl(dir.path(), "tree", &[]).await.unwrap();
    for name in [
        "llmos",
        "journal",
        "models",
        "devices",
        "cpu:0",
        "pool",
        "engine",
        "scheduler",
        "requests",
        "control",
    ] {
        assert!(tree.contains(name), "{name} missing from\n{tree}");
    }
    assert!(tree.contains("restarts=0") && tree.contains("mtbf=") && tree.contains("mttr="));
    let paths = ctl(dir.path(), "paths", &[]).await.unwrap();
    for path in [
        "llmos/journal",
        "llmos/devices/cpu:0/engine",
        "llmos/devices/cpu:0/pool",
        "llmos/control",
    ] {
        assert!(
            paths.lines().any(|l| l == path),
            "{path} missing from\n{paths}"
        );
    }
    let sub = ctl(dir.path(), "tree", &["llmos/devices"]).await.unwrap();
    assert!(sub.contains("engine") && !sub.contains("journal"), "{sub}");

    let ps = ctl(dir.path(), "ps", &[]).await.unwrap();
    assert!(
        ps.contains("MSG/S") && ps.contains("llmos/scheduler"),
        "{ps}"
    );
    let top = ctl(dir.path(), "top", &["0.2"]).await.unwrap();
    assert!(top.contains("llmos/devices/cpu:0/engine"), "{top}");

    let devices = ctl(dir.path(), "devices", &[]).await.unwrap();
    let row = devices
        .lines()
        .find(|l| l.starts_with("cpu:0"))
        .expect(&devices);
    assert!(
        row.contains("healthy") && row.contains("running"),
        "{devices}"
    );

    let requests = ctl(dir.path(), "requests", &[]).await.unwrap();
    assert!(requests.ends_with("0 in flight"), "{requests}");
    let stats = ctl(dir.path(), "stats", &[]).await.unwrap();
    assert!(
        stats.contains("journal") && stats.contains("stories260K"),
        "{stats}"
    );
    let faults = ctl(dir.path(), "faults", &[]).await.unwrap();
    assert!(
        faults.contains("engine.step") && faults.contains("journal.append"),
        "{faults}"
    );
    let help = ctl(dir.path(), "help", &[]).await.unwrap();
    for command in llmos_control::COMMANDS {
        assert!(
            help.contains(command.name),
            "{} missing from help",
            command.name
        );
    }
    runtime.shutdown("test").await;
    assert!(
        !socket_path(dir.path()).exists(),
        "an orderly stop removes the socket"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_an_error_and_the_socket_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = boot(dir.path()).await;
    let path = socket_path(dir.path());
    tokio::task::spawn_blocking(move || {
        // A second client holds its connection open through everything below.
        let mut bystander = Client::connect(&path).unwrap();
        let mut client = Client::connect(&path).unwrap();
        let error = |r: Result<String, String>| r.expect_err("an error");

        let e = error(client.command("frobnicate", &[]).unwrap());
        assert!(e.contains("unknown command `frobnicate`"), "{e}");
        let e = error(client.command("kill", &["llmos/nope"]).unwrap());
        assert!(e.contains("no actor at `llmos/nope`"), "{e}");
        let e = error(client.command("restart", &["nope"]).unwrap());
        assert!(e.contains("no actor at `nope`"), "{e}");
        let e = error(client.command("kill", &[]).unwrap());
        assert!(e.contains("usage: kill PATH"), "{e}");
        let e = error(client.command("kill", &["llmos"]).unwrap());
        assert!(e.contains("refusing to kill the root"), "{e}");
        let e = error(
            client
                .command("inject", &["engine.step", "explode(now)"])
                .unwrap(),
        );
        assert!(e.contains("engine.step"), "{e}");
        let e = error(client.command("top", &["-1"]).unwrap());
        assert!(e.contains("SECS"), "{e}");

        let garbage = client.send_raw("{\"cmd\": 42, \n").unwrap();
        assert!(!garbage.ok && garbage.error.unwrap().contains("malformed request"));
        let garbage = client.send_raw("{\"args\":[]}\n").unwrap();
        assert!(!garbage.ok);
        assert_eq!(
            client
                .call(&Request::new("tree", ["a", "b"]))
                .unwrap()
                .error
                .unwrap(),
            "usage: tree [PATH]"
        );

        // Bytes that are not UTF-8 get an error on the same connection.
        let mut raw = UnixStream::connect(client.path()).unwrap();
        raw.write_all(b"\xff\xfe tree\n").unwrap();
        let mut reply = [0u8; 256];
        let n = raw.read(&mut reply).unwrap();
        let reply = String::from_utf8_lossy(&reply[..n]);
        assert!(reply.contains("not UTF-8"), "{reply}");

        // An overlong line is refused and that connection closed.
        let mut long = UnixStream::connect(client.path()).unwrap();
        let flood = vec![b'x'; MAX_LINE + 10];
        let _ = long.write_all(&flood);
        let mut reply = String::new();
        let _ = long.read_to_string(&mut reply);
        assert!(reply.contains("longer than"), "{reply}");

        // A client that hangs up mid-line disturbs nobody.
        let mut rude = UnixStream::connect(client.path()).unwrap();
        rude.write_all(b"tre").unwrap();
        drop(rude);

        assert!(client
            .command("tree", &[])
            .unwrap()
            .unwrap()
            .contains("journal"));
        assert!(bystander
            .command("ps", &[])
            .unwrap()
            .unwrap()
            .contains("llmos/journal"));
    })
    .await
    .unwrap();
    // Nothing was restarted by any of that.
    let tree = runtime.kernel().snapshot();
    assert!(
        tree.nodes().iter().all(|n| n.restarts == 0),
        "{}",
        tree.render()
    );
    runtime.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_control_actor_comes_back_on_the_same_socket() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = boot(dir.path()).await;
    let mut events = runtime.kernel().subscribe();
    let answer = ctl(dir.path(), "kill", &["llmos/control"]).await.unwrap();
    assert!(answer.contains("killing llmos/control"), "{answer}");
    events
        .wait_for(Duration::from_secs(10), |e| {
            matches!(e, KernelEvent::Started { path, restarts } if path.as_str() == "llmos/control" && *restarts >= 1)
        })
        .await
        .expect("the control actor restarts");
    let tree = ctl(dir.path(), "tree", &["llmos/control"]).await.unwrap();
    assert!(tree.contains("restarts=1"), "{tree}");
    let mode = std::fs::metadata(socket_path(dir.path()))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    runtime.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_and_a_live_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(dir.path());
    // A socket whose server died: the file stays, nobody listens.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    check_socket_free(dir.path()).expect("a stale socket is free");
    let runtime = boot(dir.path()).await;
    assert!(ctl(dir.path(), "tree", &[])
        .await
        .unwrap()
        .contains("control"));
    runtime.shutdown("test").await;

    // Another server listening there.
    let other = tempfile::tempdir().unwrap();
    let _live = std::os::unix::net::UnixListener::bind(socket_path(other.path())).unwrap();
    let err = check_socket_free(other.path()).expect_err("in use");
    assert!(matches!(err, ControlError::InUse(_)));
    assert!(err.to_string().contains("another llmos server"), "{err}");
    let boot = llmos_inference::Runtime::boot_with(common::config(other.path()), |services| {
        vec![llmos_control::control_spec(services.clone())]
    })
    .await;
    match boot {
        Ok(runtime) => {
            runtime.shutdown("test").await;
            panic!("booted beside a live server");
        }
        // The control child cannot start, so the tree escalates and the boot fails; a
        // server calls `check_socket_free` first for the clear message above.
        Err(err) => assert!(err.to_string().contains("escalating"), "{err}"),
    }
}
