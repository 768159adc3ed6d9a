//! `llmos repl` and `llmos ctl`: clients of the control socket that a running server keeps
//! in its state directory (see `llmos-control`). `ctl` runs one command for scripts; `repl`
//! is interactive, with line editing, history in the state directory, and completion of
//! command names, actor paths and fault points fetched from the server.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use llmos_control::{socket_path, Client, Request, COMMANDS};
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Editor, Helper};

use crate::output::Format;

/// The state directory when none is given; `llmos serve` must run on the same one.
const DEFAULT_STATE_DIR: &str = "llmos-state";

/// The history file in the state directory.
const HISTORY_FILE: &str = "repl_history";

/// Arguments of `llmos ctl`.
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The state directory of the running server (its control socket is in it).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The command and its arguments, e.g. `tree` or `kill llmos/requests/req-3`.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// Arguments of `llmos repl`.
#[derive(Debug, clap::Args)]
pub struct ReplArgs {
    /// The state directory of the running server (its control socket is in it).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

/// Runs one command; its error (as the server words it) becomes the exit status 1.
pub fn ctl(args: CtlArgs, format: Format) -> anyhow::Result<()> {
    let mut client = Client::connect(&socket_path(&args.state_dir))?;
    let request = Request::new(&args.command[0], args.command[1..].iter().cloned());
    let response = client.call(&request).context("the control socket")?;
    if format == Format::Json {
        println!("{}", response.to_line().trim_end());
        if !response.ok {
            bail!("{}", response.error.unwrap_or_default());
        }
        return Ok(());
    }
    match response.into_result() {
        Ok(text) => {
            println!("{}", text.trim_end());
            Ok(())
        }
        Err(error) => bail!("{error}"),
    }
}

/// The interactive console.
pub fn repl(args: ReplArgs) -> anyhow::Result<()> {
    let socket = socket_path(&args.state_dir);
    let mut client = Client::connect(&socket)?;
    let mut editor: Editor<ConsoleHelper, DefaultHistory> =
        Editor::new().context("cannot set up line editing")?;
    editor.set_helper(Some(ConsoleHelper {
        socket: socket.clone(),
    }));
    let history = args.state_dir.join(HISTORY_FILE);
    // A first session has no history yet.
    let _ = editor.load_history(&history);
    println!(
        "connected to {}; `help` lists the commands, `quit` leaves",
        socket.display()
    );
    loop {
        let line = match editor.readline("llmos> ") {
            Ok(line) => line,
            // Ctrl-C drops the line being typed, as a shell does.
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(err) => return Err(err).context("reading the command line"),
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line);
        let request = match Request::parse(line) {
            Ok(request) => request,
            Err(err) => {
                eprintln!("error: {err}");
                continue;
            }
        };
        match request.cmd.as_str() {
            "quit" | "exit" => break,
            "top" if request.args.is_empty() && std::io::stdin().is_terminal() => {
                live_top(&mut client, &socket)?;
            }
            _ => match call(&mut client, &socket, &request)? {
                Ok(text) => println!("{}", text.trim_end()),
                Err(error) => eprintln!("error: {error}"),
            },
        }
    }
    if let Err(err) = editor.save_history(&history) {
        eprintln!(
            "warning: cannot save history to {}: {err}",
            history.display()
        );
    }
    Ok(())
}

/// One request; a connection lost (the control actor restarted, e.g. after `kill
/// llmos/control`) is reconnected once before giving up.
fn call(
    client: &mut Client,
    socket: &Path,
    request: &Request,
) -> anyhow::Result<Result<String, String>> {
    match client.call(request) {
        Ok(response) => Ok(response.into_result()),
        Err(_) => {
            *client = reconnect(socket)?;
            Ok(client.call(request)?.into_result())
        }
    }
}

/// Waits a little for a restarting control actor to listen again.
fn reconnect(socket: &Path) -> anyhow::Result<Client> {
    let mut last = None;
    for _ in 0..20 {
        match Client::connect(socket) {
            Ok(client) => return Ok(client),
            Err(err) => last = Some(err),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last.map_or_else(|| anyhow::anyhow!("cannot reconnect"), anyhow::Error::from))
}

/// `top` refreshed every second until Enter is pressed.
fn live_top(client: &mut Client, socket: &Path) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // Line-buffered stdin has no "any key" without raw mode; Enter is enough here.
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        flag.store(true, Ordering::Release);
    });
    while !stop.load(Ordering::Acquire) {
        match call(client, socket, &Request::new("top", ["1"]))? {
            Ok(text) => {
                // Clear the screen and home the cursor, then redraw.
                print!("\x1b[2J\x1b[H{}\n(Enter to stop)\n", text.trim_end());
            }
            Err(error) => {
                eprintln!("error: {error}");
                break;
            }
        }
    }
    Ok(())
}

/// Completion of command names, actor paths and fault points; the latter two are fetched
/// from the server on each completion, so they follow the live tree.
struct ConsoleHelper {
    socket: PathBuf,
}

impl ConsoleHelper {
    fn fetch(&self, cmd: &str) -> Vec<String> {
        let Ok(mut client) = Client::connect(&self.socket) else {
            return Vec::new();
        };
        match client.command(cmd, &[]) {
            Ok(Ok(text)) => text
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        }
    }
}

impl Completer for ConsoleHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let before = &line[..pos];
        let start = before.rfind(char::is_whitespace).map_or(0, |i| i + 1);
        let word = &before[start..];
        let previous: Vec<&str> = before[..start].split_whitespace().collect();
        let options: Vec<String> = match previous.as_slice() {
            [] => COMMANDS
                .iter()
                .map(|c| c.name.to_string())
                .chain(["quit".to_string()])
                .collect(),
            [cmd] if COMMANDS.iter().any(|c| c.name == *cmd && c.takes_path) => self.fetch("paths"),
            ["inject" | "clear"] => self.fetch("faults"),
            _ => Vec::new(),
        };
        let candidates = options
            .into_iter()
            .filter(|o| o.starts_with(word))
            .map(|o| Pair {
                display: o.clone(),
                replacement: o,
            })
            .collect();
        Ok((start, candidates))
    }
}

impl Hinter for ConsoleHelper {
    type Hint = String;
}

impl Highlighter for ConsoleHelper {}

impl Validator for ConsoleHelper {}

impl Helper for ConsoleHelper {}
