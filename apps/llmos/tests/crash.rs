//! Process crash: `llmos run` killed with SIGKILL mid-generation, then `llmos resume` on
//! the same state directory; the two outputs joined equal an uninterrupted run.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn llmos() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_llmos"));
    command
        .env("RUST_LOG", "warn")
        .env("RAYON_NUM_THREADS", "2");
    command
}

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models/stories260K/stories260K-f32.gguf")
}

fn generation_args(temperature: &str) -> Vec<String> {
    [
        "run",
        "--model",
        model().to_str().unwrap(),
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "80",
        "--seed",
        "7",
        "--kv-budget-mb",
        "4",
        &format!("--temperature={temperature}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn stdout_of(command: &mut Command) -> String {
    let out = command.output().expect("run llmos");
    assert!(
        out.status.success(),
        "llmos failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// How the resumed engine got the sequence's KV, from its admission log line.
fn attach_counts(stderr: &str) -> (usize, usize) {
    let line = stderr
        .lines()
        .find(|l| l.contains("sequence admitted"))
        .unwrap_or_else(|| panic!("no attach logged: {stderr}"));
    let field = |name: &str| -> usize {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    (field("restored"), field("recomputed"))
}

/// Flips bytes all over the K/V data of every pool file in `dir`.
fn corrupt_pools(dir: &std::path::Path) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "pool") {
            let mut bytes = std::fs::read(&path).unwrap();
            let len = bytes.len();
            for offset in (4096..len).step_by(509) {
                bytes[offset] ^= 0x5a;
            }
            std::fs::write(&path, bytes).unwrap();
        }
    }
}

#[test]
fn a_killed_run_resumes_from_its_state_directory_with_identical_text() {
    for (temperature, corrupt) in [("0", false), ("0.8", false), ("0.8", true)] {
        let uninterrupted = stdout_of(llmos().args(generation_args(temperature)));
        assert!(uninterrupted.len() > 100, "{uninterrupted:?}");

        let dir = tempfile::tempdir().unwrap();
        let mut child = llmos()
            .args(generation_args(temperature))
            .arg("--state-dir")
            .arg(dir.path())
            // Slow each token down so the kill lands mid-generation.
            .env("LLMOS_FAILPOINTS", "task.step=sleep(15)")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut first = Vec::new();
        let mut buf = [0u8; 256];
        let started = Instant::now();
        while first.len() < 40 {
            assert!(started.elapsed() < Duration::from_secs(30), "no output");
            let n = stdout.read(&mut buf).unwrap();
            assert!(n > 0, "llmos ended before it could be killed");
            first.extend_from_slice(&buf[..n]);
        }
        let status = Command::new("kill")
            .args(["-KILL", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        child.wait().unwrap();
        // Whatever reached the pipe before the kill is part of what the client saw.
        stdout.read_to_end(&mut first).unwrap();
        let first = String::from_utf8(first).unwrap();
        assert!(
            first.len() < uninterrupted.len(),
            "killed too late: {first:?}"
        );

        if corrupt {
            corrupt_pools(dir.path());
        }
        let resumed = llmos()
            .args(["resume", "--state-dir"])
            .arg(dir.path())
            .env("RUST_LOG", "warn,llmos::engine=info")
            .output()
            .unwrap();
        assert!(resumed.status.success());
        let rest = String::from_utf8(resumed.stdout).unwrap();
        assert_eq!(
            format!("{first}{rest}"),
            uninterrupted,
            "temperature {temperature}, corrupt pool {corrupt}: first part {first:?}, resumed {rest:?}"
        );
        // KV is restored from the pool when it validates, recomputed when it does not.
        let (restored, recomputed) = attach_counts(&String::from_utf8_lossy(&resumed.stderr));
        if corrupt {
            assert!(recomputed > 0, "a corrupt pool must be recomputed");
        } else {
            assert!(restored > 0, "the pool's KV was not reused");
        }
        // Resuming a finished run prints nothing more.
        assert_eq!(
            stdout_of(llmos().args(["resume", "--state-dir"]).arg(dir.path())),
            ""
        );
    }
}

#[test]
fn resume_without_a_run_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = llmos()
        .args(["resume", "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no run to resume"), "{stderr}");
}

#[test]
fn run_errors_are_one_clear_line() {
    for (args, expected) in [
        (vec!["--model", "/nonexistent/model.gguf"], "model.gguf"),
        (vec!["--temperature=-1"], "temperature"),
        (vec!["--top-p=0"], "top_p"),
        (vec!["--devices", "tpu:0"], "tpu:0"),
        (vec!["--devices", "cuda:0"], "built without CUDA"),
    ] {
        let mut command = llmos();
        command.args(["run", "--prompt", "hi"]);
        if !args.contains(&"--model") {
            command.arg("--model").arg(model());
        }
        let out = command.args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or("");
        assert!(
            last.starts_with("error: ") && last.contains(expected),
            "{args:?}: {stderr}"
        );
    }
}
