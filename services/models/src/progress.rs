//! Progress of a model load, reported after each weight tensor is read (see
//! [`crate::load_with_progress`]).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

/// How far a load has come. Counts only grow between reports; the last report of a
/// successful load has `tensors_done == tensors_total` and `bytes_done == bytes_total`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadProgress {
    /// Weight tensors read so far.
    pub tensors_done: usize,
    /// Weight tensors the model has.
    pub tensors_total: usize,
    /// Stored bytes of the tensors read so far (as in the file: quantized sizes for GGUF).
    pub bytes_done: u64,
    /// Stored bytes of all the model's tensors.
    pub bytes_total: u64,
}

impl LoadProgress {
    /// Done share in `[0, 1]`, by bytes (by tensors when the sizes are unknown).
    pub fn fraction(&self) -> f64 {
        if self.bytes_total > 0 {
            (self.bytes_done as f64 / self.bytes_total as f64).min(1.0)
        } else if self.tensors_total > 0 {
            (self.tensors_done as f64 / self.tensors_total as f64).min(1.0)
        } else {
            1.0
        }
    }

    /// Whether every tensor has been read.
    pub fn is_complete(&self) -> bool {
        self.tensors_done >= self.tensors_total && self.bytes_done >= self.bytes_total
    }
}

/// Counts the tensors a loader reads, each once, and reports after each one.
pub(crate) struct Tracker<'a> {
    report: &'a dyn Fn(LoadProgress),
    /// Stored size of every tensor the load will read.
    sizes: HashMap<String, u64>,
    state: RefCell<(HashSet<String>, LoadProgress)>,
}

impl<'a> Tracker<'a> {
    /// A tracker over the tensors `expected` (name, stored bytes); reports the start (0).
    pub(crate) fn new(report: &'a dyn Fn(LoadProgress), expected: Vec<(String, u64)>) -> Self {
        let sizes: HashMap<String, u64> = expected.into_iter().collect();
        let start = LoadProgress {
            tensors_done: 0,
            tensors_total: sizes.len(),
            bytes_done: 0,
            bytes_total: sizes.values().fold(0u64, |a, &b| a.saturating_add(b)),
        };
        report(start);
        Tracker {
            report,
            sizes,
            state: RefCell::new((HashSet::new(), start)),
        }
    }

    /// Tensor `name` has been read: counted (the first time only) and reported.
    pub(crate) fn done(&self, name: &str) {
        let Some(&size) = self.sizes.get(name) else {
            return;
        };
        let now = {
            let mut state = self.state.borrow_mut();
            let (seen, p) = &mut *state;
            if !seen.insert(name.to_string()) {
                return;
            }
            p.tensors_done += 1;
            p.bytes_done = p.bytes_done.saturating_add(size);
            *p
        };
        (self.report)(now);
    }

    /// The load has succeeded: makes sure the last report is complete.
    pub(crate) fn finish(&self) {
        let now = {
            let mut state = self.state.borrow_mut();
            let p = &mut state.1;
            if p.is_complete() {
                return;
            }
            p.tensors_done = p.tensors_total;
            p.bytes_done = p.bytes_total;
            *p
        };
        (self.report)(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_tensor_once_and_finishes_complete() {
        let seen = RefCell::new(Vec::new());
        let report = |p: LoadProgress| seen.borrow_mut().push(p);
        let t = Tracker::new(&report, vec![("a".into(), 10), ("b".into(), 30)]);
        t.done("a");
        t.done("a");
        t.done("unknown");
        t.finish();
        let seen = seen.into_inner();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0].fraction(), 0.0);
        assert_eq!((seen[1].tensors_done, seen[1].bytes_done), (1, 10));
        assert!(seen[2].is_complete());
        assert_eq!(seen[2].fraction(), 1.0);
    }
}
