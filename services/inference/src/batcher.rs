//! The scheduling decision of one engine step, in one readable place (the shape of vLLM
//! v1's scheduler): which waiting sequences to admit, which running ones to preempt when
//! KV memory runs out, and how many tokens each running sequence feeds this step.
//!
//! Rules:
//! - Every decoding sequence (one token pending) runs every step; decodes come first.
//! - Prefill (a prompt, or KV being recomputed after a fault or a preemption) is chunked:
//!   while anything decodes, a step's prefill tokens are limited so the step takes at most
//!   `prefill_stall` times a decode-only step, or a floor time that nobody notices, from
//!   the measured cost model ([`CostModel::prefill_allowance`]), so a long prompt never
//!   stalls running streams; the bound stretches with the share of requests still
//!   waiting for their first token ([`fair_stall`]); with nothing decoding a step takes up
//!   to `max_tokens`. Older sequences (lower id) prefill first.
//! - KV: a step's blocks are found before it runs. When decodes need more blocks than are
//!   free, the newest running sequences are preempted (their KV dropped; sealed blocks
//!   stay restorable) until the rest fit; they come back, oldest first, once the blocks
//!   for their whole current length fit above a watermark.
//! - Nothing here runs unbounded work: at most `max_tokens` rows and `max_seqs`
//!   sequences per step.

use std::collections::BTreeSet;

use crate::quarantine::Isolation;

/// Limits of one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepBudget {
    /// Token rows per step (decodes plus prefill chunks).
    pub max_tokens: usize,
    /// Sequences per step.
    pub max_seqs: usize,
    /// While sequences decode, a step with prefill may take this many times a decode-only
    /// step.
    pub prefill_stall: f64,
}

/// The stall bound of a step with `decodes` decoding and `waiting` prefilling (or not yet
/// admitted) sequences: the stall `stall − 1` a decoding stream accepts, scaled by
/// `(decodes + waiting) / decodes` — each waiting request is a user too, waiting for a
/// first token, so a crowd of new prompts gets steps in proportion, while one long prompt
/// among many streams barely moves the bound.
pub fn fair_stall(stall: f64, decodes: usize, waiting: usize) -> f64 {
    if decodes == 0 {
        return stall;
    }
    1.0 + (stall - 1.0) * (decodes + waiting) as f64 / decodes as f64
}

/// The smallest prefill chunk while others decode: below it a step's fixed cost dominates.
pub const MIN_PREFILL_CHUNK: usize = 8;

/// What the batcher knows of one attached sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Request id (also the age order: lower is older).
    pub id: u64,
    /// Positions whose KV is held.
    pub computed: usize,
    /// Tokens of the sequence (prompt and generated); `len - computed` are pending.
    pub len: usize,
    /// KV blocks held.
    pub held_blocks: usize,
}

/// One step's decision over the running sequences.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Running sequences to preempt (newest first), before anything runs.
    pub preempt: Vec<u64>,
    /// Sequences to run and how many pending tokens each feeds, decodes first.
    pub run: Vec<(u64, usize)>,
}

fn blocks(positions: usize, block_tokens: usize) -> usize {
    positions.div_ceil(block_tokens)
}

/// Blocks kept free when admitting: room for running sequences to grow a little before
/// anyone is preempted.
pub fn watermark(total_blocks: usize) -> usize {
    (total_blocks / 100).max(1)
}

/// Which waiting sequences (oldest first in `waiting`) to admit now, given `free` blocks:
/// each needs the blocks of its whole current length plus one position, above the
/// watermark (none when nothing runs, so the oldest can always start). Stops at the first
/// that does not fit: admission is first come, first served.
pub fn admit(
    waiting: &[Candidate],
    running: usize,
    free: usize,
    total: usize,
    block_tokens: usize,
    max_seqs: usize,
) -> Vec<u64> {
    let mut free = free;
    let mut admitted = Vec::new();
    for (running, c) in (running..).zip(waiting) {
        if running >= max_seqs {
            break;
        }
        let need = blocks(c.len + 1, block_tokens).saturating_sub(c.held_blocks);
        let reserve = if running == 0 { 0 } else { watermark(total) };
        if need + reserve > free {
            break;
        }
        free -= need;
        admitted.push(c.id);
    }
    admitted
}

