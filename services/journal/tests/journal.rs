//! Behaviour of the journal through its public API: recovery, the sequence rules on
//! append and on replay, flush and sync policies, simulated crashes, compaction.

use std::fs;
use std::path::Path;

use llmos_journal::{
    file_header, read_log, DamageKind, FlushPolicy, Journal, JournalError, JournalOptions, Record,
    RequestLog, SyncPolicy, Violation, COMPACT_TMP_NAME, FILE_HEADER_LEN, LOG_FILE_NAME,
    MAX_PAYLOAD_LEN,
};

fn begin(request: u64) -> Record {
    Record::Begin {
        request,
        prompt_tokens: vec![1, 2, 3],
        params: format!("params-{request}").into_bytes(),
    }
}

fn token(request: u64, index: u32, token: u32) -> Record {
    Record::Token {
        request,
        index,
        token,
        sampler_state: vec![index as u8; 8],
    }
}

fn open(dir: &Path) -> (Journal, llmos_journal::Recovered) {
    Journal::open(dir, JournalOptions::default()).unwrap()
}

fn with(flush: FlushPolicy, sync: SyncPolicy) -> JournalOptions {
    JournalOptions { flush, sync }
}

/// A log written byte by byte, bypassing the append-time rules.
fn craft(dir: &Path, records: &[Record]) -> Vec<u8> {
    let mut bytes = file_header().to_vec();
    for r in records {
        r.encode_into(&mut bytes).unwrap();
    }
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join(LOG_FILE_NAME), &bytes).unwrap();
    bytes
}

#[test]
fn appended_records_come_back_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut j, recovered) = open(dir.path());
        assert_eq!(recovered.records, 0);
        assert_eq!(j.len_bytes(), FILE_HEADER_LEN as u64);
        j.append(&begin(1)).unwrap();
        j.append_batch(&[begin(2), token(1, 0, 10), token(2, 0, 20)])
            .unwrap();
        j.append_batch(&[token(1, 1, 11), token(2, 1, 21)]).unwrap();
        j.append(&Record::Delivered {
            request: 1,
            cursor: 2,
        })
        .unwrap();
        j.append(&Record::End {
            request: 2,
            reason: 3,
        })
        .unwrap();
        let stats = j.stats();
        assert_eq!((stats.records, stats.writes, stats.syncs), (8, 5, 0));
        assert_eq!(stats.len_bytes, j.written_bytes());
        assert_eq!(fs::metadata(j.path()).unwrap().len(), j.len_bytes());
        assert_eq!(stats.unfinished_requests, 1);
    }
    let (j, recovered) = open(dir.path());
    assert_eq!((recovered.records, recovered.truncated_bytes), (8, 0));
    assert_eq!(recovered.damage, None);
    assert_eq!(
        recovered.requests[&1],
        RequestLog {
            prompt_tokens: vec![1, 2, 3],
            params: b"params-1".to_vec(),
            tokens: vec![10, 11],
            last_sampler_state: vec![1; 8],
            finished: None,
            delivered: 2,
        }
    );
    assert_eq!(recovered.requests[&2].finished, Some(3));
    assert_eq!(
        recovered.unfinished().map(|(id, _)| id).collect::<Vec<_>>(),
        [1]
    );
    assert_eq!(j.requests(), &recovered.requests);
    assert_eq!(j.request(2).unwrap().tokens, vec![20, 21]);
}

