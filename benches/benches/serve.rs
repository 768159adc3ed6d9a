//! Serving benchmark, side by side in one run: `llmos serve` against llama.cpp's
//! `llama-server` on the same synthetic 134M q8_0 GGUF (`bench-134m`, see
//! ../shared/ANCHORS.md), driven by the same client load over the OpenAI API — distinct
//! prompts of about 120 tokens, 128 greedy tokens each, at 1, 8, 16 and 64 concurrent
//! streams (up to 16 streams the median of 3 rounds, each round running every level) —
//! then the prefill of a ≈500-token prompt, and (llmos) inter-token gaps of 16 streams
//! while a 1,500-token prompt arrives mid-run. It prints aggregate tokens/s, time to first
//! token and inter-token gaps per server, their ratios, errors and hang
//! detections, next to the targets of the engine-under-load issue. While one server is
//! measured the other is stopped (SIGSTOP): idle, llama.cpp's threads poll, and would take
//! a core from llmos (and the other way round).
//!
//! `cargo bench -p llmos-benches --bench serve`. The anchor is found at
//! `$LLAMA_SERVER`, else at `~/.cache/llmos-anchors/…/build/bin/llama-server` (ANCHORS.md
//! says how to build it); without it the bench says so and measures llmos alone. The
//! llmos binary is built in release mode first (`$LLMOS_BIN` overrides). `BENCH_LEVELS=1,16`
//! picks concurrency levels; `BENCH_TOKENS` the tokens per stream; `BENCH_LLMOS_LOG` sets
//! the server's `RUST_LOG` and keeps its log in `target/release/llmos-bench-serve.log`.
//! After the q8_0 runs, the same model stored as q4_K and as f32 (`BENCH_WEIGHTS=q4k,f32`,
//! `none` to skip) gets one run of 1 and of 16 streams and one prefill per server.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use llmos_models::synth::{self, Preset};
use llmos_models::{GgmlDType, Tokenizer};
use llmos_tests::http::{open, Sse};
use serde_json::{json, Value};

type Res<T> = Result<T, String>;

/// Hang guard of every read.
const IO_TIMEOUT: Duration = Duration::from_secs(600);
const PROMPT_TOKENS: usize = 120;
/// Levels up to this many streams report the median of three runs.
const MEDIAN_UP_TO_STREAMS: usize = 16;
const PREFILL_TOKENS: usize = 500;
const LONG_PROMPT_TOKENS: usize = 1500;

fn err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The bench model stored as `dtype`, written once into the target directory.
fn bench_model(dtype: GgmlDType) -> Res<PathBuf> {
    let dir = workspace().join("target/release/llmos-bench-cache");
    std::fs::create_dir_all(&dir).map_err(err("cache dir"))?;
    let name = format!("{dtype:?}").to_lowercase();
    let path = dir.join(format!("bench-134m-{name}.gguf"));
    if !path.exists() {
        eprintln!("writing {} (once)…", path.display());
        let tmp = path.with_extension("tmp");
        synth::write_gguf(&tmp, &Preset::BENCH_134M, dtype, 0).map_err(err("synth"))?;
        std::fs::rename(&tmp, &path).map_err(err("rename"))?;
    }
    Ok(path)
}

/// The other storage types the bench reports (`BENCH_WEIGHTS=q4k,f32`, `none` for none).
fn other_weights() -> Res<Vec<GgmlDType>> {
    let list = std::env::var("BENCH_WEIGHTS").unwrap_or_else(|_| "q4k,f32".into());
    list.split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty() && *w != "none")
        .map(|w| match w {
            "q4k" | "q4_k" => Ok(GgmlDType::Q4K),
            "q4_0" => Ok(GgmlDType::Q4_0),
            "q6k" | "q6_k" => Ok(GgmlDType::Q6K),
            "f16" => Ok(GgmlDType::F16),
            "f32" => Ok(GgmlDType::F32),
            other => Err(format!("BENCH_WEIGHTS: unknown storage type {other:?}")),
        })
        .collect()
}

/// The llmos binary: `$LLMOS_BIN`, else built in release mode once per bench run (every
/// server of the run is the same build, whatever changes in the tree meanwhile).
fn llmos_binary() -> Res<PathBuf> {
    static BUILT: std::sync::OnceLock<Res<PathBuf>> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_llmos).clone()
}

