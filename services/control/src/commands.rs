//! The console's commands: each reads the live tree or the shared services and renders
//! plain text, or acts on the tree (kill, restart, fault points). Errors are messages for
//! the user, never panics: a console must not be able to hurt what it observes.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llmos_inference::{engine_path, RequestStatus, Services, REQUESTS_PATH};
use llmos_kernel::{faults, Kernel, NodeKind, NodeSnapshot, TreeSnapshot};

use crate::protocol::{Request, Response};

/// How long an action on the tree (a restart) may take before the console gives up
/// waiting; the action itself goes on.
const ACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest `top` interval, so one client cannot park a connection for long.
const MAX_TOP_SECS: f64 = 10.0;

/// A command's name, usage and one-line description (for `help` and completion).
#[derive(Clone, Copy, Debug)]
pub struct CommandInfo {
    /// The name.
    pub name: &'static str,
    /// Its arguments.
    pub usage: &'static str,
    /// What it does.
    pub about: &'static str,
    /// Whether its first argument is an actor path (for completion).
    pub takes_path: bool,
}

/// Every command the server knows.
pub const COMMANDS: &[CommandInfo] = &[
    CommandInfo {
        name: "help",
        usage: "",
        about: "this list",
        takes_path: false,
    },
    CommandInfo {
        name: "tree",
        usage: "[PATH]",
        about: "the live supervision tree: state, restarts, uptime, MTBF/MTTR",
        takes_path: true,
    },
    CommandInfo {
        name: "ps",
        usage: "",
        about: "every actor with messages handled and rate (since the last 1 s sample)",
        takes_path: false,
    },
    CommandInfo {
        name: "top",
        usage: "[SECS]",
        about:
            "actors by message rate over SECS (default 1, at most 10), then requests by tokens/s",
        takes_path: false,
    },
    CommandInfo {
        name: "requests",
        usage: "",
        about:
            "in-flight requests: tokens, device, state (queued/prefill/decode/preempted), tokens/s",
        takes_path: false,
    },
    CommandInfo {
        name: "devices",
        usage: "",
        about: "device health (probed), KV blocks used/free, KV kept/restored/recomputed",
        takes_path: false,
    },
    CommandInfo {
        name: "kill",
        usage: "PATH",
        about: "crash the actor at PATH (its supervisor restarts it by policy)",
        takes_path: true,
    },
    CommandInfo {
        name: "restart",
        usage: "PATH",
        about: "restart the actor at PATH in order",
        takes_path: true,
    },
    CommandInfo {
        name: "inject",
        usage: "POINT ACTIONS|off",
        about: "set a fault point's actions (fail syntax, e.g. 1*panic->off)",
        takes_path: false,
    },
    CommandInfo {
        name: "clear",
        usage: "POINT",
        about: "remove a fault point's configuration",
        takes_path: false,
    },
    CommandInfo {
        name: "faults",
        usage: "",
        about: "declared fault points and their current actions",
        takes_path: false,
    },
    CommandInfo {
        name: "stats",
        usage: "",
        about: "journal, requests, tokens and restart counts",
        takes_path: false,
    },
    CommandInfo {
        name: "paths",
        usage: "",
        about: "every actor path, one per line (for completion)",
        takes_path: false,
    },
];

/// Message counters of every node at one instant.
pub(crate) struct Sample {
    at: Instant,
    messages: HashMap<String, u64>,
}

impl Sample {
    pub(crate) fn take(kernel: &Kernel) -> Sample {
        Self::of(&kernel.snapshot())
    }

    fn of(tree: &TreeSnapshot) -> Sample {
        Sample {
            at: Instant::now(),
            messages: tree
                .nodes()
                .into_iter()
                .map(|n| (n.path.to_string(), n.messages_handled))
                .collect(),
        }
    }

    /// Messages per second of `node` since this sample (`None` when it is new since).
    fn rate(&self, node: &NodeSnapshot, now: Instant) -> Option<f64> {
        let before = *self.messages.get(node.path.as_str())?;
        let secs = now.duration_since(self.at).as_secs_f64();
        (secs > 0.0).then(|| node.messages_handled.saturating_sub(before) as f64 / secs)
    }
}

/// What the commands share: the services and the last counter sample.
pub(crate) struct Console {
    services: Arc<Services>,
    last: Mutex<Option<Sample>>,
}

impl Console {
    pub(crate) fn new(services: Arc<Services>) -> Self {
        Self {
            services,
            last: Mutex::new(None),
        }
    }

