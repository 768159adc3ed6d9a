//! Finding the request whose step crashes or hangs its engine, so it fails alone instead
//! of taking its device down again and again.
//!
//! Before each forward the engine records the step's sequences here (the ledger lives in
//! the device runtime, so it outlives the engine instance). A new engine instance that
//! finds a step still recorded knows that step killed its predecessor (panic or missed
//! heartbeat), and its sequences become suspects. A first crash is retried as usual (most
//! faults are transient). If a step with suspects in it crashes again, the engine bisects:
//! it runs half of the suspects alone (alternating with steps of everyone else); a half
//! that passes is cleared, a half that crashes becomes the new suspects. A request that
//! crashes the engine [`POISON_SOLO_CRASHES`] times in a row on its own is poison: it is
//! failed with a clear error, and everyone else carries on.

use std::collections::{BTreeSet, HashMap};

/// Consecutive crashes of a step holding only one request that make it poison: three,
/// so that two unrelated faults in a row (a crash, then a hang on the retry) never
/// condemn a healthy request.
pub const POISON_SOLO_CRASHES: u32 = 3;

/// What the engine does with the suspects this step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// Nothing to isolate: schedule normally.
    None,
    /// Run exactly these sequences alone.
    Probe(Vec<u64>),
    /// Run everyone but the suspects.
    Exclude(BTreeSet<u64>),
}

/// The crash ledger and isolation state of one device.
#[derive(Debug, Default)]
pub struct Quarantine {
    /// The step running now, recorded before its forward.
    in_flight: Option<Vec<u64>>,
    /// Why the last recorded step died, when its thread could tell.
    last_failure: Option<String>,
    /// Sequences implicated in the last crash.
    suspects: BTreeSet<u64>,
    /// Consecutive crashes involving suspects (2 or more: bisecting).
    strikes: u32,
    /// Whether the last isolation step was a probe (they alternate with the others).
    probed_last: bool,
    /// Consecutive crashes of steps holding only this request.
    solo: HashMap<u64, u32>,
    /// Requests found poisonous, with the reason, until their failure is handled.
    poisoned: HashMap<u64, String>,
}

impl Quarantine {
    /// Records the step about to run.
    pub fn begin_step(&mut self, seqs: &[u64]) {
        self.in_flight = Some(seqs.to_vec());
    }

    /// The recorded step finished: its sequences are cleared of suspicion.
    pub fn step_passed(&mut self) {
        let Some(seqs) = self.in_flight.take() else {
            return;
        };
        for seq in &seqs {
            self.solo.remove(seq);
            self.suspects.remove(seq);
        }
        if self.suspects.is_empty() {
            self.strikes = 0;
        }
    }

    /// The recorded step failed without killing its engine (its forward returned an
    /// error): handled as a crash. Returns the requests that became poison.
    pub fn step_failed(&mut self, device: &str, reason: &str) -> Vec<u64> {
        match self.in_flight.take() {
            Some(seqs) => self.crashed(seqs, device, reason),
            None => Vec::new(),
        }
    }

    /// The dying engine thread says why (a panic's message).
    pub fn note_failure(&mut self, reason: String) {
        self.last_failure = Some(reason);
    }

    /// Called by a new engine instance: a step still recorded killed the previous one.
    /// Returns the requests that became poison.
    pub fn recover(&mut self, device: &str) -> Vec<u64> {
        let Some(crashed) = self.in_flight.take() else {
            return Vec::new();
        };
        let reason = self
            .last_failure
            .take()
            .unwrap_or_else(|| "the step hung (missed heartbeat) or its thread died".into());
        self.crashed(crashed, device, &reason)
    }

    /// A step of `seqs` crashed (panicked, hung, or failed in the forward).
    pub fn crashed(&mut self, seqs: Vec<u64>, device: &str, reason: &str) -> Vec<u64> {
        let mut poisoned = Vec::new();
        if let [only] = seqs[..] {
            let count = self.solo.entry(only).or_insert(0);
            *count += 1;
            if *count >= POISON_SOLO_CRASHES {
                self.solo.remove(&only);
                self.suspects.remove(&only);
                self.poisoned.insert(
                    only,
                    format!(
                        "request {only} crashed the engine of {device} {POISON_SOLO_CRASHES} \
                         times in a row when run alone, and was failed so the others could \
                         continue; last failure: {reason}"
                    ),
                );
                poisoned.push(only);
                if self.suspects.is_empty() {
                    self.strikes = 0;
                }
                return poisoned;
            }
        } else {
            // A crash of a bigger step resets the solo counts of requests not in it.
            self.solo.retain(|seq, _| seqs.contains(seq));
        }
        let crashed: BTreeSet<u64> = seqs.into_iter().collect();
        let both: BTreeSet<u64> = self.suspects.intersection(&crashed).copied().collect();
        if self.suspects.is_empty() || both.is_empty() {
            self.suspects = crashed;
            self.strikes = 1;
        } else {
            self.suspects = both;
            self.strikes += 1;
        }
        poisoned
    }

