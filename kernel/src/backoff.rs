//! Backoff between a failure and its restart: exponential, capped, with seeded jitter.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Delay before the n-th consecutive restart of a child: `initial * multiplier^n`, capped
/// at `max`, then spread by ±`jitter` (a fraction) drawn from a seeded generator, so a
/// schedule is reproducible from its seed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Backoff {
    /// Delay before the first restart in a window (zero: restart at once).
    pub initial: Duration,
    /// Growth factor per consecutive restart.
    pub multiplier: f64,
    /// Upper bound of the delay before jitter.
    pub max: Duration,
    /// Relative spread in `[0, 1]`: the delay is multiplied by a factor in `1 ± jitter`.
    pub jitter: f64,
    /// Seed of the jitter generator.
    pub seed: u64,
}

impl Backoff {
    /// No delay: restart immediately (the OTP behaviour).
    pub fn none() -> Self {
        Self {
            initial: Duration::ZERO,
            multiplier: 1.0,
            max: Duration::ZERO,
            jitter: 0.0,
            seed: 0,
        }
    }

    /// Exponential backoff from `initial`, doubling, capped at `max`, without jitter.
    pub fn exponential(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            multiplier: 2.0,
            max,
            jitter: 0.0,
            seed: 0,
        }
    }

    /// Adds ±`jitter` relative spread drawn from a generator seeded with `seed`.
    pub fn with_jitter(mut self, jitter: f64, seed: u64) -> Self {
        self.jitter = jitter.clamp(0.0, 1.0);
        self.seed = seed;
        self
    }

    /// Sets the growth factor.
    pub fn with_multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier.max(1.0);
        self
    }

    /// The generator a supervisor uses for this backoff's jitter.
    pub(crate) fn rng(&self) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(self.seed)
    }

    /// Delay before a restart preceded by `consecutive` restarts of the same child within
    /// the intensity window.
    pub fn delay(&self, consecutive: u32, rng: &mut impl Rng) -> Duration {
        if self.initial.is_zero() {
            return Duration::ZERO;
        }
        let exponent = i32::try_from(consecutive).unwrap_or(i32::MAX);
        let grown = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = grown.min(self.max.as_secs_f64().max(self.initial.as_secs_f64()));
        let factor = if self.jitter > 0.0 {
            1.0 + rng.gen_range(-self.jitter..=self.jitter)
        } else {
            1.0
        };
        Duration::from_secs_f64((capped * factor).max(0.0))
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_and_caps() {
        let backoff = Backoff::exponential(Duration::from_millis(10), Duration::from_millis(70));
        let mut rng = backoff.rng();
        let delays: Vec<_> = (0..5).map(|n| backoff.delay(n, &mut rng)).collect();
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, vec![10, 20, 40, 70, 70]);
    }

    #[test]
    fn none_is_always_zero() {
        let backoff = Backoff::none();
        let mut rng = backoff.rng();
        assert!((0..10).all(|n| backoff.delay(n, &mut rng).is_zero()));
    }

    #[test]
    fn jitter_is_bounded_and_reproducible_from_the_seed() {
        let backoff = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(1))
            .with_jitter(0.25, 42);
        let first: Vec<_> = {
            let mut rng = backoff.rng();
            (0..20).map(|n| backoff.delay(n % 3, &mut rng)).collect()
        };
        let second: Vec<_> = {
            let mut rng = backoff.rng();
            (0..20).map(|n| backoff.delay(n % 3, &mut rng)).collect()
        };
        assert_eq!(first, second, "same seed, same schedule");
        for (n, delay) in first.iter().enumerate() {
            let base = 100.0 * 2f64.powi((n % 3) as i32);
            let ms = delay.as_secs_f64() * 1000.0;
            assert!(
                ms >= base * 0.75 - 1e-6 && ms <= base * 1.25 + 1e-6,
                "{ms} vs {base}"
            );
        }
        assert!(first.windows(2).any(|w| w[0] != w[1]));
    }
}
