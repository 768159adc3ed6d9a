//! Token sampling: a pure function of logits, parameters, the sequence so far and the RNG
//! state, so a resumed request draws exactly what the original would have drawn.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::InferenceError;

/// Sampling parameters of one request (journaled with it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1.0: all).
    pub top_p: f32,
    /// Penalty > 1 discourages tokens already in the prompt or output (1.0: none).
    pub repetition_penalty: f32,
    /// Tokens generated at most.
    pub max_tokens: usize,
    /// Generation stops before any of these strings; they are not part of the output.
    pub stop: Vec<String>,
    /// Seed of the sampling RNG.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            max_tokens: 128,
            stop: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Rejects values no sampler can honour, with the field and the allowed range.
    pub fn validate(&self) -> Result<(), InferenceError> {
        let bad = |field: &str, reason: String| {
            Err(InferenceError::InvalidParams(format!("{field}: {reason}")))
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 || self.temperature > 100.0 {
            return bad(
                "temperature",
                format!("{} is not in [0, 100]", self.temperature),
            );
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return bad("top_p", format!("{} is not in (0, 1]", self.top_p));
        }
        if !self.repetition_penalty.is_finite()
            || self.repetition_penalty <= 0.0
            || self.repetition_penalty > 10.0
        {
            return bad(
                "repetition_penalty",
                format!("{} is not in (0, 10]", self.repetition_penalty),
            );
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1".into());
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop", "stop strings must not be empty".into());
        }
        Ok(())
    }
}

/// The sampler's RNG, positioned by (seed, word position): its whole state fits in a
/// journal record and restores exactly.
pub struct SamplerRng {
    rng: ChaCha8Rng,
}

impl SamplerRng {
    /// A fresh generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Encodes the state (seed and word position) for the journal.
    pub fn state(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48);
        out.extend_from_slice(&self.rng.get_seed());
        out.extend_from_slice(&self.rng.get_word_pos().to_le_bytes());
        out
    }

    /// Restores a state written by [`SamplerRng::state`].
    pub fn from_state(state: &[u8]) -> Result<Self, InferenceError> {
        if state.len() != 48 {
            return Err(InferenceError::Corrupt(format!(
                "sampler state has {} bytes, expected 48",
                state.len()
            )));
        }
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&state[..32]);
        let mut pos = [0u8; 16];
        pos.copy_from_slice(&state[32..]);
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_word_pos(u128::from_le_bytes(pos));
        Ok(Self { rng })
    }
}

/// Picks the next token. `history` is the prompt plus the tokens generated so far (for the
/// repetition penalty). Greedy sampling draws nothing from the RNG.
///
/// The draw is defined without sorting the vocabulary, and the result is exactly that of
/// [`sample_reference`] (which sorts): scores are divided by the temperature; the
/// candidates are the `top_k` best (by score, then lower id), then the shortest prefix of
/// them in that order whose probability reaches `top_p`; weights are `exp(s − max)` in
/// f64, summed in ascending token id; one uniform draw in `[0, 1)` times that sum picks
/// the first candidate, in ascending token id, whose running sum exceeds it. Only the
/// candidates are ever sorted, found by partial selection.
pub fn sample(
    logits: &[f32],
    params: &SamplingParams,
    history: &[u32],
    rng: &mut SamplerRng,
) -> Result<u32, InferenceError> {
    let scores = penalised(logits, params, history)?;
    if params.temperature == 0.0 {
        return Ok(argmax(&scores));
    }
    let scaled: Vec<f32> = scores.iter().map(|s| s / params.temperature).collect();
    let better = |a: &u32, b: &u32| {
        scaled[*b as usize]
            .total_cmp(&scaled[*a as usize])
            .then(a.cmp(b))
    };
    let vocab = scaled.len();
    // The top-k candidates (all when top_k is 0 or covers the vocabulary), unordered.
    let mut candidates: Vec<u32> = (0..vocab as u32).collect();
    if params.top_k > 0 && params.top_k < vocab {
        candidates.select_nth_unstable_by(params.top_k - 1, better);
        candidates.truncate(params.top_k);
    }
    let max = candidates
        .iter()
        .map(|&i| scaled[i as usize])
        .fold(f32::NEG_INFINITY, f32::max);
    let weight = |i: u32| f64::from(scaled[i as usize] - max).exp();
    if params.top_p < 1.0 {
        candidates.sort_unstable();
        let total = sum_by_id(&candidates, weight);
        candidates = nucleus(candidates, params.top_p, total, weight, better);
    }
    candidates.sort_unstable();
    Ok(draw_by_id(&candidates, weight, rng))
}

