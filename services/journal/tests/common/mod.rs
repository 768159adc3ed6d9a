//! Test helpers shared by the journal's test binaries: valid random record sequences
//! and an independent model of the state they describe.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use llmos_journal::{Journal, JournalOptions, Record, RequestLog};
use proptest::collection::vec;
use proptest::prelude::*;

/// An intention; [`records_from`] turns a list of them into records that keep the
/// sequence rules (an op that would break them is skipped).
#[derive(Clone, Debug)]
pub enum Op {
    Begin(u64, Vec<u32>, Vec<u8>),
    Token(u64, u32, Vec<u8>),
    End(u64, u8),
    Delivered(u64, u32),
}

pub fn op(requests: u64, max_vec: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..requests, vec(any::<u32>(), 0..max_vec), vec(any::<u8>(), 0..max_vec))
            .prop_map(|(r, p, b)| Op::Begin(r, p, b)),
        6 => (0..requests, any::<u32>(), vec(any::<u8>(), 0..max_vec))
            .prop_map(|(r, t, s)| Op::Token(r, t, s)),
        1 => (0..requests, any::<u8>()).prop_map(|(r, c)| Op::End(r, c)),
        1 => (0..requests, any::<u32>()).prop_map(|(r, c)| Op::Delivered(r, c)),
    ]
}

pub fn records_from(ops: &[Op]) -> Vec<Record> {
    let mut model: BTreeMap<u64, RequestLog> = BTreeMap::new();
    let mut out = Vec::new();
    for op in ops {
        // Every op is productive: one on a request not yet begun begins it.
        let (request, prompt) = match op {
            Op::Begin(..) => (u64::MAX, vec![]),
            Op::Token(r, t, _) => (*r, vec![*t]),
            Op::End(r, c) => (*r, vec![u32::from(*c)]),
            Op::Delivered(r, c) => (*r, vec![*c, 0]),
        };
        if request != u64::MAX && !model.contains_key(&request) {
            let begin = Record::Begin {
                request,
                prompt_tokens: prompt,
                params: vec![request as u8],
            };
            apply(&mut model, &begin);
            out.push(begin);
            continue;
        }
        let record = match op.clone() {
            Op::Begin(request, prompt_tokens, params) if !model.contains_key(&request) => {
                Record::Begin {
                    request,
                    prompt_tokens,
                    params,
                }
            }
            Op::Token(request, token, sampler_state) => match model.get(&request) {
                Some(log) if log.finished.is_none() => Record::Token {
                    request,
                    index: log.tokens.len() as u32,
                    token,
                    sampler_state,
                },
                _ => continue,
            },
            Op::End(request, reason) => match model.get(&request) {
                Some(log) if log.finished.is_none() => Record::End { request, reason },
                _ => continue,
            },
            Op::Delivered(request, x) => match model.get(&request) {
                Some(log) if (log.tokens.len() as u32) > log.delivered => {
                    let room = log.tokens.len() as u32 - log.delivered;
                    Record::Delivered {
                        request,
                        cursor: log.delivered + 1 + x % room,
                    }
                }
                _ => continue,
            },
            _ => continue,
        };
        apply(&mut model, &record);
        out.push(record);
    }
    out
}

/// What a valid sequence of records describes, computed without the crate's rules.
pub fn model(records: &[Record]) -> BTreeMap<u64, RequestLog> {
    let mut m = BTreeMap::new();
    for r in records {
        apply(&mut m, r);
    }
    m
}

fn apply(m: &mut BTreeMap<u64, RequestLog>, record: &Record) {
    match record.clone() {
        Record::Begin {
            request,
            prompt_tokens,
            params,
        } => {
            m.insert(
                request,
                RequestLog {
                    prompt_tokens,
                    params,
                    ..RequestLog::default()
                },
            );
        }
        Record::Token {
            request,
            token,
            sampler_state,
            ..
        } => {
            let log = m.get_mut(&request).unwrap();
            log.tokens.push(token);
            log.last_sampler_state = sampler_state;
        }
        Record::End { request, reason } => m.get_mut(&request).unwrap().finished = Some(reason),
        Record::Delivered { request, cursor } => m.get_mut(&request).unwrap().delivered = cursor,
    }
}

/// Writes `records` to a fresh journal in `dir` one append each; returns the log's bytes
/// and the offset where each record ends.
pub fn write_log(dir: &Path, records: &[Record]) -> (Vec<u8>, Vec<u64>) {
    let (mut journal, _) = Journal::open(dir, JournalOptions::default()).unwrap();
    let mut ends = Vec::with_capacity(records.len());
    for r in records {
        journal.append(r).unwrap();
        ends.push(journal.len_bytes());
    }
    let path = journal.path().to_path_buf();
    drop(journal);
    (std::fs::read(path).unwrap(), ends)
}

pub fn unfinished(m: &BTreeMap<u64, RequestLog>) -> BTreeMap<u64, RequestLog> {
    m.iter()
        .filter(|(_, l)| l.finished.is_none())
        .map(|(k, v)| (*k, v.clone()))
        .collect()
}