#[test]
fn a_refused_append_writes_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = open(dir.path());
    j.append_batch(&[begin(1), token(1, 0, 10)]).unwrap();
    let (len, state) = (j.len_bytes(), j.requests().clone());
    let refused = [
        (
            vec![token(9, 0, 1)],
            Violation::UnknownRequest { request: 9 },
        ),
        (
            vec![token(1, 2, 1)],
            Violation::Gap {
                request: 1,
                index: 2,
                expected: 1,
            },
        ),
        (
            vec![token(1, 0, 11)],
            Violation::ConflictingToken {
                request: 1,
                index: 0,
                journaled: 10,
                got: 11,
            },
        ),
        (
            vec![Record::Delivered {
                request: 1,
                cursor: 2,
            }],
            Violation::CursorBeyondTokens {
                request: 1,
                cursor: 2,
                tokens: 1,
            },
        ),
        // All or nothing: the good records before the bad one are taken back too.
        (
            vec![begin(2), token(2, 0, 5), token(1, 1, 11), token(1, 3, 13)],
            Violation::Gap {
                request: 1,
                index: 3,
                expected: 2,
            },
        ),
    ];
    for (batch, violation) in refused {
        match j.append_batch(&batch) {
            Err(JournalError::Rejected { violation: v }) => assert_eq!(v, violation),
            other => panic!("{batch:?}: {other:?}"),
        }
        assert_eq!(j.len_bytes(), len);
        assert_eq!(j.requests(), &state);
    }
    let huge = Record::Begin {
        request: 3,
        prompt_tokens: vec![],
        params: vec![0; MAX_PAYLOAD_LEN + 1],
    };
    assert!(matches!(
        j.append_batch(&[begin(4), huge]),
        Err(JournalError::TooLarge { request: 3, .. })
    ));
    assert_eq!((j.len_bytes(), j.requests()), (len, &state));
    assert_eq!(fs::metadata(j.path()).unwrap().len(), len);
    j.append(&token(1, 1, 11)).unwrap();
}

#[test]
fn exact_repeats_are_accepted_and_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = open(dir.path());
    j.append_batch(&[begin(1), token(1, 0, 10), token(1, 1, 11)])
        .unwrap();
    let len = j.len_bytes();
    j.append_batch(&[begin(1), token(1, 0, 10), token(1, 1, 11)])
        .unwrap();
    j.append(&Record::Delivered {
        request: 1,
        cursor: 0,
    })
    .unwrap();
    assert_eq!(j.len_bytes(), len);
    assert_eq!(j.stats().records, 3);
    j.append(&Record::End {
        request: 1,
        reason: 1,
    })
    .unwrap();
    j.append(&Record::End {
        request: 1,
        reason: 1,
    })
    .unwrap();
    assert!(matches!(
        j.append(&token(1, 2, 12)),
        Err(JournalError::Rejected {
            violation: Violation::TokenAfterEnd {
                request: 1,
                index: 2
            }
        })
    ));
}

#[test]
fn replay_keeps_exact_repeats_and_refuses_gaps_and_conflicts_without_touching_the_file() {
    let dir = tempfile::tempdir().unwrap();
    craft(
        dir.path(),
        &[begin(1), token(1, 0, 10), token(1, 0, 10), token(1, 1, 11)],
    );
    let (j, recovered) = open(dir.path());
    assert_eq!(recovered.requests[&1].tokens, vec![10, 11]);
    assert_eq!(recovered.records, 4);
    drop(j);

    let cases = [
        (
            vec![begin(1), token(1, 0, 10), token(1, 2, 12), begin(2)],
            Violation::Gap {
                request: 1,
                index: 2,
                expected: 1,
            },
        ),
        (
            vec![begin(1), token(1, 0, 10), token(1, 0, 99), begin(2)],
            Violation::ConflictingToken {
                request: 1,
                index: 0,
                journaled: 10,
                got: 99,
            },
        ),
        (
            vec![begin(1), token(7, 0, 10)],
            Violation::UnknownRequest { request: 7 },
        ),
    ];
    for (records, violation) in cases {
        let bytes = craft(dir.path(), &records);
        let offset =
            (FILE_HEADER_LEN + records[..2].iter().map(Record::encoded_len).sum::<usize>()) as u64;
        let offset = if matches!(violation, Violation::UnknownRequest { .. }) {
            (FILE_HEADER_LEN + records[0].encoded_len()) as u64
        } else {
            offset
        };
        match Journal::open(dir.path(), JournalOptions::default()) {
            Err(e @ JournalError::Corrupt { .. }) => {
                let text = e.to_string();
                assert_eq!(e.violation(), Some(&violation));
                assert!(text.contains(&format!("offset {offset}")), "{text}");
                assert!(text.contains("request"), "{text}");
                if let Some(index) = violation.index() {
                    assert!(text.contains(&format!("index {index}")), "{text}");
                }
            }
            other => panic!("{violation}: {:?}", other.map(|(_, r)| r)),
        }
        assert_eq!(fs::read(dir.path().join(LOG_FILE_NAME)).unwrap(), bytes);
    }
}