/// The step over `running` (any order) with `free` blocks. `prefill_allowance` is how
/// many prefill tokens the step may take while sequences decode (see [`CostModel`]).
pub fn plan(
    running: &[Candidate],
    free: usize,
    block_tokens: usize,
    budget: StepBudget,
    prefill_allowance: usize,
    isolation: &Isolation,
) -> Plan {
    let allowed = |id: u64| match isolation {
        Isolation::None => true,
        Isolation::Probe(only) => only.contains(&id),
        Isolation::Exclude(out) => !out.contains(&id),
    };
    let mut by_age: Vec<Candidate> = running.to_vec();
    by_age.sort_by_key(|c| c.id);
    let mut preempted: BTreeSet<u64> = BTreeSet::new();
    let mut free = free;
    let grow = |c: &Candidate, n: usize| {
        blocks(c.computed + n, block_tokens).saturating_sub(c.held_blocks)
    };

    // Decodes first: all of them (oldest first, within the limits) must fit.
    let mut decodes: Vec<Candidate> = by_age
        .iter()
        .filter(|c| c.len - c.computed == 1 && allowed(c.id))
        .copied()
        .take(budget.max_seqs.min(budget.max_tokens))
        .collect();
    let mut need: usize = decodes.iter().map(|c| grow(c, 1)).sum();
    while need > free {
        // Preempt the newest running sequence (decoding or not) not yet preempted.
        let Some(victim) = by_age
            .iter()
            .rev()
            .find(|c| !preempted.contains(&c.id))
            .copied()
        else {
            break;
        };
        preempted.insert(victim.id);
        free += victim.held_blocks;
        if let Some(at) = decodes.iter().position(|d| d.id == victim.id) {
            need -= grow(&decodes[at], 1);
            decodes.remove(at);
        }
    }
    free -= need.min(free);
    let mut run: Vec<(u64, usize)> = decodes.iter().map(|c| (c.id, 1)).collect();

    // Then prefill chunks, oldest first, within the token allowance and the free blocks.
    let mut tokens_left = budget.max_tokens.saturating_sub(run.len());
    let mut prefill_left = if run.is_empty() {
        tokens_left
    } else {
        prefill_allowance.min(tokens_left)
    };
    for c in by_age
        .iter()
        .filter(|c| c.len - c.computed > 1 && allowed(c.id) && !preempted.contains(&c.id))
    {
        if run.len() >= budget.max_seqs || prefill_left == 0 {
            break;
        }
        let mut n = (c.len - c.computed).min(prefill_left);
        // As many positions as the free blocks (and those it holds) can take.
        let room = (c.held_blocks + free) * block_tokens;
        n = n.min(room.saturating_sub(c.computed));
        if n == 0 {
            continue;
        }
        free -= grow(c, n);
        prefill_left -= n;
        tokens_left -= n;
        run.push((c.id, n));
    }
    let _ = tokens_left;
    Plan {
        preempt: preempted.into_iter().rev().collect(),
        run,
    }
}

/// The measured cost of a step as a function of its token rows: an exponentially
/// weighted average of the observed step times in bins of rows by powers of two,
/// interpolated linearly between bins. It learns from what actually ran (no fitted
/// line that could drift when every step has the same size), follows changes of context
/// length and machine load, and beyond what it has seen it extrapolates conservatively.
#[derive(Clone, Debug, Default)]
pub struct CostModel {
    bins: [Bin; BINS],
}

/// Steps of up to 2^BINS rows are told apart.
const BINS: usize = 16;
/// Weight of a new observation in its bin.
const RECENT: f64 = 0.25;

#[derive(Clone, Copy, Debug, Default)]
struct Bin {
    rows: f64,
    secs: f64,
    seen: bool,
}

impl CostModel {
    /// Records that a step of `rows` token rows took `seconds`.
    pub fn observe(&mut self, rows: usize, seconds: f64) {
        if rows == 0 || !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let bin = &mut self.bins[rows.ilog2().min(BINS as u32 - 1) as usize];
        if bin.seen {
            bin.rows += RECENT * (rows as f64 - bin.rows);
            bin.secs += RECENT * (seconds - bin.secs);
        } else {
            *bin = Bin {
                rows: rows as f64,
                secs: seconds,
                seen: true,
            };
        }
    }

