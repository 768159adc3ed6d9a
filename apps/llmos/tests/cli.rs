//! End-to-end tests of the `llmos` binary: the demo's crash, restart and ordered shutdown,
//! fault points from the environment, shutdown on SIGTERM/SIGINT, and bad input.
//!
//! Each test runs the real binary and reads its stdout line by line; waits end on lines the
//! binary prints when something happened, never on sleeps. A guard thread kills a child
//! that runs for too long, so a bug fails the test instead of hanging CI.

use std::fmt;
use std::io::{BufRead, BufReader, Lines, Read};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use serde_json::Value;

/// A demo takes well under a second; this only catches hangs.
const HANG_GUARD: Duration = Duration::from_secs(30);

/// The demo's children in start order (depth first)…
const START_ORDER: [&str; 5] = [
    "llmos/telemetry",
    "llmos/workers",
    "llmos/workers/producer",
    "llmos/workers/consumer",
    "llmos/watchdog-demo",
];

/// …and the order an orderly shutdown must stop them in.
fn stop_order() -> Vec<String> {
    START_ORDER.iter().rev().map(|p| p.to_string()).collect()
}

/// A running `llmos`.
struct Llmos {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    stdout: Vec<String>,
    stderr: Option<thread::JoinHandle<String>>,
    guard: Option<mpsc::Sender<()>>,
}

/// What a finished `llmos` did.
struct Finished {
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: String,
}

impl Llmos {
    /// Starts `llmos ARGS` with `LLMOS_FAILPOINTS` set to `failpoints` (or unset).
    fn spawn(args: &[&str], failpoints: Option<&str>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_llmos"));
        command
            .args(args)
            .env_remove("LLMOS_FAILPOINTS")
            .env_remove("RUST_LOG")
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(spec) = failpoints {
            command.env("LLMOS_FAILPOINTS", spec);
        }
        let mut child = command.spawn().expect("cannot start llmos");
        let pid = child.id();
        let (guard, released) = mpsc::channel::<()>();
        thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = released.recv_timeout(HANG_GUARD) {
                eprintln!("llmos (pid {pid}) ran for more than {HANG_GUARD:?}: killing it");
                send_signal(pid, libc::SIGKILL);
            }
        });
        let mut stderr = child.stderr.take().expect("piped stderr");
        // Drained aside so a chatty stderr cannot fill its pipe and stall the child.
        let stderr = thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        Self {
            child,
            lines,
            stdout: Vec::new(),
            stderr: Some(stderr),
            guard: Some(guard),
        }
    }

    /// Runs `llmos ARGS` to its end.
    fn run(args: &[&str], failpoints: Option<&str>) -> Finished {
        Self::spawn(args, failpoints).finish()
    }

    /// Reads stdout until a line equal to `wanted`; `false` if stdout ended first.
    fn read_until(&mut self, wanted: &str) -> bool {
        for line in self.lines.by_ref() {
            let line = line.expect("stdout is not UTF-8");
            let found = line == wanted;
            self.stdout.push(line);
            if found {
                return true;
            }
        }
        false
    }

    fn signal(&self, signal: libc::c_int) {
        send_signal(self.child.id(), signal);
    }

    /// Reads the rest of stdout and stderr and waits for the exit.
    fn finish(&mut self) -> Finished {
        for line in self.lines.by_ref() {
            self.stdout.push(line.expect("stdout is not UTF-8"));
        }
        let status = self.child.wait().expect("cannot wait for llmos");
        drop(self.guard.take());
        let stderr = self
            .stderr
            .take()
            .map(|t| t.join().expect("stderr reader panicked"))
            .unwrap_or_default();
        Finished {
            status,
            stdout: std::mem::take(&mut self.stdout),
            stderr,
        }
    }
}

impl Drop for Llmos {
    // A failed assertion must not leave a `--until-signal` child running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(unsafe_code)]
fn send_signal(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child's.
    let rc = unsafe { libc::kill(pid, signal) };
    assert!(
        rc == 0 || signal == libc::SIGKILL,
        "kill({pid}, {signal}) failed"
    );
}

impl Finished {
    fn has_line(&self, line: &str) -> bool {
        self.stdout.iter().any(|l| l == line)
    }

    fn position(&self, line: &str) -> usize {
        self.stdout
            .iter()
            .position(|l| l == line)
            .unwrap_or_else(|| panic!("no line {line:?}:\n{self}"))
    }

    /// The lines of the tree printed under `label`.
    fn tree(&self, label: &str) -> Vec<&str> {
        let start = self.position(&format!("== tree: {label} ==")) + 1;
        let body = self.stdout[start..]
            .iter()
            .take_while(|l| l.starts_with("llmos ") || l.starts_with(['│', '├', '└', ' ']));
        body.map(String::as_str).collect()
    }