#[test]
fn a_damaged_or_foreign_header_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(LOG_FILE_NAME);
    let foreign = b"this is not a journal, it is a poem about journals".to_vec();
    fs::write(&path, &foreign).unwrap();
    let err = Journal::open(dir.path(), JournalOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, JournalError::BadHeader { .. }), "{err}");
    assert!(err.to_string().contains("magic"), "{err}");
    assert_eq!(fs::read(&path).unwrap(), foreign);

    fs::write(&path, b"LLM").unwrap();
    assert!(
        Journal::open(dir.path(), JournalOptions::default()).is_ok(),
        "prefix of a header"
    );

    let mut newer = file_header();
    newer[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32fast::hash(&newer[..12]);
    newer[12..].copy_from_slice(&crc.to_le_bytes());
    fs::write(&path, newer).unwrap();
    let err = Journal::open(dir.path(), JournalOptions::default())
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            JournalError::UnsupportedVersion {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
    fs::write(&path, b"LLMOSJNX").unwrap();
    assert!(matches!(
        Journal::open(dir.path(), JournalOptions::default()),
        Err(JournalError::BadHeader { .. })
    ));
}

#[test]
fn a_torn_header_is_started_over_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(LOG_FILE_NAME), &file_header()[..5]).unwrap();
    let (mut j, recovered) = open(dir.path());
    assert_eq!(recovered.truncated_bytes, 5);
    assert_eq!(
        recovered.damage.map(|d| d.kind),
        Some(DamageKind::TornFileHeader { have: 5 })
    );
    j.append(&begin(1)).unwrap();
    drop(j);
    assert_eq!(open(dir.path()).1.records, 1);
}

#[test]
fn a_torn_tail_is_cut_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = craft(dir.path(), &[begin(1), token(1, 0, 10)]);
    let good = FILE_HEADER_LEN + begin(1).encoded_len();
    fs::write(dir.path().join(LOG_FILE_NAME), &bytes[..bytes.len() - 3]).unwrap();
    let (j, recovered) = open(dir.path());
    assert_eq!(recovered.records, 1);
    assert_eq!(recovered.truncated_bytes, (bytes.len() - 3 - good) as u64);
    let damage = recovered.damage.unwrap();
    assert_eq!(damage.offset, good as u64);
    assert!(matches!(damage.kind, DamageKind::ShortRecord { .. }));
    assert_eq!(j.len_bytes(), good as u64);
    let contents = read_log(j.path()).unwrap();
    assert_eq!(
        (contents.valid_len, contents.file_len),
        (good as u64, good as u64)
    );
}

#[test]
fn one_journal_per_directory_in_a_process() {
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = open(dir.path());
    let again = dir.path().join(".");
    assert!(matches!(
        Journal::open(&again, JournalOptions::default()),
        Err(JournalError::AlreadyOpen { .. })
    ));
    drop(j);
    let (j, _) = open(&again);
    j.abandon();
    open(dir.path());
}