fn build_llmos() -> Res<PathBuf> {
    if let Some(bin) = std::env::var_os("LLMOS_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "llmos", "--bin", "llmos"])
        .current_dir(workspace())
        .status()
        .map_err(err("cargo build llmos"))?;
    if !status.success() {
        return Err("cargo build of llmos failed".into());
    }
    Ok(workspace().join("target/release/llmos"))
}

fn anchor() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("LLAMA_SERVER") {
        let path = PathBuf::from(path);
        return path.exists().then_some(path);
    }
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(
        ".cache/llmos-anchors/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server",
    );
    path.exists().then_some(path)
}

fn free_port() -> Res<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(err("bind"))?;
    Ok(listener.local_addr().map_err(err("addr"))?.port())
}

/// A server process, killed when dropped.
struct Server {
    name: &'static str,
    /// Locked only to poll or reap it (the measured runs share the server by reference).
    child: std::sync::Mutex<Child>,
    addr: SocketAddr,
    model: String,
    _state: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
        // `BENCH_LLMOS_LOG=llmos::engine=debug` and the log is kept for a look.
        if let (Some(state), true) = (&self._state, std::env::var_os("BENCH_LLMOS_LOG").is_some()) {
            let kept = workspace().join("target/release/llmos-bench-serve.log");
            if std::fs::copy(state.path().join("serve.log"), &kept).is_ok() {
                eprintln!("llmos log kept at {}", kept.display());
            }
        }
    }
}

impl Server {
    fn wait_ready(&mut self) -> Res<()> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(300) {
            if let Some(status) = self.exited() {
                return Err(format!("{} exited while starting: {status}", self.name));
            }
            if let Ok((200, _, _)) = open(self.addr, "GET", "/health", &[], None, IO_TIMEOUT) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!("{} did not become ready", self.name))
    }

    /// Stops (`false`) or continues (`true`) the process: a server not being measured is
    /// stopped, so that its idle threads (llama.cpp's poll) take nothing from the other.
    fn set_running(&self, running: bool) {
        let signal = if running { "-CONT" } else { "-STOP" };
        let _ = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status();
    }

    fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).id()
    }

    /// How the process ended, if it has.
    fn exited(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        child.try_wait().ok().flatten()
    }

    fn get(&self, path: &str) -> Res<String> {
        let (_, _, mut body) =
            open(self.addr, "GET", path, &[], None, IO_TIMEOUT).map_err(err("GET"))?;
        let mut text = String::new();
        body.read_to_string(&mut text).map_err(err("read"))?;
        Ok(text)
    }
}