    pub(crate) fn record(&self, sample: Sample) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(sample);
    }

    /// Runs one request.
    pub(crate) async fn run(&self, request: &Request) -> Response {
        match self.dispatch(request).await {
            Ok(text) => Response::ok(text),
            Err(error) => Response::err(error),
        }
    }

    fn kernel(&self) -> Result<&Kernel, String> {
        self.services
            .kernel_handle()
            .ok_or_else(|| "the tree is still booting; try again".to_string())
    }

    async fn dispatch(&self, request: &Request) -> Result<String, String> {
        let args: Vec<&str> = request.args.iter().map(String::as_str).collect();
        let cmd = request.cmd.as_str();
        let arity = |min: usize, max: usize| -> Result<(), String> {
            if (min..=max).contains(&args.len()) {
                Ok(())
            } else {
                let info = COMMANDS.iter().find(|c| c.name == cmd);
                Err(format!("usage: {cmd} {}", info.map_or("", |c| c.usage)))
            }
        };
        match cmd {
            "help" => Ok(help()),
            "tree" => {
                arity(0, 1)?;
                self.tree(args.first().copied())
            }
            "ps" => {
                arity(0, 0)?;
                self.ps()
            }
            "top" => {
                arity(0, 1)?;
                self.top(args.first().copied()).await
            }
            "requests" => {
                arity(0, 0)?;
                self.requests()
            }
            "devices" => {
                arity(0, 0)?;
                self.devices()
            }
            "kill" => {
                arity(1, 1)?;
                self.kill(args[0])
            }
            "restart" => {
                arity(1, 1)?;
                self.restart(args[0]).await
            }
            "inject" => {
                if args.len() < 2 {
                    return Err("usage: inject POINT ACTIONS|off".into());
                }
                inject(args[0], &args[1..].join(" "))
            }
            "clear" => {
                arity(1, 1)?;
                faults::clear(args[0]);
                Ok(format!("{} cleared", args[0]))
            }
            "faults" => {
                arity(0, 0)?;
                Ok(list_faults())
            }
            "stats" => {
                arity(0, 0)?;
                self.stats()
            }
            "paths" => {
                arity(0, 0)?;
                let tree = self.kernel()?.snapshot();
                Ok(tree
                    .nodes()
                    .iter()
                    .map(|n| format!("{}\n", n.path))
                    .collect())
            }
            other => Err(format!(
                "unknown command `{other}`; `help` lists the commands"
            )),
        }
    }

    /// The node at `path` in `tree`, or an error naming the nearest paths.
    fn find<'t>(&self, tree: &'t TreeSnapshot, path: &str) -> Result<&'t NodeSnapshot, String> {
        let path = path.trim_end_matches('/');
        tree.find(path)
            .ok_or_else(|| format!("no actor at `{path}`; `tree` or `paths` shows the live paths"))
    }

    fn tree(&self, path: Option<&str>) -> Result<String, String> {
        let tree = self.kernel()?.snapshot();
        match path {
            None => Ok(tree.render()),
            Some(path) => {
                let node = self.find(&tree, path)?.clone();
                Ok(TreeSnapshot { root: node }.render())
            }
        }
    }

    fn ps(&self) -> Result<String, String> {
        let tree = self.kernel()?.snapshot();
        let now = Instant::now();
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let rows = tree
            .nodes()
            .into_iter()
            .map(|node| (node, last.as_ref().and_then(|s| s.rate(node, now))))
            .collect::<Vec<_>>();
        Ok(actor_table(&rows))
    }

    async fn top(&self, secs: Option<&str>) -> Result<String, String> {
        let secs = match secs {
            None => 1.0,
            Some(text) => text
                .parse::<f64>()
                .ok()
                .filter(|s| *s > 0.0 && *s <= MAX_TOP_SECS)
                .ok_or_else(|| format!("top: SECS must be a number in (0, {MAX_TOP_SECS}]"))?,
        };
        let kernel = self.kernel()?;
        let before = Sample::take(kernel);
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        let tree = kernel.snapshot();
        let now = Instant::now();
        let mut rows = tree
            .nodes()
            .into_iter()
            .map(|node| (node, before.rate(node, now)))
            .collect::<Vec<_>>();
        rows.sort_by(|a, b| {
            b.1.unwrap_or(-1.0)
                .total_cmp(&a.1.unwrap_or(-1.0))
                .then(b.0.messages_handled.cmp(&a.0.messages_handled))
        });
        let mut out = format!("message rates over {secs:.1}s\n");
        out.push_str(&actor_table(&rows));
        let mut requests: Vec<(u64, RequestStatus)> =
            self.services.request_status().into_iter().collect();
        requests.sort_by(|a, b| {
            b.1.tokens_per_sec
                .total_cmp(&a.1.tokens_per_sec)
                .then(a.0.cmp(&b.0))
        });
        let _ = writeln!(
            out,
            "\n{:<8} {:<8} {:<10} {:>7} {:>8} {:>8}",
            "REQUEST", "DEVICE", "STATE", "TOKENS", "KV", "TOK/S"
        );
        for (id, s) in &requests {
            let _ = writeln!(
                out,
                "{id:<8} {:<8} {:<10} {:>7} {:>8} {:>8.1}",
                s.device,
                s.state.name(),
                s.generated,
                s.kv_positions,
                s.tokens_per_sec
            );
        }
        let total: f64 = requests.iter().map(|(_, s)| s.tokens_per_sec).sum();
        let _ = write!(
            out,
            "{} requests in engines, {total:.1} tokens/s together",
            requests.len()
        );
        Ok(out)
    }

    fn requests(&self) -> Result<String, String> {
        let tree = self.kernel()?.snapshot();
        let journal = self.services.journal().map_err(|e| e.to_string())?;
        let unfinished: Vec<(u64, usize, usize, u32)> = {
            let journal = journal.lock().unwrap_or_else(|e| e.into_inner());
            journal
                .unfinished()
                .map(|(id, log)| (id, log.prompt_tokens.len(), log.tokens.len(), log.delivered))
                .collect()
        };
        let status = self.services.request_status();
        let mut out = format!(
            "{:<8} {:<28} {:>7} {:>7} {:>9} {:<8} {:<11} {:>7} {:>8}\n",
            "ID", "PATH", "PROMPT", "TOKENS", "DELIVERED", "DEVICE", "STATE", "TOK/S", "RESTARTS"
        );
        for (id, prompt, tokens, delivered) in &unfinished {
            let path = format!("{REQUESTS_PATH}/req-{id}");
            let node = tree.find(&path);
            let restarts = node.map_or("-".to_string(), |n| n.restarts.to_string());
            // The engine's view when it holds the request, else the task's.
            let (device, state, rate) = match status.get(id) {
                Some(s) => (
                    s.device.clone(),
                    s.state.name().to_string(),
                    format!("{:.1}", s.tokens_per_sec),
                ),
                None => (
                    "-".to_string(),
                    node.map_or("no task".to_string(), state_name),
                    "-".to_string(),
                ),
            };
            let _ = writeln!(
                out,
                "{id:<8} {path:<28} {prompt:>7} {tokens:>7} {delivered:>9} {device:<8} {state:<11} {rate:>7} {restarts:>8}"
            );
        }
        let _ = write!(out, "{} in flight", unfinished.len());
        Ok(out)
    }

    fn devices(&self) -> Result<String, String> {
        let tree = self.kernel()?.snapshot();
        let mut out = format!(
            "{:<8} {:<8} {:<10} {:>6} {:>6} {:>6} {:>10} {:>8} {:>8} {:>10}  {}\n",
            "DEVICE",
            "HEALTH",
            "ENGINE",
            "BLOCKS",
            "USED",
            "FREE",
            "RESTORABLE",
            "KEPT",
            "RESTORED",
            "RECOMPUTED",
            "REASON"
        );
        for runtime in &self.services.devices {
            let id = runtime.device.id();
            // probe() runs a small verified computation: the truth, not a cached flag.
            let health = runtime.device.probe();
            let pool = runtime.pool.stats();
            let (kept, restored, recomputed) = runtime.kv_stats.snapshot();
            let engine = tree
                .find(&engine_path(id))
                .map_or_else(|| "absent".to_string(), state_name);
            let _ = writeln!(
                out,
                "{:<8} {:<8} {:<10} {:>6} {:>6} {:>6} {:>10} {:>8} {:>8} {:>10}  {}",
                id.to_string(),
                if health.healthy { "healthy" } else { "LOST" },
                engine,
                pool.total,
                pool.used,
                pool.free,
                pool.restorable,
                kept,
                restored,
                recomputed,
                health.reason.unwrap_or_default(),
            );
        }
        Ok(out.trim_end().to_string())
    }

    fn kill(&self, path: &str) -> Result<String, String> {
        let kernel = self.kernel()?;
        let tree = kernel.snapshot();
        let node = self.find(&tree, path)?;
        let path = node.path.to_string();
        if node.path.parent().is_none() {
            return Err(format!(
                "refusing to kill the root `{path}`: that stops the whole server"
            ));
        }
        if path == kernel.root_path().child("control").as_str() {
            // Killing ourselves now would drop this connection before it is answered;
            // answer first and let the kill land just after.
            let kernel = kernel.clone();
            let target = path.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = kernel.kill(&target);
            });
            return Ok(format!(
                "killing {path} (this console reconnects after its restart)"
            ));
        }
        kernel
            .kill(&path)
            .map_err(|e| format!("kill {path}: {e}"))?;
        Ok(format!(
            "killed {path}; its supervisor applies its restart policy"
        ))
    }

    async fn restart(&self, path: &str) -> Result<String, String> {
        let kernel = self.kernel()?;
        let tree = kernel.snapshot();
        let path = self.find(&tree, path)?.path.to_string();
        match tokio::time::timeout(ACTION_TIMEOUT, kernel.restart_child(&path)).await {
            Ok(Ok(())) => Ok(format!("restarted {path}")),
            Ok(Err(e)) => Err(format!("restart {path}: {e}")),
            Err(_) => Err(format!(
                "restart {path}: no answer within {ACTION_TIMEOUT:?} (it may still complete)"
            )),
        }
    }

    fn stats(&self) -> Result<String, String> {
        let tree = self.kernel()?.snapshot();
        let mut out = String::new();
        if let Ok(model) = self.services.model() {
            let _ = writeln!(
                out,
                "model       {} (context {})",
                model.name, model.context
            );
        }
        let _ = writeln!(out, "uptime      {:.1}s", tree.root.uptime_secs);
        let nodes = tree.nodes();
        let restarts: u64 = nodes.iter().map(|n| n.restarts).sum();
        let down = nodes
            .iter()
            .filter(|n| !matches!(n.state, llmos_kernel::NodeState::Running))
            .count();
        let _ = writeln!(
            out,
            "actors      {} ({} not running), {} restarts in all",
            nodes.len(),
            down,
            restarts
        );
        match self.services.journal() {
            Ok(journal) => {
                let journal = journal.lock().unwrap_or_else(|e| e.into_inner());
                let stats = journal.stats();
                let tokens: usize = journal.requests().values().map(|r| r.tokens.len()).sum();
                let finished = stats.requests - stats.unfinished_requests;
                let _ = writeln!(
                    out,
                    "requests    {} in the journal: {} in flight, {} finished (finished ones leave at compaction)",
                    stats.requests, stats.unfinished_requests, finished
                );
                let _ = writeln!(out, "tokens      {tokens} journaled for those requests");
                let _ = write!(
                    out,
                    "journal     {} records, {} bytes; since open: {} appended ({} bytes), {} writes, {} syncs, {} failed writes, {} compactions",
                    stats.records,
                    stats.len_bytes,
                    stats.appended_records,
                    stats.appended_bytes,
                    stats.writes,
                    stats.syncs,
                    stats.failed_writes,
                    stats.compactions
                );
            }
            Err(e) => {
                let _ = write!(out, "journal     unavailable: {e}");
            }
        }
        Ok(out)
    }
}