/// A process killed while records sit in the buffer: `abandon` drops the journal
/// without writing, as SIGKILL would. Only what was flushed comes back.
#[test]
fn a_crash_under_off_loses_only_unflushed_records() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(dir.path(), with(FlushPolicy::Off, SyncPolicy::Never)).unwrap();
    j.append_batch(&[begin(1), token(1, 0, 10)]).unwrap();
    assert_eq!(j.written_bytes(), FILE_HEADER_LEN as u64, "Off buffers");
    assert_eq!(j.stats().pending_records, 2);
    assert_eq!(j.next_deadline(), None);
    j.poll().unwrap();
    assert_eq!(j.pending_bytes(), j.len_bytes() - FILE_HEADER_LEN as u64);
    j.flush().unwrap();
    assert_eq!(j.pending_bytes(), 0);
    let flushed = j.requests().clone();
    j.append_batch(&[token(1, 1, 11), begin(2)]).unwrap();
    assert_eq!(
        j.request(1).unwrap().tokens,
        vec![10, 11],
        "applied in memory"
    );
    assert!(j.abandon() > 0);
    let (mut j, recovered) =
        Journal::open(dir.path(), with(FlushPolicy::Off, SyncPolicy::Never)).unwrap();
    assert_eq!(recovered.requests, flushed);
    assert_eq!(recovered.truncated_bytes, 0);

    // A clean drop writes the buffer.
    j.append(&token(1, 1, 12)).unwrap();
    drop(j);
    let (_, recovered) = open(dir.path());
    assert_eq!(recovered.requests[&1].tokens, vec![10, 12]);
}

#[test]
fn interval_flush_buffers_until_due() {
    let dir = tempfile::tempdir().unwrap();
    let hour = 3_600_000;
    let (mut j, _) = Journal::open(
        dir.path(),
        with(FlushPolicy::IntervalMs(hour), SyncPolicy::Never),
    )
    .unwrap();
    assert_eq!(j.next_deadline(), None, "nothing buffered");
    j.append_batch(&[begin(1), token(1, 0, 10)]).unwrap();
    let deadline = j.next_deadline().unwrap();
    assert!(deadline > std::time::Instant::now() + std::time::Duration::from_secs(3000));
    j.poll().unwrap();
    assert!(j.pending_bytes() > 0, "not due yet");
    assert_eq!(
        j.abandon(),
        (begin(1).encoded_len() + token(1, 0, 10).encoded_len()) as u64
    );
    let (j, recovered) = Journal::open(
        dir.path(),
        with(FlushPolicy::IntervalMs(0), SyncPolicy::Never),
    )
    .unwrap();
    assert!(recovered.requests.is_empty());
    let mut j = {
        drop(j);
        Journal::open(
            dir.path(),
            with(FlushPolicy::IntervalMs(0), SyncPolicy::Never),
        )
        .unwrap()
        .0
    };
    j.append(&begin(1)).unwrap();
    assert_eq!(j.pending_bytes(), 0, "an interval of 0 writes every append");
}

#[test]
fn sync_policies_count_their_fdatasyncs() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(
        dir.path(),
        with(FlushPolicy::EveryRecord, SyncPolicy::EveryAppend),
    )
    .unwrap();
    j.append(&begin(1)).unwrap();
    j.append_batch(&[token(1, 0, 1), token(1, 1, 2)]).unwrap();
    assert_eq!((j.stats().writes, j.stats().syncs), (2, 2));
    j.flush().unwrap();
    assert_eq!(j.stats().syncs, 2, "nothing new to sync");
    drop(j);

    let (mut j, _) = Journal::open(
        dir.path(),
        with(FlushPolicy::EveryRecord, SyncPolicy::IntervalMs(3_600_000)),
    )
    .unwrap();
    j.append(&token(1, 2, 3)).unwrap();
    assert_eq!(j.stats().syncs, 0);
    assert!(j.next_deadline().is_some(), "an unsynced write falls due");
    j.sync().unwrap();
    assert_eq!(j.stats().syncs, 1);
    assert_eq!(j.next_deadline(), None);
    j.close().unwrap();
    assert_eq!(open(dir.path()).1.requests[&1].tokens, vec![1, 2, 3]);
}

