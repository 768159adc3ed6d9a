//! Injected write failures (`journal.append`, `journal.compact`). Fault points are
//! process-wide, so they live in this binary, in one test function.

use std::fs;

use llmos_journal::{
    read_log, FlushPolicy, Journal, JournalError, JournalOptions, Record, SyncPolicy,
    APPEND_FAULT_POINT, COMPACT_FAULT_POINT, COMPACT_TMP_NAME,
};
use llmos_kernel::faults;

fn begin(request: u64) -> Record {
    Record::Begin {
        request,
        prompt_tokens: vec![1, 2, 3],
        params: vec![9; 16],
    }
}

fn token(request: u64, index: u32, token: u32) -> Record {
    Record::Token {
        request,
        index,
        token,
        sampler_state: vec![index as u8; 32],
    }
}

fn injected(result: Result<(), JournalError>) -> String {
    match result {
        Err(JournalError::Injected(detail)) => detail,
        other => panic!("expected an injected fault, got {other:?}"),
    }
}

#[test]
fn injected_write_failures_leave_the_journal_consistent() {
    let dir = tempfile::tempdir().unwrap();

    // Token path (EveryRecord): the failed append leaves no bytes and no state behind.
    let (mut j, _) = Journal::open(dir.path(), JournalOptions::default()).unwrap();
    let declared: Vec<String> = faults::list().into_iter().map(|p| p.name).collect();
    assert!(
        declared.iter().any(|n| n == APPEND_FAULT_POINT),
        "{declared:?}"
    );
    assert!(
        declared.iter().any(|n| n == COMPACT_FAULT_POINT),
        "{declared:?}"
    );
    j.append_batch(&[begin(1), token(1, 0, 10)]).unwrap();
    let (len, state) = (j.len_bytes(), j.requests().clone());

    faults::configure(APPEND_FAULT_POINT, "1*return->off").unwrap();
    injected(j.append(&token(1, 1, 11)));
    assert_eq!(j.len_bytes(), len);
    assert_eq!(
        fs::metadata(j.path()).unwrap().len(),
        len,
        "torn write cut away"
    );
    assert_eq!(j.requests(), &state);
    assert_eq!(j.stats().failed_writes, 1);
    j.append(&token(1, 1, 11)).unwrap();

    faults::configure(APPEND_FAULT_POINT, "1*return(disk full)->off").unwrap();
    let detail = injected(j.append_batch(&[begin(2), token(2, 0, 20), token(1, 2, 12)]));
    assert!(detail.contains("disk full"), "{detail}");
    assert!(j.request(2).is_none());
    assert_eq!(j.request(1).unwrap().tokens, vec![10, 11]);
    j.append_batch(&[begin(2), token(2, 0, 20), token(1, 2, 12)])
        .unwrap();
    let expected = j.requests().clone();
    drop(j);
    let (j, recovered) = Journal::open(dir.path(), JournalOptions::default()).unwrap();
    assert_eq!(recovered.requests, expected);
    assert_eq!((recovered.records, recovered.truncated_bytes), (6, 0));
    drop(j);

    // Buffered (Off): a failed flush keeps the buffer, and the retry writes it.
    let options = JournalOptions {
        flush: FlushPolicy::Off,
        sync: SyncPolicy::EveryAppend,
    };
    let (mut j, _) = Journal::open(dir.path(), options).unwrap();
    j.append_batch(&[token(1, 3, 13), token(2, 1, 21)]).unwrap();
    let written = j.written_bytes();
    faults::configure(APPEND_FAULT_POINT, "1*return->off").unwrap();
    injected(j.flush());
    assert_eq!(fs::metadata(j.path()).unwrap().len(), written);
    assert_eq!(j.stats().pending_records, 2);
    j.flush().unwrap();
    assert_eq!(j.stats().syncs, 1);
    let expected = j.requests().clone();
    drop(j);
    let (mut j, recovered) = Journal::open(dir.path(), options).unwrap();
    assert_eq!(recovered.requests, expected);

    // Interval flush: the append that triggers the failing write is refused; records
    // buffered by earlier appends stay buffered.
    drop(j);
    let options = JournalOptions {
        flush: FlushPolicy::IntervalMs(0),
        sync: SyncPolicy::Never,
    };
    let (mut j2, _) = Journal::open(dir.path(), options).unwrap();
    faults::configure(APPEND_FAULT_POINT, "1*return->off").unwrap();
    injected(j2.append(&token(1, 4, 14)));
    assert_eq!(j2.request(1).unwrap().tokens.len(), 4);
    assert_eq!(j2.pending_bytes(), 0);
    j2.append(&token(1, 4, 14)).unwrap();
    j2.append(&Record::End {
        request: 2,
        reason: 1,
    })
    .unwrap();
    drop(j2);

    // Compaction: a failure before the rename leaves the old log, the journal goes on.
    (j, _) = Journal::open(dir.path(), JournalOptions::default()).unwrap();
    let before = read_log(j.path()).unwrap();
    faults::configure(COMPACT_FAULT_POINT, "1*return->off").unwrap();
    assert!(matches!(j.compact(), Err(JournalError::Injected(_))));
    assert!(!dir.path().join(COMPACT_TMP_NAME).exists());
    assert_eq!(read_log(j.path()).unwrap(), before);
    assert_eq!(j.request(2).unwrap().finished, Some(1));
    j.append(&token(1, 5, 15)).unwrap();
    let stats = j.compact().unwrap();
    assert_eq!((stats.kept_requests, stats.dropped_requests), (1, 1));
    let expected = j.requests().clone();
    drop(j);
    let (_j, recovered) = Journal::open(dir.path(), JournalOptions::default()).unwrap();
    assert_eq!(recovered.requests, expected);
    assert_eq!(recovered.requests[&1].tokens, vec![10, 11, 12, 13, 14, 15]);

    faults::clear(APPEND_FAULT_POINT);
    faults::clear(COMPACT_FAULT_POINT);
}