    /// How to schedule the next step, given which sequences could run now.
    pub fn plan(&mut self, runnable: impl Fn(u64) -> bool) -> Isolation {
        if self.strikes < 2 || self.suspects.is_empty() {
            return Isolation::None;
        }
        let ready: Vec<u64> = self
            .suspects
            .iter()
            .copied()
            .filter(|&s| runnable(s))
            .collect();
        if ready.is_empty() || self.probed_last {
            self.probed_last = false;
            return Isolation::Exclude(self.suspects.clone());
        }
        self.probed_last = true;
        let half = ready.len().div_ceil(2);
        Isolation::Probe(ready[..half].to_vec())
    }

    /// Whether `seq` was found poisonous; takes the reason (its failure is now handled).
    pub fn take_poisoned(&mut self, seq: u64) -> Option<String> {
        self.poisoned.remove(&seq)
    }

    /// The request ended or left this device: forget it.
    pub fn forget(&mut self, seq: u64) {
        self.suspects.remove(&seq);
        self.solo.remove(&seq);
        if self.suspects.is_empty() {
            self.strikes = 0;
        }
    }

    /// Sequences under suspicion now.
    pub fn suspects(&self) -> Vec<u64> {
        self.suspects.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates an engine that crashes whenever `poison` is in the step.
    fn run_until_found(batch: Vec<u64>, poison: u64) -> (Vec<u64>, usize) {
        let mut q = Quarantine::default();
        let mut live: BTreeSet<u64> = batch.iter().copied().collect();
        let mut crashes = 0;
        for _ in 0..200 {
            let step: Vec<u64> = match q.plan(|s| live.contains(&s)) {
                Isolation::None => live.iter().copied().collect(),
                Isolation::Probe(p) => p,
                Isolation::Exclude(ex) => {
                    live.iter().copied().filter(|s| !ex.contains(s)).collect()
                }
            };
            if step.is_empty() {
                continue;
            }
            q.begin_step(&step);
            if step.contains(&poison) {
                crashes += 1;
                let found = q.recover("cpu:0");
                if !found.is_empty() {
                    for f in &found {
                        live.remove(f);
                        assert!(q.take_poisoned(*f).unwrap().contains("crashed the engine"));
                    }
                    return (found, crashes);
                }
            } else {
                q.step_passed();
            }
        }
        (Vec::new(), crashes)
    }

    #[test]
    fn bisection_finds_the_poison_request_alone() {
        for n in [1u64, 2, 3, 16, 64] {
            for poison in [1, n / 2 + 1, n] {
                let (found, crashes) = run_until_found((1..=n).collect(), poison);
                assert_eq!(found, vec![poison], "batch of {n}");
                // First crash, retry, one per halving, then the further solo crashes.
                let bound = 2 + (n as f64).log2().ceil() as usize + 2;
                assert!(crashes <= bound, "{crashes} crashes for a batch of {n}");
            }
        }
    }

    #[test]
    fn a_transient_crash_is_retried_and_forgotten() {
        let mut q = Quarantine::default();
        q.begin_step(&[1, 2, 3]);
        assert!(q.recover("cpu:0").is_empty());
        assert_eq!(
            q.plan(|_| true),
            Isolation::None,
            "first strike: plain retry"
        );
        q.begin_step(&[1, 2, 3]);
        q.step_passed();
        assert!(q.suspects().is_empty());
        // A lone request that crashes once, then passes, is not poison.
        q.begin_step(&[7]);
        assert!(q.recover("cpu:0").is_empty());
        q.begin_step(&[7]);
        q.step_passed();
        q.begin_step(&[7]);
        assert!(
            q.recover("cpu:0").is_empty(),
            "solo count was reset by the pass"
        );
    }

    #[test]
    fn probes_alternate_with_steps_of_everyone_else() {
        let mut q = Quarantine::default();
        q.crashed(vec![1, 2, 3, 4], "cpu:0", "x");
        q.crashed(vec![1, 2, 3, 4], "cpu:0", "x");
        assert_eq!(q.plan(|_| true), Isolation::Probe(vec![1, 2]));
        assert!(matches!(q.plan(|_| true), Isolation::Exclude(_)));
        assert_eq!(q.plan(|_| true), Isolation::Probe(vec![1, 2]));
        // Suspects not attached yet: the others run.
        assert!(matches!(q.plan(|_| false), Isolation::Exclude(_)));
    }
}