    /// Paths of the `stopped` lines after the line `after`.
    fn stops_after(&self, after: &str) -> Vec<String> {
        self.stdout[self.position(after)..]
            .iter()
            .filter_map(|l| l.strip_prefix("stopped    "))
            .map(str::to_string)
            .collect()
    }
}

impl fmt::Display for Finished {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "status: {}", self.status)?;
        writeln!(f, "--- stdout\n{}", self.stdout.join("\n"))?;
        write!(f, "--- stderr\n{}", self.stderr)
    }
}

/// The name and the `restarts=` count of each line of a rendered tree.
fn tree_nodes(tree: &[&str]) -> Vec<(String, u64)> {
    tree.iter()
        .map(|line| {
            let rest = line.trim_start_matches(['│', '├', '└', '─', ' ']);
            let name = rest.split_whitespace().next().unwrap_or_default();
            let restarts = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("restarts="))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no restart count in {line:?}"));
            (name.to_string(), restarts)
        })
        .collect()
}

fn restarts_of(tree: &[&str], name: &str) -> u64 {
    tree_nodes(tree)
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name} in {tree:#?}"))
        .1
}

fn line_of<'a>(tree: &[&'a str], name: &str) -> &'a str {
    tree.iter()
        .find(|l| l.contains(&format!(" {name} ")))
        .unwrap_or_else(|| panic!("no {name} in {tree:#?}"))
}

const PRODUCER_FAILED: &str = "failed     llmos/workers/producer: failpoint kernel.demo panic";

#[test]
fn demo_crashes_the_producer_restarts_it_and_stops_in_reverse_start_order() {
    let out = Llmos::run(&["demo"], None);
    assert!(out.status.success(), "{out}");

    let booted: Vec<String> = tree_nodes(&out.tree("booted"))
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    let started: Vec<&str> = START_ORDER
        .iter()
        .map(|p| p.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(
        booted[1..],
        started,
        "the tree lists children in start order\n{out}"
    );

    assert!(
        out.has_line("inject     kernel.demo=1*panic->off (crash 1 of 1)"),
        "{out}"
    );
    assert!(out.has_line(PRODUCER_FAILED), "{out}");
    // rest_for_one: the consumer started after the producer goes down and up with it.
    assert!(out.has_line("stopped    llmos/workers/consumer"), "{out}");
    assert!(
        out.has_line("restarted  llmos/workers/producer (restart 1)"),
        "{out}"
    );
    assert!(
        out.has_line("restarted  llmos/workers/consumer (restart 1)"),
        "{out}"
    );

    let last = out.tree("after 1 crash");
    assert!(restarts_of(&last, "producer") >= 1, "{out}");
    assert!(restarts_of(&last, "consumer") >= 1, "{out}");
    let producer = line_of(&last, "producer");
    assert!(
        producer.contains("last_failure=\"failpoint kernel.demo panic\""),
        "{out}"
    );
    assert!(
        !producer.contains("mtbf=- "),
        "a failed node has an MTBF\n{out}"
    );
    assert!(
        !producer.contains("mttr=- "),
        "a repaired node has an MTTR\n{out}"
    );

    assert_eq!(
        out.stops_after("shutdown   demo finished"),
        stop_order(),
        "{out}"
    );
    assert_eq!(
        out.stdout.last().map(String::as_str),
        Some("shutdown complete"),
        "{out}"
    );
}

#[test]
fn json_output_has_one_object_per_line_and_the_final_snapshot() {
    let out = Llmos::run(&["demo", "--json", "--crashes", "2"], None);
    assert!(out.status.success(), "{out}");
    let records: Vec<Value> = out
        .stdout
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}\n{out}")))
        .collect();
    let failures = records
        .iter()
        .filter(|r| r["event"] == "failed" && r["path"] == "llmos/workers/producer")
        .count();
    assert_eq!(failures, 2, "{out}");

    let last = records
        .iter()
        .find(|r| r["event"] == "tree" && r["label"] == "after 2 crashes")
        .unwrap_or_else(|| panic!("no final tree\n{out}"));
    let producer = find_node(&last["tree"]["root"], "llmos/workers/producer").expect("producer");
    assert_eq!(producer["restarts"], 2, "{producer:#}");
    assert_eq!(producer["state"], "running", "{producer:#}");
    assert_eq!(
        producer["last_failure"]["reason"],
        "failpoint kernel.demo panic"
    );
    assert_eq!(producer["reliability"]["failures"], 2, "{producer:#}");
    assert!(
        producer["reliability"]["mtbf_secs"].is_number(),
        "{producer:#}"
    );
    assert!(
        producer["reliability"]["mttr_secs"].is_number(),
        "{producer:#}"
    );
    let consumer = find_node(&last["tree"]["root"], "llmos/workers/consumer").expect("consumer");
    assert_eq!(consumer["restarts"], 2, "{consumer:#}");

    let shutdown = records
        .iter()
        .position(|r| r["event"] == "shutdown_started")
        .unwrap_or_else(|| panic!("no shutdown\n{out}"));
    let stops: Vec<String> = records[shutdown..]
        .iter()
        .filter(|r| r["event"] == "stopped")
        .map(|r| r["path"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(stops, stop_order(), "{out}");
    assert_eq!(
        records.last().map(|r| &r["event"]),
        Some(&"shutdown_complete".into())
    );
    // Logs went to stderr, as JSON too.
    for line in out.stderr.lines() {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "not JSON: {line:?}"
        );
    }
}

fn find_node<'a>(node: &'a Value, path: &str) -> Option<&'a Value> {
    if node["path"] == path {
        return Some(node);
    }
    node["children"]
        .as_array()?
        .iter()
        .find_map(|child| find_node(child, path))
}