#[test]
fn compaction_drops_finished_requests_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(dir.path(), with(FlushPolicy::Off, SyncPolicy::Never)).unwrap();
    for r in 0..10 {
        j.append(&begin(r)).unwrap();
        for i in 0..20 {
            j.append(&token(r, i, r as u32 * 100 + i)).unwrap();
        }
        j.append(&Record::Delivered {
            request: r,
            cursor: 15,
        })
        .unwrap();
        if r % 2 == 0 {
            j.append(&Record::End {
                request: r,
                reason: 0,
            })
            .unwrap();
        }
    }
    // Still buffered under Off: compaction writes from memory, so nothing is lost.
    assert!(j.pending_bytes() > 0);
    let kept: std::collections::BTreeMap<_, _> =
        j.unfinished().map(|(id, log)| (id, log.clone())).collect();
    let stats = j.compact().unwrap();
    assert_eq!((stats.kept_requests, stats.dropped_requests), (5, 5));
    assert!(stats.bytes_after < stats.bytes_before / 2, "{stats:?}");
    assert_eq!(stats.records_after, 5 * (1 + 20 + 1));
    assert_eq!(j.requests(), &kept);
    assert_eq!((j.pending_bytes(), j.len_bytes()), (0, stats.bytes_after));
    assert!(!dir.path().join(COMPACT_TMP_NAME).exists());
    j.append(&token(1, 20, 7)).unwrap();
    drop(j);
    let (_, recovered) = open(dir.path());
    assert_eq!(recovered.requests.len(), 5);
    assert_eq!(recovered.requests[&1].tokens.len(), 21);
    assert_eq!(recovered.requests[&3], kept[&3]);
    assert_eq!(recovered.requests[&3].delivered, 15);
}

/// A crash between writing the compacted file and renaming it leaves it behind; open
/// discards it and keeps the old log.
#[test]
fn an_unfinished_compaction_is_discarded_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = open(dir.path());
    j.append_batch(&[begin(1), token(1, 0, 10), begin(2)])
        .unwrap();
    drop(j);
    let tmp = dir.path().join(COMPACT_TMP_NAME);
    fs::write(&tmp, &file_header()[..]).unwrap();
    let (_, recovered) = open(dir.path());
    assert_eq!(recovered.records, 3);
    assert!(!tmp.exists());
}

#[test]
fn stats_serialise_for_telemetry() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, recovered) = open(dir.path());
    j.append(&begin(1)).unwrap();
    let json = serde_json::to_value(j.stats()).unwrap();
    assert_eq!(json["records"], 1);
    assert_eq!(json["writes"], 1);
    assert!(serde_json::to_string(&recovered).is_ok());
    assert!(serde_json::to_string(&j.options()).is_ok());
}

#[test]
fn the_journal_can_live_in_an_actor() {
    fn send<T: Send + 'static>() {}
    fn error<T: std::error::Error + Send + Sync + 'static>() {}
    send::<Journal>();
    error::<JournalError>();
}

#[test]
fn an_append_that_becomes_due_writes_earlier_buffered_records_too() {
    // Regression: the appended-bytes count underflowed when a due write drained records
    // buffered by earlier appends.
    let dir = tempfile::tempdir().unwrap();
    let interval = 20;
    let (mut j, _) = Journal::open(
        dir.path(),
        with(FlushPolicy::IntervalMs(interval), SyncPolicy::Never),
    )
    .unwrap();
    let records = [begin(1), token(1, 0, 10), token(1, 1, 11)];
    j.append(&records[0]).unwrap();
    j.append(&records[1]).unwrap();
    assert!(
        j.pending_bytes() > 0,
        "buffered: the interval has not passed"
    );
    // The policy is about elapsed time, so the test lets that time pass.
    std::thread::sleep(std::time::Duration::from_millis(interval + 5));
    j.append(&records[2]).unwrap();
    assert_eq!(j.pending_bytes(), 0, "the due append wrote everything");
    let expected: u64 = records.iter().map(|r| r.encoded_len() as u64).sum();
    assert_eq!(j.stats().appended_bytes, expected);
    drop(j);
    let (_, recovered) = open(dir.path());
    assert_eq!(recovered.requests[&1].tokens, vec![10, 11]);
}
