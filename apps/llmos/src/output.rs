//! What commands print on stdout: human-readable lines, or with `--json` one JSON object per
//! line, each tagged by `"event"`. Logs go to stderr, so stdout stays parseable.

use std::io::{self, Write};

use llmos_kernel::{KernelEvent, TreeSnapshot};
use serde_json::{json, Value};

/// How stdout (and the log lines on stderr) are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Lines for people.
    Human,
    /// One JSON object per line.
    Json,
}

/// The command's stdout.
pub struct Output<W = io::Stdout> {
    format: Format,
    out: W,
}

impl Output {
    /// Writes to the process's stdout.
    pub fn stdout(format: Format) -> Self {
        Self::new(format, io::stdout())
    }
}

impl<W: Write> Output<W> {
    /// Writes to `out`.
    pub fn new(format: Format, out: W) -> Self {
        Self { format, out }
    }

    /// One record: `human` or `json` depending on the format. Flushed at once, because
    /// readers (people, tests, supervisors of this process) act on each line as it comes.
    pub fn record(
        &mut self,
        human: impl FnOnce() -> String,
        json: impl FnOnce() -> Value,
    ) -> io::Result<()> {
        match self.format {
            Format::Human => writeln!(self.out, "{}", human())?,
            Format::Json => {
                serde_json::to_writer(&mut self.out, &json())?;
                writeln!(self.out)?;
            }
        }
        self.out.flush()
    }

    /// A kernel event, if it is one a reader cares about.
    pub fn event(&mut self, event: &KernelEvent) -> io::Result<()> {
        let Some(line) = describe(event) else {
            return Ok(());
        };
        let value = serde_json::to_value(event)?;
        self.record(|| line, || value)
    }

    /// The whole tree, under a label saying when it was taken.
    pub fn tree(&mut self, label: &str, tree: &TreeSnapshot) -> io::Result<()> {
        let value = serde_json::to_value(tree)?;
        self.record(
            || format!("== tree: {label} ==\n{}", tree.render().trim_end()),
            || json!({ "event": "tree", "label": label, "tree": value }),
        )
    }

    /// The line a supervising process waits for before it may signal this one.
    pub fn ready(&mut self) -> io::Result<()> {
        self.record(|| "ready".into(), || json!({ "event": "ready" }))
    }
}

/// The human line for an event, `None` for bookkeeping events (first starts, handled exits).
pub fn describe(event: &KernelEvent) -> Option<String> {
    let line = match event {
        KernelEvent::Started { restarts: 0, .. } | KernelEvent::ExitHandled { .. } => return None,
        KernelEvent::Started { path, restarts } => {
            format!("restarted  {path} (restart {restarts})")
        }
        KernelEvent::StartFailed { path, reason } => format!("start-fail {path}: {reason}"),
        KernelEvent::Failed { path, reason } => format!("failed     {path}: {reason}"),
        KernelEvent::Exited { path, reason } => match reason {
            Some(reason) => format!("exited     {path}: {reason}"),
            None => format!("exited     {path}"),
        },
        KernelEvent::HangDetected { path, silent_for } => {
            format!("hang       {path}: no heartbeat for {silent_for:?}")
        }
        KernelEvent::RestartScheduled { path, delay } => {
            format!("backoff    {path}: restart in {delay:?}")
        }
        KernelEvent::Stopped {
            path,
            killed: false,
        } => format!("stopped    {path}"),
        KernelEvent::Stopped { path, killed: true } => {
            format!("stopped    {path} (killed after its shutdown timeout)")
        }
        KernelEvent::Removed { path } => format!("removed    {path}"),
        KernelEvent::Escalated {
            path,
            max_restarts,
            period,
        } => format!("escalated  {path}: more than {max_restarts} restarts in {period:?}"),
        KernelEvent::ShutdownStarted { reason } => format!("shutdown   {reason}"),
        KernelEvent::ShutdownComplete => "shutdown complete".into(),
        KernelEvent::RootFailed { reason } => format!("root-fail  {reason}"),
    };
    Some(line)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use llmos_kernel::ActorPath;

    use super::*;

    fn printed(format: Format, events: &[KernelEvent]) -> String {
        let mut out = Output::new(format, Vec::new());
        for event in events {
            out.event(event).unwrap();
        }
        String::from_utf8(out.out).unwrap()
    }

    #[test]
    fn bookkeeping_events_are_not_printed() {
        let path = ActorPath::from("llmos/a");
        let quiet = [
            KernelEvent::Started {
                path: path.clone(),
                restarts: 0,
            },
            KernelEvent::ExitHandled {
                supervisor: ActorPath::from("llmos"),
                child: path,
            },
        ];
        assert_eq!(printed(Format::Human, &quiet), "");
        assert_eq!(printed(Format::Json, &quiet), "");
    }

    #[test]
    fn human_and_json_lines_agree() {
        let events = [
            KernelEvent::Failed {
                path: ActorPath::from("llmos/workers/producer"),
                reason: "boom".into(),
            },
            KernelEvent::Escalated {
                path: ActorPath::from("llmos/workers"),
                max_restarts: 3,
                period: Duration::from_secs(10),
            },
            KernelEvent::ShutdownComplete,
        ];
        assert_eq!(
            printed(Format::Human, &events),
            "failed     llmos/workers/producer: boom\n\
             escalated  llmos/workers: more than 3 restarts in 10s\n\
             shutdown complete\n"
        );
        let json = printed(Format::Json, &events);
        let tags: Vec<String> = json
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap()["event"].to_string())
            .collect();
        assert_eq!(
            tags,
            ["\"failed\"", "\"escalated\"", "\"shutdown_complete\""]
        );
    }
}