    /// The expected seconds of a step of `rows` rows, once anything was measured.
    pub fn predict(&self, rows: usize) -> Option<f64> {
        let points: Vec<(f64, f64)> = self
            .bins
            .iter()
            .filter(|b| b.seen)
            .map(|b| (b.rows, b.secs))
            .collect();
        let x = rows as f64;
        let (first, last) = (*points.first()?, *points.last()?);
        if x <= first.0 {
            // Below what was seen: along the first segment (steps have a fixed cost), and
            // never below proportion.
            let proportional = first.1 * x / first.0;
            let along = points.get(1).map_or(proportional, |&(x1, y1)| {
                first.1 - (y1 - first.1) / (x1 - first.0).max(1e-9) * (first.0 - x)
            });
            return Some(proportional.max(along));
        }
        for pair in points.windows(2) {
            let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
            if x <= x1 {
                return Some(y0 + (y1 - y0) * (x - x0) / (x1 - x0).max(1e-9));
            }
        }
        // Beyond: at least in proportion to the largest step seen (assumes no fixed cost,
        // so it overestimates), and along the last slope if that is steeper.
        let proportional = last.1 * x / last.0;
        let along = points
            .len()
            .checked_sub(2)
            .map(|i| {
                let (x0, y0) = points[i];
                last.1 + (last.1 - y0) / (last.0 - x0).max(1e-9) * (x - last.0)
            })
            .unwrap_or(proportional);
        Some(proportional.max(along))
    }