#[test]
fn crashes_beyond_the_restart_intensity_escalate_to_the_root() {
    let out = Llmos::run(&["demo", "--crashes", "4"], None);
    assert!(out.status.success(), "{out}");
    assert!(
        out.has_line("escalated  llmos/workers: more than 3 restarts in 10s"),
        "{out}"
    );
    assert!(
        out.has_line("restarted  llmos/workers (restart 1)"),
        "{out}"
    );
    let last = out.tree("after 4 crashes");
    assert_eq!(restarts_of(&last, "workers"), 1, "{out}");
    assert_eq!(restarts_of(&last, "producer"), 4, "{out}");
    assert_eq!(
        out.stops_after("shutdown   demo finished"),
        stop_order(),
        "{out}"
    );
}

#[test]
fn failpoints_from_the_environment_crash_the_producer_where_configured() {
    let spec = "kernel.demo=2*off->1*panic->off";
    let out = Llmos::run(&["demo"], Some(spec));
    assert!(out.status.success(), "{out}");
    assert!(
        out.has_line("fault point kernel.demo=2*off->1*panic->off (from LLMOS_FAILPOINTS)"),
        "{out}"
    );
    assert!(
        !out.stdout.iter().any(|l| l.starts_with("inject")),
        "nothing injected\n{out}"
    );
    assert!(out.has_line(PRODUCER_FAILED), "{out}");
    assert!(
        restarts_of(&out.tree("after 1 crash"), "producer") >= 1,
        "{out}"
    );
}

#[test]
fn a_point_configured_off_lets_the_demo_finish_without_a_crash() {
    let out = Llmos::run(&["demo"], Some("kernel.demo=off"));
    assert!(out.status.success(), "{out}");
    assert!(
        out.has_line("no crash   kernel.demo=off let 100 items through"),
        "{out}"
    );
    assert_eq!(
        restarts_of(&out.tree("after 0 crashes"), "producer"),
        0,
        "{out}"
    );
}

fn signal_shuts_the_tree_down_in_reverse_start_order(signal: libc::c_int) {
    let mut llmos = Llmos::spawn(&["demo", "--until-signal"], None);
    if !llmos.read_until("ready") {
        panic!("llmos never got ready\n{}", llmos.finish());
    }
    assert!(
        llmos.stdout.iter().any(|l| l == PRODUCER_FAILED),
        "ready comes after the crash\n{}",
        llmos.finish()
    );
    llmos.signal(signal);
    let out = llmos.finish();
    assert_eq!(out.status.code(), Some(0), "{out}");
    assert_eq!(out.stops_after("shutdown   signal"), stop_order(), "{out}");
    assert_eq!(
        out.stdout.last().map(String::as_str),
        Some("shutdown complete"),
        "{out}"
    );
}

#[test]
fn sigterm_shuts_the_tree_down_in_reverse_start_order() {
    signal_shuts_the_tree_down_in_reverse_start_order(libc::SIGTERM);
}

#[test]
fn sigint_shuts_the_tree_down_in_reverse_start_order() {
    signal_shuts_the_tree_down_in_reverse_start_order(libc::SIGINT);
}

#[test]
fn a_bad_crash_count_is_a_usage_error() {
    let out = Llmos::run(&["demo", "--crashes", "banana"], None);
    assert_eq!(out.status.code(), Some(2), "{out}");
    assert!(
        out.stderr
            .contains("invalid value 'banana' for '--crashes <N>'"),
        "{out}"
    );
    assert!(out.stdout.is_empty(), "{out}");

    let out = Llmos::run(&[], None);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a subcommand is required\n{out}"
    );
    assert!(out.stderr.contains("Usage: llmos"), "{out}");
}

#[test]
fn a_bad_failpoint_spec_is_an_error_naming_it_not_a_panic() {
    let out = Llmos::run(&["demo"], Some("kernel.demo=explode"));
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(
        out.stderr
            .contains("bad fault point spec `kernel.demo=explode`"),
        "{out}"
    );
    assert!(!out.stderr.contains("panicked"), "{out}");
    assert!(
        out.stdout.is_empty(),
        "nothing booted, nothing printed\n{out}"
    );
}
