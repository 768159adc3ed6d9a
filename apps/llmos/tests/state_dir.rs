//! One process per state directory: while `llmos serve` runs on a directory, `llmos run`
//! on the same directory is refused with an error naming the holder, before it writes
//! anything there; the lock file is owner-only; once the server is killed with SIGKILL
//! (the OS drops its lock), the same `llmos run` succeeds.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use common::{model, Server};

fn run_on(state: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llmos"))
        .args(["run", "--prompt", "Once upon a time", "--max-tokens", "4"])
        .arg("--temperature")
        .arg("0")
        .arg("--model")
        .arg(model())
        .arg("--state-dir")
        .arg(state)
        .env("RUST_LOG", "warn")
        .env("RAYON_NUM_THREADS", "2")
        .env_remove("LLMOS_FAILPOINTS")
        .output()
        .expect("spawn llmos run")
}

#[test]
fn a_second_process_on_a_state_directory_is_refused_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut server = Server::start(&state, &[], &[]);
    let pid = server.child.id();

    let lock = state.join(llmos_inference::LOCK_FILE);
    let mode = std::fs::metadata(&lock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "lock file mode {mode:o}");
    let holder = std::fs::read_to_string(&lock).unwrap();
    assert!(
        holder.starts_with(&format!("pid {pid} ")),
        "lock file says {holder:?}"
    );

    let refused = run_on(&state);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a second process ran: {stderr}");
    assert!(
        stderr.contains("is in use by pid") && stderr.contains(&format!("pid {pid} ")),
        "the refusal does not name the holder: {stderr}"
    );
    assert!(
        !state.join("run.json").exists(),
        "the refused run wrote into the directory"
    );
    // The server is untouched.
    assert_eq!(server.request("GET", "/health", &[], None).status, 200);

    // SIGKILL: no clean-up runs, the OS releases the lock with the process.
    server.kill9();
    let ran = run_on(&state);
    assert!(
        ran.status.success(),
        "run after the holder died: {}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&ran.stdout).trim().is_empty(),
        "the run printed no text"
    );
    assert!(state.join("run.json").exists());
}
