//! The CPU thread count for candle, set once at start-up.

use std::sync::OnceLock;

/// Sets the number of CPU threads candle's CPU backend and rayon's global pool use, once
/// per process. candle 0.11 reads `RAYON_NUM_THREADS` on every CPU matmul and, when it is
/// unset, re-reads /proc/cpuinfo each time (about 7x slower), so the variable must be set
/// before any compute. An explicit `RAYON_NUM_THREADS` from the environment wins. Returns
/// the count in force. Call it early in `main`, before other threads read the environment.
pub fn init_cpu_threads(default: usize) -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| {
        let from_env = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0);
        let threads = match from_env {
            Some(n) => n,
            None => {
                let n = default.max(1);
                std::env::set_var("RAYON_NUM_THREADS", n.to_string());
                n
            }
        };
        // Fails only when the global pool already exists (someone else sized it): fine.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
        threads
    })
}