fn help() -> String {
    let mut out = String::from("commands:\n");
    for c in COMMANDS {
        let synopsis = format!("{} {}", c.name, c.usage);
        let _ = writeln!(out, "  {:<26} {}", synopsis.trim_end(), c.about);
    }
    out.push_str("paths look like llmos/devices/cpu:0/engine; `paths` lists them");
    out
}

fn inject(point: &str, actions: &str) -> Result<String, String> {
    faults::configure(point, actions).map_err(|e| e.to_string())?;
    // Points are declared when their code first runs (a task's on the first request), so
    // an undeclared name may be fine, or a typo: say so rather than refuse.
    let base = point.split(':').next().unwrap_or(point);
    let known = faults::list()
        .iter()
        .any(|p| p.name == point || p.name == base);
    let mut text = format!("{point} = {actions}");
    if !known && actions.trim() != "off" {
        text.push_str(&format!(
            "\nnote: `{point}` is not declared (yet); `faults` lists the declared points"
        ));
    }
    Ok(text)
}

fn list_faults() -> String {
    let mut out = String::new();
    for point in faults::list() {
        let _ = writeln!(
            out,
            "{:<20} {:<20} {}",
            point.name,
            point.actions.as_deref().unwrap_or("-"),
            point.description
        );
    }
    if out.is_empty() {
        out.push_str("no fault points declared");
    }
    out.trim_end().to_string()
}

fn state_name(node: &NodeSnapshot) -> String {
    format!("{:?}", node.state).to_lowercase()
}

fn actor_table(rows: &[(&NodeSnapshot, Option<f64>)]) -> String {
    let mut out = format!(
        "{:<40} {:<10} {:<10} {:>8} {:>10} {:>9} {:>10}\n",
        "PATH", "KIND", "STATE", "RESTARTS", "MSGS", "MSG/S", "UPTIME"
    );
    for (node, rate) in rows {
        let kind = match node.kind {
            NodeKind::Supervisor { .. } => "supervisor",
            NodeKind::Worker { .. } => "worker",
        };
        let _ = writeln!(
            out,
            "{:<40} {:<10} {:<10} {:>8} {:>10} {:>9} {:>9.1}s",
            node.path.to_string(),
            kind,
            state_name(node),
            node.restarts,
            node.messages_handled,
            rate.map_or_else(|| "-".to_string(), |r| format!("{r:.1}")),
            node.uptime_secs,
        );
    }
    out.trim_end().to_string()
}