    /// Prefill tokens a step with `decodes` decoding sequences may add: the most that keep
    /// it within `stall` times the decode-only step, or within `floor` seconds if that
    /// allows more (a few decoding streams must not throttle a burst of new prompts to a
    /// trickle: a gap of `floor` goes unnoticed); at least [`MIN_PREFILL_CHUNK`] (also
    /// before anything was measured), at most `limit`.
    pub fn prefill_allowance(&self, decodes: usize, stall: f64, floor: f64, limit: usize) -> usize {
        let Some(decode_only) = self.predict(decodes.max(1)) else {
            return MIN_PREFILL_CHUNK.min(limit);
        };
        let target = (stall * decode_only).max(floor);
        let fits = |p: usize| self.predict(decodes + p).is_some_and(|t| t <= target);
        // The cost grows with rows: the largest fitting p by bisection.
        let (mut lo, mut hi) = (0usize, limit);
        if fits(hi) {
            return limit;
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo.max(MIN_PREFILL_CHUNK).min(limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: StepBudget = StepBudget {
        max_tokens: 64,
        max_seqs: 8,
        prefill_stall: 2.0,
    };

    fn c(id: u64, computed: usize, len: usize, held: usize) -> Candidate {
        Candidate {
            id,
            computed,
            len,
            held_blocks: held,
        }
    }

    #[test]
    fn decodes_run_first_and_prefill_is_chunked_oldest_first() {
        let running = [
            c(3, 0, 100, 0),
            c(1, 10, 11, 1),
            c(2, 0, 40, 0),
            c(4, 5, 6, 1),
        ];
        let p = plan(&running, 100, 16, BUDGET, 20, &Isolation::None);
        assert!(p.preempt.is_empty());
        assert_eq!(p.run, vec![(1, 1), (4, 1), (2, 20)]);
        // Nothing decoding: the whole budget goes to prefill.
        let p = plan(
            &[c(2, 0, 40, 0), c(3, 0, 100, 0)],
            100,
            16,
            BUDGET,
            20,
            &Isolation::None,
        );
        assert_eq!(p.run, vec![(2, 40), (3, 24)]);
    }

    #[test]
    fn the_newest_are_preempted_when_decodes_do_not_fit() {
        // Three decodes each about to need a new block; one block free.
        let running = [c(1, 16, 17, 1), c(2, 16, 17, 1), c(3, 16, 17, 1)];
        let p = plan(&running, 1, 16, BUDGET, 20, &Isolation::None);
        assert_eq!(p.preempt, vec![3]);
        assert_eq!(p.run, vec![(1, 1), (2, 1)]);
        // A prefilling newcomer is preempted before any decode.
        let running = [c(1, 16, 17, 1), c(2, 16, 17, 1), c(9, 32, 40, 2)];
        let p = plan(&running, 0, 16, BUDGET, 20, &Isolation::None);
        assert_eq!(p.preempt, vec![9]);
        assert_eq!(p.run, vec![(1, 1), (2, 1)]);
    }

    #[test]
    fn prefill_takes_only_what_the_free_blocks_hold() {
        let p = plan(&[c(1, 0, 100, 0)], 2, 16, BUDGET, 20, &Isolation::None);
        assert_eq!(p.run, vec![(1, 32)]);
        let p = plan(&[c(1, 0, 100, 0)], 0, 16, BUDGET, 20, &Isolation::None);
        assert!(p.run.is_empty());
    }

    #[test]
    fn admission_is_fifo_above_the_watermark() {
        let waiting = [c(5, 0, 40, 0), c(6, 0, 10, 0)];
        // 3 blocks for id 5 (41 positions); total 1000 → watermark 10.
        assert_eq!(admit(&waiting, 1, 13, 1000, 16, 8), vec![5]);
        assert_eq!(admit(&waiting, 1, 12, 1000, 16, 8), Vec::<u64>::new());
        // Nothing running: no watermark, the oldest starts.
        assert_eq!(admit(&waiting, 0, 3, 1000, 16, 8), vec![5]);
    }

    #[test]
    fn isolation_restricts_the_step() {
        let running = [c(1, 10, 11, 1), c(2, 10, 11, 1), c(3, 10, 11, 1)];
        let p = plan(&running, 10, 16, BUDGET, 20, &Isolation::Probe(vec![2]));
        assert_eq!(p.run, vec![(2, 1)]);
        let p = plan(
            &running,
            10,
            16,
            BUDGET,
            20,
            &Isolation::Exclude([2].into()),
        );
        assert_eq!(p.run, vec![(1, 1), (3, 1)]);
    }

    #[test]
    fn the_cost_model_learns_step_times_and_sizes_chunks() {
        let mut m = CostModel::default();
        assert_eq!(m.prefill_allowance(16, 2.0, 0.0, 512), MIN_PREFILL_CHUNK);
        // Decode-only steps alone: beyond them it extrapolates in proportion (cautious).
        for _ in 0..20 {
            m.observe(16, 0.015 + 0.003 * 16.0);
        }
        let p = m.prefill_allowance(16, 2.0, 0.0, 512);
        assert!((15..=16).contains(&p), "{p}");
        // Steps of every size: the fixed cost shows, and chunks grow to what fits.
        for i in 0..200 {
            let rows = [16, 24, 40, 70, 130, 260, 512][i % 7];
            m.observe(rows, 0.015 + 0.003 * rows as f64);
        }
        let t = m.predict(100).unwrap();
        assert!((t - 0.315).abs() < 0.01, "{t}");
        // (2 − 1)·(0.015/0.003 + 16) = 21 rows.
        let p = m.prefill_allowance(16, 2.0, 0.0, 512);
        assert!((20..=21).contains(&p), "{p}");
        // With 2 decoding the ratio allows 7; a 60 ms floor allows (0.045/0.003) − 2 = 13.
        let p = m.prefill_allowance(2, 2.0, 0.060, 512);
        assert!((12..=13).contains(&p), "{p}");
        assert_eq!(m.prefill_allowance(2, 100.0, 0.0, 512), 512);
    }

    #[test]
    fn the_stall_bound_stretches_for_a_crowd_of_waiting_requests() {
        assert_eq!(fair_stall(2.0, 16, 0), 2.0);
        assert_eq!(fair_stall(2.0, 16, 1), 2.0625);
        assert_eq!(fair_stall(2.0, 4, 4), 3.0);
        assert_eq!(fair_stall(2.0, 4, 12), 5.0);
        assert_eq!(fair_stall(2.0, 0, 12), 2.0);
    }

    #[test]
    fn the_cost_model_follows_a_slower_machine() {
        let mut m = CostModel::default();
        for i in 0..100 {
            let rows = [16, 40][i % 2];
            m.observe(rows, 0.01 * rows as f64);
        }
        let fast = m.predict(40).unwrap();
        for i in 0..40 {
            let rows = [16, 40][i % 2];
            m.observe(rows, 0.03 * rows as f64);
        }
        assert!(m.predict(40).unwrap() > 2.5 * fast);
    }
}