fn start_llmos(model: &Path) -> Res<Server> {
    let bin = llmos_binary()?;
    let port = free_port()?;
    let state = tempfile::tempdir().map_err(err("tempdir"))?;
    let log = std::fs::File::create(state.path().join("serve.log")).map_err(err("log"))?;
    let child = Command::new(bin)
        .args(["serve", "--model"])
        .arg(model)
        .args(["--addr", &format!("127.0.0.1:{port}"), "--state-dir"])
        .arg(state.path().join("state"))
        // K/V as f16, as llama.cpp stores it by default: the same memory traffic.
        .args(["--kv-budget-mb", "2048", "--kv-dtype", "f16"])
        .env(
            "RUST_LOG",
            std::env::var("BENCH_LLMOS_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(err("start llmos"))?;
    let mut server = Server {
        name: "llmos",
        child: std::sync::Mutex::new(child),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        model: model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        _state: Some(state),
    };
    server.wait_ready()?;
    Ok(server)
}

fn start_llama(bin: &Path, model: &Path) -> Res<Server> {
    let port = free_port()?;
    let child = Command::new(bin)
        .arg("-m")
        .arg(model)
        .args(["-t", "2", "-np", "16", "-c", "8192", "--host", "127.0.0.1"])
        .args(["--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(err("start llama-server"))?;
    let mut server = Server {
        name: "llama.cpp",
        child: std::sync::Mutex::new(child),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        model: "bench".into(),
        _state: None,
    };
    server.wait_ready()?;
    Ok(server)
}

/// Distinct prompts of about `tokens` tokens each: words drawn from a seeded generator,
/// measured with the model's own tokenizer.
fn prompts(tokenizer: &Tokenizer, count: usize, tokens: usize, tag: u64) -> Vec<String> {
    const WORDS: [&str; 24] = [
        "the", "little", "dog", "ran", "over", "a", "green", "hill", "and", "saw", "big", "red",
        "ball", "under", "tree", "where", "bird", "sang", "song", "to", "happy", "cat", "played",
        "sun",
    ];
    let mut state = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..count)
        .map(|i| {
            let mut text = format!("Story {tag}-{i}:");
            while tokenizer.encode(&text, true).map_or(0, |t| t.len()) < tokens {
                text.push(' ');
                text.push_str(WORDS[(next() % WORDS.len() as u64) as usize]);
            }
            text
        })
        .collect()
}

/// What one stream saw.
#[derive(Default)]
struct StreamResult {
    tokens: usize,
    prompt_tokens: Option<usize>,
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    arrivals: Vec<Instant>,
    error: Option<String>,
}

fn run_stream(
    server_addr: SocketAddr,
    model: &str,
    prompt: &str,
    max_tokens: usize,
) -> StreamResult {
    let body = json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": true,
    })
    .to_string();
    let mut out = StreamResult::default();
    let sent = Instant::now();
    let (status, _, reader) = match open(
        server_addr,
        "POST",
        "/v1/completions",
        &[],
        Some(&body),
        IO_TIMEOUT,
    ) {
        Ok(opened) => opened,
        Err(e) => {
            out.error = Some(e.to_string());
            return out;
        }
    };
    if status != 200 {
        let mut text = String::new();
        let mut reader = reader;
        let _ = reader.read_to_string(&mut text);
        out.error = Some(format!("HTTP {status}: {text}"));
        return out;
    }
    let mut events = Sse { reader };
    let mut last: Option<Instant> = None;
    while let Some(event) = events.next() {
        if event.data == "[DONE]" {
            break;
        }
        let now = Instant::now();
        let Ok(chunk) = serde_json::from_str::<Value>(&event.data) else {
            continue;
        };
        if let Some(error) = chunk.get("error") {
            out.error = Some(error.to_string());
            break;
        }
        if let Some(p) = chunk["usage"]["prompt_tokens"].as_u64() {
            out.prompt_tokens = Some(p as usize);
        }
        let choice = &chunk["choices"][0];
        if choice["finish_reason"].is_string() {
            continue;
        }
        out.tokens += 1;
        match last {
            None => out.ttft = Some(now - sent),
            Some(before) => out.gaps.push(now - before),
        }
        out.arrivals.push(now);
        last = Some(now);
    }
    out
}

/// One load: `prompts.len()` streams at once.
struct Load {
    streams: Vec<StreamResult>,
    wall: Duration,
}

impl Load {
    fn tokens(&self) -> usize {
        self.streams.iter().map(|s| s.tokens).sum()
    }
    fn errors(&self) -> usize {
        self.streams.iter().filter(|s| s.error.is_some()).count()
    }
    fn tps(&self) -> f64 {
        self.tokens() as f64 / self.wall.as_secs_f64()
    }
    fn ttfts(&self) -> Vec<Duration> {
        self.streams.iter().filter_map(|s| s.ttft).collect()
    }
    fn gaps(&self) -> Vec<Duration> {
        self.streams
            .iter()
            .flat_map(|s| s.gaps.iter().copied())
            .collect()
    }
}

/// Runs `f` with every other server stopped (see [`Server::set_running`]).
fn alone<T>(servers: &[&Server], measured: &Server, f: impl FnOnce() -> T) -> T {
    for s in servers.iter().filter(|s| s.addr != measured.addr) {
        s.set_running(false);
    }
    let out = f();
    for s in servers.iter().filter(|s| s.addr != measured.addr) {
        s.set_running(true);
    }
    // A server that died mid-bench makes every later figure meaningless: say so, loudly.
    if let Some(status) = measured.exited() {
        eprintln!(
            "BENCH INVALID: {} exited during the run ({status}); set BENCH_LLMOS_LOG=info to keep its log",
            measured.name
        );
        std::process::exit(2);
    }
    out
}

fn run_load(server: &Server, prompts: &[String], max_tokens: usize) -> Load {
    let barrier = Arc::new(Barrier::new(prompts.len() + 1));
    let handles: Vec<_> = prompts
        .iter()
        .map(|prompt| {
            let (addr, model, prompt, barrier) = (
                server.addr,
                server.model.clone(),
                prompt.clone(),
                barrier.clone(),
            );
            std::thread::spawn(move || {
                barrier.wait();
                run_stream(addr, &model, &prompt, max_tokens)
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    let streams: Vec<StreamResult> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_default())
        .collect();
    Load {
        streams,
        wall: started.elapsed(),
    }
}

fn percentile(values: &[Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let mut v = values.to_vec();
    v.sort();
    let at = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[at.min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e3)
}

/// `llmos_hang_detections_total` from `/metrics`.
fn hang_detections(server: &Server) -> f64 {
    sample(
        &server.get("/metrics").unwrap_or_default(),
        "llmos_hang_detections_total",
    )
}

fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(f64::NAN)
}

fn print_load_row(name: &str, level: usize, load: &Load) {
    let ttft = load.ttfts();
    let gaps = load.gaps();
    println!(
        "  {name:<10} {level:>3} streams: {:>7.1} tok/s  ({} tokens in {:.1} s)  TTFT p50 {} / p99 {} ms  gap p50 {} / p99 {} ms  errors {}",
        load.tps(),
        load.tokens(),
        load.wall.as_secs_f64(),
        ms(percentile(&ttft, 0.5)),
        ms(percentile(&ttft, 0.99)),
        ms(percentile(&gaps, 0.5)),
        ms(percentile(&gaps, 0.99)),
        load.errors(),
    );
    for s in load.streams.iter().filter(|s| s.error.is_some()).take(2) {
        println!("      error: {}", s.error.as_deref().unwrap_or(""));
    }
}

fn main() {
    if let Err(e) = bench() {
        eprintln!("serve bench failed: {e}");
        std::process::exit(1);
    }
}

fn bench() -> Res<()> {
    let levels: Vec<usize> = std::env::var("BENCH_LEVELS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 16, 64]);
    let max_tokens: usize = std::env::var("BENCH_TOKENS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(128);
    let others = other_weights()?;
    let model = bench_model(GgmlDType::Q8_0)?;
    let tokenizer = Tokenizer::from_gguf_file(&model).map_err(err("tokenizer"))?;
    let llmos = start_llmos(&model)?;
    let llama = match anchor() {
        Some(bin) => Some(start_llama(&bin, &model)?),
        None => {
            println!(
                "ANCHOR MISSING: llama-server not found ($LLAMA_SERVER, or build it as \
                 ../shared/ANCHORS.md says under ~/.cache/llmos-anchors); measuring llmos alone."
            );
            None
        }
    };
    let servers: Vec<&Server> = llama.iter().chain(std::iter::once(&llmos)).collect();
    println!(
        "serve bench: {} ({} MB), {max_tokens} greedy tokens per stream, prompts of ~{PROMPT_TOKENS} tokens, 2 threads each, K/V f16 in both",
        model.display(),
        std::fs::metadata(&model).map_or(0, |m| m.len() >> 20)
    );
    // Warm-up (page in the weights, first allocations), not measured.
    for (i, server) in servers.iter().enumerate() {
        let warm = prompts(&tokenizer, 1, 32, 900 + i as u64);
        let _ = alone(&servers, server, || run_load(server, &warm, 8));
    }

    // Concurrency levels. Up to 16 streams, three rounds each running every level on
    // every server, and each level reports its median run by tokens/s: the rounds put
    // the levels' runs side by side in time, so a ratio between levels (16 streams
    // against one) compares runs made under the same conditions on a shared machine whose
    // memory bandwidth moves from minute to minute. Above 16 streams, one run.
    let (repeated, once): (Vec<usize>, Vec<usize>) =
        levels.iter().partition(|&&l| l <= MEDIAN_UP_TO_STREAMS);
    let mut schedule: Vec<(usize, usize)> = Vec::new(); // (run, level)
    for run in 0..3 {
        schedule.extend(repeated.iter().map(|&l| (run, l)));
    }
    schedule.extend(once.iter().map(|&l| (0, l)));
    let mut runs: Vec<(usize, usize, Load)> = Vec::new(); // (level, server, load)
    for &(run, level) in &schedule {
        for (i, server) in servers.iter().enumerate() {
            // Distinct prompts for every run: llama.cpp's prompt cache must not help.
            let p = prompts(
                &tokenizer,
                level,
                PROMPT_TOKENS,
                (level * 100 + run * 10 + i) as u64 + 1,
            );
            let load = alone(&servers, server, || run_load(server, &p, max_tokens));
            println!(
                "  (run {} of {level} streams on {}: {:.1} tok/s)",
                run + 1,
                server.name,
                load.tps()
            );
            runs.push((level, i, load));
        }
    }
    let mut results: Vec<(usize, Vec<Load>)> = Vec::new();
    for &level in &levels {
        println!("\n{level} concurrent streams:");
        let mut loads = Vec::new();
        for (i, server) in servers.iter().enumerate() {
            let mut mine: Vec<Load> = Vec::new();
            let mut k = 0;
            while k < runs.len() {
                if runs[k].0 == level && runs[k].1 == i {
                    mine.push(runs.swap_remove(k).2);
                } else {
                    k += 1;
                }
            }
            mine.sort_by(|a, b| a.tps().total_cmp(&b.tps()));
            let median = mine.swap_remove(mine.len() / 2);
            print_load_row(server.name, level, &median);
            loads.push(median);
        }
        results.push((level, loads));
    }

    // Prefill of a ≈500-token prompt: time to the first token.
    println!("\nprefill, one ≈{PREFILL_TOKENS}-token prompt (median of 3):");
    let mut prefill = Vec::new();
    for (i, server) in servers.iter().enumerate() {
        let mut rates = Vec::new();
        for r in 0..3u64 {
            let p = prompts(&tokenizer, 1, PREFILL_TOKENS, 500 + 10 * i as u64 + r);
            let load = alone(&servers, server, || run_load(server, &p, 1));
            let s = &load.streams[0];
            if let (Some(ttft), None) = (s.ttft, &s.error) {
                let n = s
                    .prompt_tokens
                    .unwrap_or_else(|| tokenizer.encode(&p[0], true).map_or(0, |t| t.len()));
                rates.push(n as f64 / ttft.as_secs_f64());
            }
        }
        rates.sort_by(f64::total_cmp);
        let median = rates.get(rates.len() / 2).copied().unwrap_or(f64::NAN);
        println!("  {:<10} {median:>7.1} prompt tok/s", server.name);
        prefill.push(median);
    }

    // 16 streams decoding while a 1,500-token prompt arrives mid-run (llmos).
    println!("\ninterference: 16 streams of {max_tokens} tokens, a {LONG_PROMPT_TOKENS}-token prompt arriving once every stream has 16 tokens (llmos):");
    let interference = alone(&servers, &llmos, || {
        long_prompt_interference(&llmos, &tokenizer, max_tokens)
    })?;

    let hangs = hang_detections(&llmos);
    let metrics = llmos.get("/metrics").unwrap_or_default();
    let mean = |name: &str| {
        sample(&metrics, &format!("{name}_sum")) / sample(&metrics, &format!("{name}_count"))
    };
    println!(
        "\nllmos engine over the whole run: mean step {:.1} ms, of which forward {:.1} ms; \
         mean batch {:.1} sequences / {:.1} token rows; {} preemptions",
        mean("llmos_engine_step_seconds") * 1e3,
        mean("llmos_engine_forward_seconds") * 1e3,
        mean("llmos_engine_batch_sequences"),
        mean("llmos_engine_batch_tokens"),
        sample(&metrics, "llmos_preemptions_total"),
    );
    drop((llmos, llama));
    let mut other_rows = Vec::new();
    for dtype in others {
        other_rows.push(other_weight_type(dtype, &tokenizer, &levels, max_tokens)?);
    }
    summary(&results, &prefill, &interference, hangs, anchor().is_some());
    if !other_rows.is_empty() {
        println!(
            "\nother storage types (one run each, same load): {:>8} {:>12} {:>12} {:>8}",
            "streams", "llama.cpp", "llmos", "ratio"
        );
        for (dtype, rows) in &other_rows {
            for (what, anchor, ours) in rows {
                println!(
                    "{:>8} {what:>38} {:>12} {ours:>12.1} {:>8}",
                    format!("{dtype:?}").to_lowercase(),
                    anchor.map_or("-".into(), |a| format!("{a:.1}")),
                    anchor.map_or("-".into(), |a| format!("{:.2}x", ours / a)),
                );
            }
        }
    }
    Ok(())
}

/// Rows of (what, llama.cpp, llmos) in tokens/s for the bench model stored as `dtype`:
/// one run of 1 and of 16 streams (those of `levels`) and one ≈500-token prefill, each
/// server measured alone.
#[allow(clippy::type_complexity)]
fn other_weight_type(
    dtype: GgmlDType,
    tokenizer: &Tokenizer,
    levels: &[usize],
    max_tokens: usize,
) -> Res<(GgmlDType, Vec<(String, Option<f64>, f64)>)> {
    let model = bench_model(dtype)?;
    println!(
        "\n--- {} ({} MB) ---",
        model.display(),
        std::fs::metadata(&model).map_or(0, |m| m.len() >> 20)
    );
    let llmos = start_llmos(&model)?;
    let llama = anchor().map(|bin| start_llama(&bin, &model)).transpose()?;
    let servers: Vec<&Server> = llama.iter().chain(std::iter::once(&llmos)).collect();
    for (i, server) in servers.iter().enumerate() {
        let warm = prompts(tokenizer, 1, 32, 950 + i as u64);
        let _ = alone(&servers, server, || run_load(server, &warm, 8));
    }
    let mut rows = Vec::new();
    for &level in levels.iter().filter(|&&l| l == 1 || l == 16) {
        let mut tps = Vec::new();
        for (i, server) in servers.iter().enumerate() {
            let p = prompts(
                tokenizer,
                level,
                PROMPT_TOKENS,
                3000 + (level * 10 + i) as u64,
            );
            let load = alone(&servers, server, || run_load(server, &p, max_tokens));
            print_load_row(server.name, level, &load);
            tps.push(load.tps());
        }
        let anchor = (tps.len() == 2).then(|| tps[0]);
        rows.push((
            format!("{level} streams, tok/s"),
            anchor,
            *tps.last().expect("llmos ran"),
        ));
    }
    let mut rates = Vec::new();
    for (i, server) in servers.iter().enumerate() {
        let p = prompts(tokenizer, 1, PREFILL_TOKENS, 3500 + i as u64);
        let load = alone(&servers, server, || run_load(server, &p, 1));
        let s = &load.streams[0];
        let rate = match (s.ttft, &s.error) {
            (Some(ttft), None) => {
                let n = s
                    .prompt_tokens
                    .unwrap_or_else(|| tokenizer.encode(&p[0], true).map_or(0, |t| t.len()));
                n as f64 / ttft.as_secs_f64()
            }
            _ => f64::NAN,
        };
        println!("  {:<10} prefill {rate:>7.1} prompt tok/s", server.name);
        rates.push(rate);
    }
    let anchor = (rates.len() == 2).then(|| rates[0]);
    rows.push((
        format!("prefill ≈{PREFILL_TOKENS} tokens, tok/s"),
        anchor,
        *rates.last().expect("llmos ran"),
    ));
    Ok((dtype, rows))
}

/// Gap percentiles of the running streams, and the long prompt's time to first token.
struct Interference {
    p50: Duration,
    p99: Duration,
    max: Duration,
    during_p99: Duration,
    long_ttft: Option<Duration>,
    errors: usize,
}

fn long_prompt_interference(
    server: &Server,
    tokenizer: &Tokenizer,
    max_tokens: usize,
) -> Res<Interference> {
    let p = prompts(tokenizer, 16, PROMPT_TOKENS, 777);
    let long = prompts(tokenizer, 1, LONG_PROMPT_TOKENS, 778).remove(0);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let handles: Vec<_> = p
        .into_iter()
        .map(|prompt| {
            let (addr, model, tx) = (server.addr, server.model.clone(), tx.clone());
            std::thread::spawn(move || {
                let body = json!({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                  "temperature": 0.0, "stream": true})
                .to_string();
                let mut out = StreamResult::default();
                let opened = open(
                    addr,
                    "POST",
                    "/v1/completions",
                    &[],
                    Some(&body),
                    IO_TIMEOUT,
                );
                let Ok((200, _, reader)) = opened else {
                    out.error = Some("request failed".into());
                    let _ = tx.send(());
                    return out;
                };
                let mut events = Sse { reader };
                let mut last = None;
                while let Some(event) = events.next() {
                    if event.data == "[DONE]" {
                        break;
                    }
                    let Ok(chunk) = serde_json::from_str::<Value>(&event.data) else {
                        continue;
                    };
                    if chunk["choices"][0]["finish_reason"].is_string() {
                        continue;
                    }
                    let now = Instant::now();
                    out.tokens += 1;
                    if let Some(before) = last {
                        out.gaps.push(now - before);
                    }
                    out.arrivals.push(now);
                    last = Some(now);
                    if out.tokens == 16 {
                        let _ = tx.send(());
                    }
                }
                if out.tokens < 16 {
                    let _ = tx.send(());
                }
                out
            })
        })
        .collect();
    drop(tx);
    for _ in 0..16 {
        let _ = rx.recv();
    }
    let long_sent = Instant::now();
    let long_result = run_stream(server.addr, &server.model, &long, 16);
    let long_end = long_sent + long_result.ttft.unwrap_or_default();
    let streams: Vec<StreamResult> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_default())
        .collect();
    let gaps: Vec<Duration> = streams
        .iter()
        .flat_map(|s| s.gaps.iter().copied())
        .collect();
    // Gaps that ended while the long prompt was being prefilled.
    let mut during = Vec::new();
    for s in &streams {
        for (i, gap) in s.gaps.iter().enumerate() {
            let arrived = s.arrivals[i + 1];
            if arrived >= long_sent && arrived <= long_end + *gap {
                during.push(*gap);
            }
        }
    }
    let result = Interference {
        p50: percentile(&gaps, 0.5),
        p99: percentile(&gaps, 0.99),
        max: gaps.iter().max().copied().unwrap_or_default(),
        during_p99: percentile(&during, 0.99),
        long_ttft: long_result.ttft,
        errors: streams.iter().filter(|s| s.error.is_some()).count()
            + usize::from(long_result.error.is_some()),
    };
    println!(
        "  gaps p50 {} ms, p99 {} ms (p99/p50 {:.2}), max {} ms; p99 of the {} gaps during the long prefill {} ms; long prompt TTFT {} ms; errors {}",
        ms(result.p50),
        ms(result.p99),
        result.p99.as_secs_f64() / result.p50.as_secs_f64().max(1e-9),
        ms(result.max),
        during.len(),
        ms(result.during_p99),
        result.long_ttft.map_or("-".into(), ms),
        result.errors
    );
    Ok(result)
}

fn summary(
    results: &[(usize, Vec<Load>)],
    prefill: &[f64],
    interference: &Interference,
    hangs: f64,
    with_anchor: bool,
) {
    println!("\n=== summary (this run, this machine) ===");
    let ours = |loads: &Vec<Load>| loads.last().map(Load::tps).unwrap_or(f64::NAN);
    let single = results
        .iter()
        .find(|(l, _)| *l == 1)
        .map(|(_, loads)| ours(loads));
    println!(
        "{:>8} {:>12} {:>12} {:>8} {:>14} {:>14} {:>8}",
        "streams", "llama.cpp", "llmos", "ratio", "llmos/1-stream", "llmos gap p99", "errors"
    );
    for (level, loads) in results {
        let llmos = loads.last().expect("llmos ran");
        let anchor = if with_anchor {
            loads.first().map(Load::tps)
        } else {
            None
        };
        println!(
            "{level:>8} {:>12} {:>12.1} {:>8} {:>14} {:>11} ms {:>8}",
            anchor.map_or("-".into(), |a| format!("{a:.1}")),
            llmos.tps(),
            anchor.map_or("-".into(), |a| format!("{:.2}x", llmos.tps() / a)),
            single.map_or("-".into(), |s| format!("{:.2}x", llmos.tps() / s)),
            ms(percentile(&llmos.gaps(), 0.99)),
            llmos.errors() + if with_anchor { loads[0].errors() } else { 0 },
        );
    }
    if let (Some(ours), anchor) = (prefill.last(), with_anchor.then(|| prefill[0])) {
        println!(
            "prefill ≈{PREFILL_TOKENS} tokens: llmos {ours:.1} tok/s{}",
            anchor.map_or(String::new(), |a| format!(
                ", llama.cpp {a:.1} tok/s, ratio {:.2}x",
                ours / a
            ))
        );
    }
    println!(
        "interference: p99/p50 inter-token gap {:.2} (target ≤ 3) while a {LONG_PROMPT_TOKENS}-token prompt arrives",
        interference.p99.as_secs_f64() / interference.p50.as_secs_f64().max(1e-9)
    );
    println!("llmos hang detections during the run: {hangs} (target 0)");
    if let Some(s16) = results
        .iter()
        .find(|(l, _)| *l == 16)
        .map(|(_, loads)| ours(loads))
    {
        if let Some(s1) = single {
            println!(
                "llmos at 16 streams: {:.2}x its single-stream figure (target ≥ 2.5)",
                s16 / s1
            );
        }
    }
}
