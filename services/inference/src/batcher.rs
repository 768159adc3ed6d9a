//! The scheduling decision of one engine step, in one readable place (the shape of vLLM
//! v1's scheduler): which waiting sequences to admit, which running ones to preempt when
//! KV memory runs out, and how many tokens each running sequence feeds this step.
//!
//! Rules:
//! - Every decoding sequence (one token pending) runs every step; decodes come first.
//! - Prefill (a prompt, or KV being recomputed after a fault or a preemption) is chunked:
//!   while anything decodes, a step's prefill tokens are limited so the step takes at most
//!   `prefill_stall` times a decode-only step (from the measured cost model), so a long
//!   prompt never stalls running streams; with nothing decoding a step takes up to
//!   `max_tokens`. Older sequences (lower id) prefill first.
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
    let mut running = running;
    let mut admitted = Vec::new();
    for c in waiting {
        if running >= max_seqs {
            break;
        }
        let need = blocks(c.len + 1, block_tokens).saturating_sub(c.held_blocks);
        let reserve = if running == 0 { 0 } else { watermark(total) };
        if need + reserve > free {
            break;
        }
        free -= need;
        running += 1;
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

/// The cost of a step as a function of its token rows, `seconds ≈ fixed + per_row ×
/// rows`, fitted online by recursive least squares with forgetting (recent steps weigh
/// most: the cost changes with context length and with what else runs on the machine).
#[derive(Clone, Debug)]
pub struct CostModel {
    theta: [f64; 2],
    p: [[f64; 2]; 2],
    observations: u64,
}

impl Default for CostModel {
    fn default() -> Self {
        Self {
            theta: [0.0, 0.0],
            p: [[1e4, 0.0], [0.0, 1e4]],
            observations: 0,
        }
    }
}

/// Weight of the past per observation.
const FORGETTING: f64 = 0.97;

impl CostModel {
    /// Records that a step of `rows` token rows took `seconds`.
    pub fn observe(&mut self, rows: usize, seconds: f64) {
        let x = [1.0, rows as f64];
        let px = [
            self.p[0][0] * x[0] + self.p[0][1] * x[1],
            self.p[1][0] * x[0] + self.p[1][1] * x[1],
        ];
        let denom = FORGETTING + x[0] * px[0] + x[1] * px[1];
        let gain = [px[0] / denom, px[1] / denom];
        let error = seconds - (self.theta[0] * x[0] + self.theta[1] * x[1]);
        self.theta[0] += gain[0] * error;
        self.theta[1] += gain[1] * error;
        let mut p = [[0.0; 2]; 2];
        for (i, row) in p.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (self.p[i][j] - gain[i] * px[j]) / FORGETTING;
            }
        }
        self.p = p;
        self.observations += 1;
    }

    /// `(fixed, per_row)` seconds, once the fit is usable.
    pub fn estimate(&self) -> Option<(f64, f64)> {
        let [fixed, per_row] = self.theta;
        (self.observations >= 4 && per_row > 0.0 && fixed.is_finite() && per_row.is_finite())
            .then_some((fixed.max(0.0), per_row))
    }

    /// Prefill tokens a step with `decodes` decoding sequences may add so that it takes
    /// at most `stall` times the decode-only step: `(stall − 1)·(fixed/per_row + decodes)`,
    /// at least [`MIN_PREFILL_CHUNK`] (also before the fit is usable).
    pub fn prefill_allowance(&self, decodes: usize, stall: f64) -> usize {
        let Some((fixed, per_row)) = self.estimate() else {
            return MIN_PREFILL_CHUNK;
        };
        let rows = (stall - 1.0).max(0.0) * (fixed / per_row + decodes as f64);
        ((rows + 1e-6).floor() as usize).max(MIN_PREFILL_CHUNK)
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
    fn the_cost_model_fits_a_line_and_sizes_chunks() {
        let mut m = CostModel::default();
        assert_eq!(m.prefill_allowance(16, 2.0), MIN_PREFILL_CHUNK);
        for i in 0..50 {
            let rows = 16 + (i % 5) * 8;
            m.observe(rows, 0.015 + 0.003 * rows as f64);
        }
        let (fixed, per_row) = m.estimate().unwrap();
        assert!((fixed - 0.015).abs() < 1e-3, "{fixed}");
        assert!((per_row - 0.003).abs() < 1e-4, "{per_row}");
        // (2 − 1)·(0.015/0.003 + 16) = 21 rows (20 when the fit is a hair off).
        assert!((20..=21).contains(&m.prefill_allowance(16, 2.0)));
        assert!((41..=42).contains(&m.prefill_allowance(16, 3.0)));
    }
}
