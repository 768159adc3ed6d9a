//! Property tests of the journal's format and recovery: round trips, truncation at every
//! offset, single bit flips anywhere, and compaction.

mod common;

use std::fs;

use common::{model, op, records_from, unfinished, write_log};
use llmos_journal::{
    read_log, Journal, JournalError, JournalOptions, Record, FILE_HEADER_LEN, LOG_FILE_NAME,
};
use proptest::collection::vec;
use proptest::prelude::*;

fn record() -> impl Strategy<Value = Record> {
    prop_oneof![
        (
            any::<u64>(),
            vec(any::<u32>(), 0..64),
            vec(any::<u8>(), 0..64)
        )
            .prop_map(|(request, prompt_tokens, params)| Record::Begin {
                request,
                prompt_tokens,
                params
            }),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            vec(any::<u8>(), 0..64)
        )
            .prop_map(|(request, index, token, sampler_state)| Record::Token {
                request,
                index,
                token,
                sampler_state
            }),
        (any::<u64>(), any::<u8>()).prop_map(|(request, reason)| Record::End { request, reason }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(request, cursor)| Record::Delivered { request, cursor }),
    ]
}

/// A probe appended after recovery: a request id the generators never use.
fn probe() -> Record {
    Record::Begin {
        request: 1 << 40,
        prompt_tokens: vec![5, 6],
        params: b"probe".to_vec(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn records_round_trip_and_every_strict_prefix_is_rejected(r in record()) {
        let bytes = r.encode().unwrap();
        prop_assert_eq!(bytes.len(), r.encoded_len());
        prop_assert_eq!(Record::decode(&bytes), Ok((r.clone(), bytes.len())));
        for cut in 0..bytes.len() {
            prop_assert!(Record::decode(&bytes[..cut]).is_err());
        }
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0xAB; 7]);
        prop_assert_eq!(Record::decode(&longer), Ok((r, bytes.len())));
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in vec(any::<u8>(), 0..128)) {
        let _ = Record::decode(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Cut the log at every byte offset: recovery keeps exactly the records that end at
    /// or before the cut, truncates the rest, and the next append lands and is recovered.
    #[test]
    fn truncation_at_every_offset_recovers_exactly_the_complete_records(
        ops in vec(op(3, 4), 1..24)
    ) {
        let records = records_from(&ops);
        let src = tempfile::tempdir().unwrap();
        let (bytes, ends) = write_log(src.path(), &records);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE_NAME);
        for cut in 0..=bytes.len() {
            fs::write(&path, &bytes[..cut]).unwrap();
            let k = ends.iter().take_while(|&&e| e <= cut as u64).count();
            let valid = if cut < FILE_HEADER_LEN { 0 } else if k == 0 { FILE_HEADER_LEN as u64 } else { ends[k - 1] };
            let (mut journal, recovered) = Journal::open(dir.path(), JournalOptions::default()).unwrap();
            prop_assert_eq!(recovered.records, k as u64, "cut at {}", cut);
            prop_assert_eq!(recovered.truncated_bytes, cut as u64 - valid, "cut at {}", cut);
            prop_assert_eq!(recovered.damage.is_some(), cut as u64 > valid, "cut at {}", cut);
            let expected = model(&records[..k]);
            prop_assert_eq!(&recovered.requests, &expected);
            prop_assert_eq!(fs::metadata(&path).unwrap().len(), valid.max(FILE_HEADER_LEN as u64));
            journal.append(&probe()).unwrap();
            drop(journal);
            let (_journal, again) = Journal::open(dir.path(), JournalOptions::default()).unwrap();
            prop_assert_eq!(again.records, k as u64 + 1);
            prop_assert_eq!(again.truncated_bytes, 0);
            let mut with_probe = records[..k].to_vec();
            with_probe.push(probe());
            prop_assert_eq!(again.requests, model(&with_probe));
        }
    }

    /// Flip sampled bits of a larger log: see `flip_and_check`.
    #[test]
    fn sampled_bit_flips_recover_the_prefix_before_the_damage(
        ops in vec(op(4, 32), 40..120),
        picks in vec(any::<proptest::sample::Index>(), 48),
    ) {
        let records = records_from(&ops);
        let src = tempfile::tempdir().unwrap();
        let (bytes, ends) = write_log(src.path(), &records);
        let dir = tempfile::tempdir().unwrap();
        for pick in picks {
            flip_and_check(dir.path(), &bytes, &ends, &records, pick.index(bytes.len() * 8))?;
        }
    }

    /// Compaction keeps every unfinished request exactly, drops the finished ones, and
    /// the journal goes on working on the new log.
    #[test]
    fn compaction_keeps_unfinished_requests_exactly(ops in vec(op(6, 8), 1..80)) {
        let records = records_from(&ops);
        let dir = tempfile::tempdir().unwrap();
        let expected = unfinished(&model(&records));
        {
            let (mut journal, _) = Journal::open(dir.path(), JournalOptions::default()).unwrap();
            journal.append_batch(&records).unwrap();
            let stats = journal.compact().unwrap();
            prop_assert_eq!(journal.requests(), &expected);
            prop_assert_eq!(stats.kept_requests, expected.len());
            prop_assert_eq!(stats.bytes_after, journal.len_bytes());
            prop_assert!(stats.bytes_after <= stats.bytes_before);
            prop_assert!(!dir.path().join(llmos_journal::COMPACT_TMP_NAME).exists());
        }
        let (mut journal, recovered) = Journal::open(dir.path(), JournalOptions::default()).unwrap();
        prop_assert_eq!(&recovered.requests, &expected);
        prop_assert_eq!(recovered.truncated_bytes, 0);
        // The compacted log accepts the next token of every kept request.
        let next: Vec<Record> = expected
            .iter()
            .map(|(&request, log)| Record::Token {
                request,
                index: log.tokens.len() as u32,
                token: 7,
                sampler_state: vec![1, 2, 3],
            })
            .collect();
        journal.append_batch(&next).unwrap();
        drop(journal);
        let (_journal, after) = Journal::open(dir.path(), JournalOptions::default()).unwrap();
        for (id, log) in &after.requests {
            prop_assert_eq!(log.tokens.last(), Some(&7));
            prop_assert_eq!(&log.tokens[..log.tokens.len() - 1], &expected[id].tokens[..]);
            prop_assert_eq!(&log.last_sampler_state, &vec![1, 2, 3]);
        }
    }
}

/// Flips bit `bit` of the log and checks: inside the file header, `open` refuses and
/// leaves the file alone; inside record `i`, exactly records `0..i` come back unmodified
/// and the file is cut where record `i` starts.
fn flip_and_check(
    dir: &std::path::Path,
    bytes: &[u8],
    ends: &[u64],
    records: &[Record],
    bit: usize,
) -> Result<(), TestCaseError> {
    let path = dir.join(LOG_FILE_NAME);
    let mut damaged = bytes.to_vec();
    damaged[bit / 8] ^= 1 << (bit % 8);
    fs::write(&path, &damaged).unwrap();
    let pos = (bit / 8) as u64;
    if pos < FILE_HEADER_LEN as u64 {
        let err = Journal::open(dir, JournalOptions::default()).err();
        prop_assert!(
            matches!(err, Some(JournalError::BadHeader { .. })),
            "bit {}: {:?}",
            bit,
            err
        );
        prop_assert_eq!(fs::read(&path).unwrap(), damaged);
        return Ok(());
    }
    let i = ends.iter().take_while(|&&e| e <= pos).count();
    let start = if i == 0 {
        FILE_HEADER_LEN as u64
    } else {
        ends[i - 1]
    };
    let read = read_log(&path).unwrap();
    prop_assert_eq!(read.valid_len, start, "bit {}", bit);
    prop_assert_eq!(read.damage.map(|d| d.offset), Some(start));
    let read_records: Vec<Record> = read.records.into_iter().map(|(_, r)| r).collect();
    prop_assert_eq!(&read_records[..], &records[..i]);
    let (journal, recovered) = Journal::open(dir, JournalOptions::default()).unwrap();
    prop_assert_eq!(recovered.records, i as u64, "bit {}", bit);
    prop_assert_eq!(recovered.truncated_bytes, bytes.len() as u64 - start);
    prop_assert_eq!(recovered.requests, model(&records[..i]));
    prop_assert_eq!(fs::metadata(&path).unwrap().len(), start);
    drop(journal);
    Ok(())
}

#[test]
fn every_single_bit_flip_of_a_small_log_recovers_the_prefix_before_the_damage() {
    let records = vec![
        Record::Begin {
            request: 1,
            prompt_tokens: vec![10, 11, 12],
            params: b"{\"seed\":1}".to_vec(),
        },
        Record::Token {
            request: 1,
            index: 0,
            token: 99,
            sampler_state: vec![1, 2, 3, 4],
        },
        Record::Delivered {
            request: 1,
            cursor: 1,
        },
        Record::Token {
            request: 1,
            index: 1,
            token: 100,
            sampler_state: vec![5, 6, 7, 8],
        },
        Record::End {
            request: 1,
            reason: 2,
        },
    ];
    let src = tempfile::tempdir().unwrap();
    let (bytes, ends) = write_log(src.path(), &records);
    let dir = tempfile::tempdir().unwrap();
    for bit in 0..bytes.len() * 8 {
        flip_and_check(dir.path(), &bytes, &ends, &records, bit).unwrap();
    }
}
