//! The CPU thread count for candle, set once at start-up.

use std::sync::OnceLock;

/// candle's spin bound for its matmul workers, and ours (see [`init_cpu_threads`]).
const CANDLE_SPIN_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
const CANDLE_SPIN_LIMIT: u32 = 2_000;

/// Sets the number of CPU threads candle's CPU backend and rayon's global pool use, once
/// per process. candle 0.11 reads `RAYON_NUM_THREADS` on every CPU matmul and, when it is
/// unset, re-reads /proc/cpuinfo each time (about 7x slower), so the variable must be set
/// before any compute. An explicit `RAYON_NUM_THREADS` from the environment wins. Returns
/// the count in force. Call it early in `main`, before other threads read the environment.
///
/// It also bounds how long candle's quantized-matmul workers spin after a matmul before
/// they sleep (`CANDLE_BARRIER_POOL_SPIN_LIMIT`, unless set): by default they spin for
/// 25,000 rounds, stealing a core from the engine's own kernels (attention) that run
/// between matmuls — measured on the 2-core machine, 16 decoding sequences of the 134M
/// model step 15–20% faster with 2,000.
pub fn init_cpu_threads(default: usize) -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| {
        let from_env = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0);
        if std::env::var_os(CANDLE_SPIN_VAR).is_none() {
            std::env::set_var(CANDLE_SPIN_VAR, CANDLE_SPIN_LIMIT.to_string());
        }
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