/// The scores after the repetition penalty (borrowed when it changes nothing).
fn penalised<'a>(
    logits: &'a [f32],
    params: &SamplingParams,
    history: &[u32],
) -> Result<std::borrow::Cow<'a, [f32]>, InferenceError> {
    if logits.is_empty() {
        return Err(InferenceError::Internal("empty logits".into()));
    }
    let mut scores = std::borrow::Cow::Borrowed(logits);
    if params.repetition_penalty != 1.0 {
        let scores = scores.to_mut();
        let mut seen = vec![false; scores.len()];
        for &token in history {
            if let Some(flag) = seen.get_mut(token as usize) {
                *flag = true;
            }
        }
        for (score, seen) in scores.iter_mut().zip(seen) {
            if seen {
                *score = if *score > 0.0 {
                    *score / params.repetition_penalty
                } else {
                    *score * params.repetition_penalty
                };
            }
        }
    }
    if scores.iter().any(|s| s.is_nan()) {
        return Err(InferenceError::Internal("NaN in logits".into()));
    }
    Ok(scores)
}

/// `Σ weight(i)` over `ids` (ascending) in that order.
fn sum_by_id(ids: &[u32], weight: impl Fn(u32) -> f64) -> f64 {
    ids.iter().map(|&i| weight(i)).sum()
}

/// The shortest prefix of `candidates` in `better` order whose probability (weights over
/// `total`) reaches `top_p`. Sorts only as far as needed: the best 64, then 256, … until
/// the prefix is found.
fn nucleus(
    mut candidates: Vec<u32>,
    top_p: f32,
    total: f64,
    weight: impl Fn(u32) -> f64,
    better: impl Fn(&u32, &u32) -> std::cmp::Ordering + Copy,
) -> Vec<u32> {
    let mut head = 64.min(candidates.len());
    loop {
        if head < candidates.len() {
            candidates.select_nth_unstable_by(head - 1, better);
        }
        candidates[..head].sort_unstable_by(better);
        let mut cumulative = 0.0;
        for (i, &c) in candidates[..head].iter().enumerate() {
            cumulative += weight(c) / total;
            if cumulative >= f64::from(top_p) {
                candidates.truncate(i + 1);
                return candidates;
            }
        }
        if head == candidates.len() {
            return candidates;
        }
        head = (head * 4).min(candidates.len());
    }
}

/// One draw over `ids` (ascending), weighted by `weight`.
fn draw_by_id(ids: &[u32], weight: impl Fn(u32) -> f64, rng: &mut SamplerRng) -> u32 {
    let total = sum_by_id(ids, &weight);
    let draw: f64 = rng.rng.gen::<f64>() * total;
    let mut cumulative = 0.0;
    for &i in ids {
        cumulative += weight(i);
        if draw < cumulative {
            return i;
        }
    }
    ids[ids.len() - 1]
}

/// The definition [`sample`] implements, written the plain way: sort the whole
/// vocabulary. Kept as the oracle of the property tests.
pub fn sample_reference(
    logits: &[f32],
    params: &SamplingParams,
    history: &[u32],
    rng: &mut SamplerRng,
) -> Result<u32, InferenceError> {
    let scores = penalised(logits, params, history)?;
    if params.temperature == 0.0 {
        return Ok(argmax(&scores));
    }
    let scaled: Vec<f32> = scores.iter().map(|s| s / params.temperature).collect();
    let mut order: Vec<u32> = (0..scaled.len() as u32).collect();
    order.sort_by(|a, b| {
        scaled[*b as usize]
            .total_cmp(&scaled[*a as usize])
            .then(a.cmp(b))
    });
    if params.top_k > 0 && params.top_k < order.len() {
        order.truncate(params.top_k);
    }
    let max = scaled[order[0] as usize];
    let weight = |i: u32| f64::from(scaled[i as usize] - max).exp();
    if params.top_p < 1.0 {
        let mut by_id = order.clone();
        by_id.sort_unstable();
        let total = sum_by_id(&by_id, weight);
        let mut cumulative = 0.0;
        let mut keep = order.len();
        for (i, &c) in order.iter().enumerate() {
            cumulative += weight(c) / total;
            if cumulative >= f64::from(params.top_p) {
                keep = i + 1;
                break;
            }
        }
        order.truncate(keep);
    }
    order.sort_unstable();
    Ok(draw_by_id(&order, weight, rng))
}

fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, s) in scores.iter().enumerate() {
        if *s > scores[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut rng = SamplerRng::new(0);
        assert_eq!(
            sample(&[0.1, 3.0, 3.0, -1.0], &params(0.0), &[], &mut rng).unwrap(),
            1
        );
    }

    #[test]
    fn a_restored_rng_draws_the_same_sequence() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = params(0.8);
        let mut rng = SamplerRng::new(42);
        let first: Vec<u32> = (0..10)
            .map(|_| sample(&logits, &p, &[], &mut rng).unwrap())
            .collect();
        let state = rng.state();
        let rest: Vec<u32> = (0..10)
            .map(|_| sample(&logits, &p, &[], &mut rng).unwrap())
            .collect();
        let mut restored = SamplerRng::from_state(&state).unwrap();
        let again: Vec<u32> = (0..10)
            .map(|_| sample(&logits, &p, &[], &mut restored).unwrap())
            .collect();
        assert_eq!(rest, again);
        assert_ne!(first, rest, "draws advance");
        assert!(SamplerRng::from_state(&state[..10]).is_err());
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_limits_the_support() {
        let logits = [1.0f32, 5.0, 4.9, -3.0];
        let mut rng = SamplerRng::new(1);
        let k1 = SamplingParams {
            top_k: 1,
            ..params(1.0)
        };
        assert!((0..50).all(|_| sample(&logits, &k1, &[], &mut rng).unwrap() == 1));
        let p_small = SamplingParams {
            top_p: 0.5,
            ..params(1.0)
        };
        assert!((0..50).all(|_| sample(&logits, &p_small, &[], &mut rng).unwrap() == 1));
        let wide = params(1.0);
        let drawn: std::collections::BTreeSet<u32> = (0..200)
            .map(|_| sample(&logits, &wide, &[], &mut rng).unwrap())
            .collect();
        assert!(drawn.contains(&1) && drawn.contains(&2));
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let logits = [2.0f32, 1.9];
        let mut rng = SamplerRng::new(0);
        let p = SamplingParams {
            repetition_penalty: 1.5,
            ..params(0.0)
        };
        assert_eq!(sample(&logits, &p, &[0], &mut rng).unwrap(), 1);
    }

    #[test]
    fn invalid_values_are_rejected_with_the_field_name() {
        for (p, field) in [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..params(0.0)
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..params(0.0)
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..params(0.0)
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..params(0.0)
                },
                "top_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..params(0.0)
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    max_tokens: 0,
                    ..params(0.0)
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    stop: vec![String::new()],
                    ..params(0.0)
                },
                "stop",
            ),
        ] {
            let err = p.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        assert!(params(0.8).validate().is_ok());
    }

    /// The partial-selection sampler and the sorting oracle agree on every draw, ties and
    /// all, over random logits, parameters and seeds.
    #[test]
    fn partial_selection_equals_the_sorting_reference() {
        for case in 0..400u64 {
            let mut gen = rand_chacha::ChaCha8Rng::seed_from_u64(case);
            let vocab = [2usize, 7, 50, 300, 2000][gen.gen_range(0..5)];
            // Few distinct values, so ties are common.
            let levels = gen.gen_range(1..12);
            let logits: Vec<f32> = (0..vocab)
                .map(|_| gen.gen_range(0..levels) as f32 * 0.7 - 3.0)
                .collect();
            let params = SamplingParams {
                temperature: [0.0, 0.3, 0.8, 1.0, 2.5][gen.gen_range(0..5)],
                top_k: [0, 1, 2, 5, 40, 5000][gen.gen_range(0..6)],
                top_p: [1.0, 0.9, 0.5, 0.1, 0.999][gen.gen_range(0..5)],
                repetition_penalty: [1.0, 1.3][gen.gen_range(0..2)],
                seed: case,
                ..SamplingParams::default()
            };
            let history: Vec<u32> = (0..5).map(|_| gen.gen_range(0..vocab as u32)).collect();
            let (mut a, mut b) = (SamplerRng::new(case), SamplerRng::new(case));
            for draw in 0..20 {
                let fast = sample(&logits, &params, &history, &mut a).unwrap();
                let slow = sample_reference(&logits, &params, &history, &mut b).unwrap();
                assert_eq!(fast, slow, "case {case} draw {draw}: {params:?}");
            }
        }
    }
}
