//! Progress of the model load on stderr: one redrawn line on a terminal, a few log lines
//! otherwise (stdout stays the command's output).

use std::io::{IsTerminal as _, Write as _};
use std::sync::Mutex;

use llmos_inference::{LoadProgress, LoadProgressHook};

/// A hook for [`llmos_inference::RuntimeConfig::load_progress`]. When stderr is a terminal
/// it redraws one line, `loading model:  42% (120/260 tensors, 31.5/75.0 MB)`, and ends
/// it with a newline at 100%; otherwise (a pipe, a file, a service's journal) it logs
/// `tracing` info records at each 10% step, at most 10 of them.
pub fn model_load_progress() -> LoadProgressHook {
    if std::io::stderr().is_terminal() {
        let finished = Mutex::new(false);
        LoadProgressHook::new(move |p| {
            let mut finished = finished.lock().unwrap_or_else(|e| e.into_inner());
            if *finished {
                return;
            }
            *finished = p.is_complete();
            let end = if *finished { "\n" } else { "" };
            let mut err = std::io::stderr().lock();
            // Progress is a courtesy: a failed write to stderr must not fail the load.
            let _ = write!(err, "\r{}{end}", line(&p));
            let _ = err.flush();
        })
    } else {
        let logged = Mutex::new(0u32);
        LoadProgressHook::new(move |p| {
            let mut logged = logged.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(step) = log_step(*logged, &p) {
                *logged = step;
                tracing::info!(
                    percent = step * 10,
                    tensors = p.tensors_done,
                    of = p.tensors_total,
                    mb = format_args!("{:.1}/{:.1}", mb(p.bytes_done), mb(p.bytes_total)),
                    "loading model"
                );
            }
        })
    }
}

/// Whole percent done, 100 only when complete.
fn percent(p: &LoadProgress) -> u32 {
    if p.is_complete() {
        100
    } else {
        ((p.fraction() * 100.0).floor() as u32).min(99)
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// The terminal line (without the carriage return).
fn line(p: &LoadProgress) -> String {
    format!(
        "loading model: {:>3}% ({}/{} tensors, {:.1}/{:.1} MB)",
        percent(p),
        p.tensors_done,
        p.tensors_total,
        mb(p.bytes_done),
        mb(p.bytes_total)
    )
}

/// The 10% step to log now, if `p` has passed one beyond `logged` (steps 1..=10).
fn log_step(logged: u32, p: &LoadProgress) -> Option<u32> {
    let step = percent(p) / 10;
    (step > logged).then_some(step)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(tensors_done: usize, bytes_done: u64) -> LoadProgress {
        LoadProgress {
            tensors_done,
            tensors_total: 260,
            bytes_done,
            bytes_total: 75_000_000,
        }
    }

    #[test]
    fn the_line_shows_percent_tensors_and_megabytes() {
        assert_eq!(
            line(&at(120, 31_500_000)),
            "loading model:  42% (120/260 tensors, 31.5/75.0 MB)"
        );
        assert_eq!(
            line(&at(260, 75_000_000)),
            "loading model: 100% (260/260 tensors, 75.0/75.0 MB)"
        );
        // 100% only when every tensor is in.
        assert_eq!(percent(&at(259, 75_000_000)), 99);
    }

    #[test]
    fn logs_at_most_ten_lines_one_per_step() {
        let mut logged = 0;
        let mut lines = Vec::new();
        for i in 0..=260u64 {
            let p = at(i as usize, i * 75_000_000 / 260);
            if let Some(step) = log_step(logged, &p) {
                logged = step;
                lines.push(step);
            }
        }
        assert_eq!(lines, (1..=10).collect::<Vec<_>>());
        // A jump logs once, at the step reached.
        assert_eq!(log_step(0, &at(200, 60_000_000)), Some(8));
        assert_eq!(log_step(8, &at(201, 60_100_000)), None);
    }
}
