//! Tests of the block pool and sequence views: bookkeeping never loses or shares a block,
//! paged reads equal contiguous reads, and restore returns exactly the verified prefix of
//! a sequence — shorter when anything was damaged, never different.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;

use crate::layout::{Geometry, META_BYTES, SUPER_BYTES};
use crate::{
    Backing, BlockId, BlockPool, ContiguousKv, KvDtype, KvError, KvShape, KvStore, PagedKv,
    PoolConfig, PoolOrigin, SharedPool,
};

fn shape(n_layers: usize, n_kv_heads: usize, head_dim: usize) -> KvShape {
    KvShape {
        n_layers,
        n_kv_heads,
        head_dim,
    }
}

fn config(shape: KvShape, bt: usize, blocks: usize, backing: Backing) -> PoolConfig {
    let per = Geometry::bytes_per_block(shape, bt, KvDtype::F32).unwrap() as u64;
    // A little slack: the budget need not be a multiple of the block size.
    PoolConfig::new(shape, bt, per * blocks as u64 + per / 2, backing)
}

fn memory_pool(shape: KvShape, bt: usize, blocks: usize) -> SharedPool {
    SharedPool::new(BlockPool::new(config(shape, bt, blocks, Backing::Memory)).unwrap())
}

/// The value stored for element `j` of `layer`'s keys (`kind` 0) or values at `pos`.
fn value(layer: usize, kind: usize, pos: usize, j: usize) -> f32 {
    (layer * 1_000_000 + kind * 500_000 + pos * 100 + j) as f32
}

fn rows(shape: KvShape, layer: usize, kind: usize, start: usize, count: usize) -> Tensor {
    let row = shape.row_len();
    let data: Vec<f32> = (start..start + count)
        .flat_map(|p| (0..row).map(move |j| value(layer, kind, p, j)))
        .collect();
    Tensor::from_vec(
        data,
        (count, shape.n_kv_heads, shape.head_dim),
        &Device::Cpu,
    )
    .unwrap()
}

fn token(pos: usize) -> u32 {
    (pos as u32).wrapping_mul(2_654_435_761) >> 7
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n).map(token).collect()
}

/// Runs the forward's protocol for positions `start..start + count`: tokens, reserve,
/// every layer's write, commit.
fn forward(kv: &mut PagedKv, start: usize, count: usize) {
    let shape = kv.shape();
    let toks: Vec<u32> = (start..start + count).map(token).collect();
    kv.record_tokens(start, &toks).unwrap();
    kv.reserve(start + count).unwrap();
    for layer in 0..shape.n_layers {
        let k = rows(shape, layer, 0, start, count);
        let v = rows(shape, layer, 1, start, count);
        kv.write(layer, start, &k, &v).unwrap();
    }
    kv.commit(start + count).unwrap();
}

/// A sequence of `len` positions: a prefill of up to 11 positions, then one at a time.
fn fill(kv: &mut PagedKv, len: usize) {
    let prefill = len.min(11);
    if prefill > 0 {
        forward(kv, 0, prefill);
    }
    for pos in prefill..len {
        forward(kv, pos, 1);
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Asserts that `kv` holds exactly what [`fill`] wrote for positions `0..len`.
fn assert_holds(kv: &PagedKv, len: usize) {
    let shape = kv.shape();
    for layer in 0..shape.n_layers {
        let (k, v) = kv.read(layer, len, &Device::Cpu).unwrap();
        assert_eq!(k.dims(), &[len, shape.n_kv_heads, shape.head_dim]);
        assert_eq!(
            flat(&k),
            flat(&rows(shape, layer, 0, 0, len)),
            "keys of layer {layer}"
        );
        assert_eq!(
            flat(&v),
            flat(&rows(shape, layer, 1, 0, len)),
            "values of layer {layer}"
        );
    }
}

/// What the file holds right now — what a process killed at this instant leaves behind
/// (the page cache keeps a mapping's writes), without any destructor having run.
fn crash_copy(pool: &SharedPool, name: &str) -> PathBuf {
    let pool = pool.lock();
    let path = pool.path().unwrap();
    let copy = path.with_file_name(name);
    std::fs::copy(path, &copy).unwrap();
    copy
}

fn poke(path: &Path, at: usize, f: impl FnOnce(&mut u8)) {
    let mut bytes = std::fs::read(path).unwrap();
    f(&mut bytes[at]);
    std::fs::write(path, bytes).unwrap();
}

fn geometry_of(pool: &SharedPool) -> Geometry {
    pool.lock().geometry()
}

fn data_at(g: &Geometry, block: BlockId, byte: usize) -> usize {
    g.data_off().unwrap()
        + block.index() * Geometry::bytes_per_block(g.shape, g.block_tokens, g.dtype).unwrap()
        + byte
}

fn record_at(block: BlockId, byte: usize) -> usize {
    SUPER_BYTES + block.index() * META_BYTES + byte
}

// ---- configuration and allocation ----

#[test]
fn configuration_errors_are_clear() {
    let s = shape(2, 2, 4);
    let per = Geometry::bytes_per_block(s, 16, KvDtype::F32).unwrap() as u64;
    let small = BlockPool::new(PoolConfig::new(s, 16, per - 1, Backing::Memory));
    assert!(matches!(small, Err(KvError::Config(ref m)) if m.contains("holds no block")));
    let zero = BlockPool::new(PoolConfig::new(
        shape(0, 2, 4),
        16,
        1 << 20,
        Backing::Memory,
    ));
    assert!(matches!(zero, Err(KvError::Config(_))));
    let pool = BlockPool::new(PoolConfig::new(s, 16, per * 3 + 5, Backing::Memory)).unwrap();
    let stats = pool.stats();
    assert_eq!((stats.total, stats.free, stats.used), (3, 3, 0));
    assert_eq!(stats.bytes_per_block, 2 * 2 * 16 * 8 * 4);
    assert_eq!(stats.block_tokens, 16);
}

#[test]
fn allocate_is_all_or_nothing_and_free_refuses_what_it_did_not_give() {
    let mut pool = BlockPool::new(config(shape(1, 1, 2), 4, 5, Backing::Memory)).unwrap();
    let a = pool.allocate(3).unwrap();
    let before = pool.stats();
    let err = pool.allocate(3).unwrap_err();
    assert!(matches!(
        err,
        KvError::OutOfBlocks {
            needed: 3,
            free: 2,
            total: 5
        }
    ));
    assert_eq!(pool.stats(), before);
    assert!(matches!(pool.free(&[a[0], a[0]]), Err(KvError::NotHeld(_))));
    assert_eq!(pool.stats(), before, "a refused free frees nothing");
    pool.free(&a).unwrap();
    assert!(
        matches!(pool.free(&a[..1]), Err(KvError::NotHeld(_))),
        "double free"
    );
    assert_eq!(pool.stats().free, 5);
    pool.check_invariants().unwrap();
}

#[test]
fn reserve_out_of_blocks_leaves_everything_unchanged() {
    let s = shape(2, 1, 3);
    let pool = memory_pool(s, 4, 3);
    let mut kv = pool.sequence(1).unwrap();
    fill(&mut kv, 6);
    let table = kv.blocks().to_vec();
    let stats = pool.stats();
    let err = kv.reserve(20).unwrap_err();
    assert!(matches!(
        err,
        KvError::OutOfBlocks {
            needed: 3,
            free: 1,
            total: 3
        }
    ));
    assert_eq!(kv.blocks(), table.as_slice());
    assert_eq!(pool.stats(), stats);
    assert_eq!(kv.len(), 6);
    assert_holds(&kv, 6);
    pool.lock().check_invariants().unwrap();
}

#[test]
fn writes_past_the_reservation_are_refused() {
    let s = shape(1, 1, 2);
    let pool = memory_pool(s, 4, 2);
    let mut kv = pool.sequence(1).unwrap();
    kv.reserve(3).unwrap();
    let k = rows(s, 0, 0, 0, 5);
    assert!(matches!(
        kv.write(0, 0, &k, &k),
        Err(KvError::OutOfRange(_))
    ));
    assert!(matches!(
        kv.write(1, 0, &k, &k),
        Err(KvError::OutOfRange(_))
    ));
    assert!(matches!(
        kv.read(0, 1, &Device::Cpu),
        Err(KvError::OutOfRange(_))
    ));
    assert!(
        matches!(kv.commit(1), Err(KvError::OutOfRange(_))),
        "nothing written"
    );
}

#[test]
fn one_view_per_sequence() {
    let pool = memory_pool(shape(1, 1, 2), 4, 2);
    let kv = pool.sequence(5).unwrap();
    assert!(matches!(pool.sequence(5), Err(KvError::SequenceInUse(5))));
    assert!(matches!(
        pool.restore(5, &[]),
        Err(KvError::SequenceInUse(5))
    ));
    drop(kv);
    pool.sequence(5).unwrap();
}

#[test]
fn dropping_or_releasing_a_sequence_returns_its_blocks() {
    let s = shape(1, 2, 2);
    let pool = memory_pool(s, 4, 6);
    let mut kv = pool.sequence(1).unwrap();
    fill(&mut kv, 10);
    assert_eq!(pool.stats().used, 3);
    drop(kv);
    let stats = pool.stats();
    assert_eq!((stats.free, stats.used, stats.restorable), (6, 0, 3));
    let mut kv = pool.sequence(2).unwrap();
    fill(&mut kv, 10);
    kv.release();
    let stats = pool.stats();
    assert_eq!(
        (stats.free, stats.used, stats.restorable),
        (6, 0, 3),
        "released: not restorable"
    );
    pool.lock().check_invariants().unwrap();
}

// ---- reads equal the contiguous store ----

#[derive(Clone, Debug)]
enum Op {
    /// Write `count` positions of `layer` starting `back` positions before its end.
    Write {
        layer: usize,
        back: usize,
        count: usize,
        form: u8,
    },
    /// Commit `back` positions before what every layer has written.
    Commit {
        back: usize,
    },
    Truncate {
        len: usize,
    },
    Tokens {
        back: usize,
        count: usize,
        salt: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4usize, 0..4usize, 0..7usize, 0..3u8)
            .prop_map(|(layer, back, count, form)| Op::Write { layer, back, count, form }),
        2 => (0..3usize).prop_map(|back| Op::Commit { back }),
        1 => (0..30usize).prop_map(|len| Op::Truncate { len }),
        1 => (0..4usize, 0..8usize, 0..2u32)
            .prop_map(|(back, count, salt)| Op::Tokens { back, count, salt }),
    ]
}

/// `count` rows of `shape` in one of three forms the forward might hand over: contiguous
/// f32, a transposed (non-contiguous) view, or f64.
fn written_rows(shape: KvShape, count: usize, base: f32, form: u8) -> Tensor {
    let (h, d) = (shape.n_kv_heads, shape.head_dim);
    let n = count * h * d;
    let data: Vec<f32> = (0..n).map(|i| base + i as f32).collect();
    match form {
        0 => Tensor::from_vec(data, (count, h, d), &Device::Cpu).unwrap(),
        1 => Tensor::from_vec(data, (h, count, d), &Device::Cpu)
            .unwrap()
            .transpose(0, 1)
            .unwrap(),
        _ => Tensor::from_vec(data, (count, h, d), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap(),
    }
}

fn same_read(a: &ContiguousKv, b: &PagedKv, layer: usize, len: usize) {
    let x = a.read(layer, len, &Device::Cpu);
    let y = b.read(layer, len, &Device::Cpu);
    match (x, y) {
        (Ok((ak, av)), Ok((bk, bv))) => {
            assert_eq!(ak.dims(), bk.dims());
            assert_eq!(flat(&ak), flat(&bk), "keys of layer {layer}, len {len}");
            assert_eq!(flat(&av), flat(&bv), "values of layer {layer}, len {len}");
        }
        (Err(_), Err(_)) => {}
        (x, y) => panic!("layer {layer} len {len}: contiguous {x:?}, paged {y:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn paged_reads_equal_contiguous_reads(
        dims in (1..4usize, 1..3usize, 1..5usize),
        bt in 1..6usize,
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let s = shape(dims.0, dims.1, dims.2);
        let pool = memory_pool(s, bt, 64usize.div_ceil(bt) + 1);
        let mut paged = pool.sequence(3).unwrap();
        let mut contiguous = ContiguousKv::new(s);
        let mut written = vec![0usize; s.n_layers];
        let mut known: Vec<u32> = Vec::new();
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Write { layer, back, count, form } => {
                    let layer = layer % s.n_layers;
                    let start = written[layer].saturating_sub(back);
                    if start + count > 60 {
                        continue;
                    }
                    let k = written_rows(s, count, (i * 1000) as f32, form);
                    let v = written_rows(s, count, (i * 1000 + 500) as f32, form);
                    paged.reserve(start + count).unwrap();
                    contiguous.reserve(start + count).unwrap();
                    paged.write(layer, start, &k, &v).unwrap();
                    contiguous.write(layer, start, &k, &v).unwrap();
                    written[layer] = start + count;
                }
                Op::Commit { back } => {
                    let len = written.iter().min().unwrap().saturating_sub(back);
                    paged.commit(len).unwrap();
                    contiguous.commit(len).unwrap();
                }
                Op::Truncate { len } => {
                    paged.truncate(len);
                    contiguous.truncate(len);
                    for w in &mut written { *w = (*w).min(len); }
                    known.truncate(len);
                }
                Op::Tokens { back, count, salt } => {
                    let start = known.len().saturating_sub(back);
                    let toks: Vec<u32> = (start..start + count).map(|p| token(p) ^ salt).collect();
                    paged.record_tokens(start, &toks).unwrap();
                    // A changed or dropped token takes its K/V and what follows with it.
                    let same = known[start..].iter().zip(&toks).take_while(|(a, b)| a == b).count();
                    if start + same < known.len() {
                        contiguous.truncate(start + same);
                        for w in &mut written { *w = (*w).min(start + same); }
                    }
                    known.truncate(start);
                    known.extend(toks);
                }
            }
            prop_assert_eq!(paged.len(), contiguous.len());
            prop_assert!(paged.sealed_len() <= paged.len().min(paged.tokens().len()));
            for (layer, &w) in written.iter().enumerate() {
                for len in [0, w / 2, w, w + 1] {
                    same_read(&contiguous, &paged, layer, len);
                }
            }
            pool.lock().check_invariants().unwrap();
        }
        // Whatever was sealed along the way is exactly what a restore gives back.
        let sealed = paged.sealed_len();
        let toks = paged.tokens().to_vec();
        prop_assert_eq!(&toks, &known);
        drop(paged);
        let back = pool.restore(3, &toks).unwrap();
        prop_assert_eq!(back.valid_len, sealed);
        for layer in 0..s.n_layers {
            same_read(&contiguous, &back.kv, layer, sealed);
        }
    }
}

// ---- the pool never loses or shares a block ----

#[derive(Clone, Debug)]
enum PoolOp {
    Open(u64),
    Reserve(usize, usize),
    Fill(usize, usize),
    Truncate(usize, usize),
    Drop(usize),
    Release(usize),
    Restore(u64),
    Allocate(usize),
    Free(usize),
    Forget(u64),
}

fn pool_op() -> impl Strategy<Value = PoolOp> {
    prop_oneof![
        (0..6u64).prop_map(PoolOp::Open),
        (0..8usize, 0..40usize).prop_map(|(s, n)| PoolOp::Reserve(s, n)),
        (0..8usize, 0..30usize).prop_map(|(s, n)| PoolOp::Fill(s, n)),
        (0..8usize, 0..30usize).prop_map(|(s, n)| PoolOp::Truncate(s, n)),
        (0..8usize).prop_map(PoolOp::Drop),
        (0..8usize).prop_map(PoolOp::Release),
        (0..6u64).prop_map(PoolOp::Restore),
        (0..6usize).prop_map(PoolOp::Allocate),
        (0..8usize).prop_map(PoolOp::Free),
        (0..6u64).prop_map(PoolOp::Forget),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn blocks_are_never_lost_or_shared(ops in prop::collection::vec(pool_op(), 1..60)) {
        let s = shape(1, 1, 2);
        let pool = memory_pool(s, 4, 12);
        let mut seqs: Vec<PagedKv> = Vec::new();
        let mut held: Vec<Vec<BlockId>> = Vec::new();
        for op in ops {
            let pick = |i: usize, n: usize| (n > 0).then(|| i % n);
            match op {
                PoolOp::Open(id) => {
                    if let Ok(kv) = pool.sequence(id) { seqs.push(kv); }
                }
                PoolOp::Restore(id) => {
                    if let Ok(r) = pool.restore(id, &tokens(64)) {
                        prop_assert_eq!(r.kv.len(), r.valid_len);
                        seqs.push(r.kv);
                    }
                }
                PoolOp::Reserve(i, n) => if let Some(i) = pick(i, seqs.len()) {
                    let kv = &mut seqs[i];
                    let (table, stats) = (kv.blocks().to_vec(), pool.stats());
                    if kv.reserve(n).is_err() {
                        prop_assert_eq!(kv.blocks(), table.as_slice());
                        prop_assert_eq!(pool.stats(), stats);
                    } else {
                        prop_assert!(kv.capacity() >= n);
                    }
                }
                PoolOp::Fill(i, n) => if let Some(i) = pick(i, seqs.len()) {
                    let kv = &mut seqs[i];
                    let start = kv.len();
                    if kv.reserve(start + n).is_ok() && n > 0 {
                        forward(kv, start, n);
                    }
                }
                PoolOp::Truncate(i, n) => if let Some(i) = pick(i, seqs.len()) {
                    seqs[i].truncate(n);
                }
                PoolOp::Drop(i) => if let Some(i) = pick(i, seqs.len()) {
                    drop(seqs.swap_remove(i));
                }
                PoolOp::Release(i) => if let Some(i) = pick(i, seqs.len()) {
                    seqs.swap_remove(i).release();
                }
                PoolOp::Allocate(n) => {
                    if let Ok(b) = pool.lock().allocate(n) { held.push(b); }
                }
                PoolOp::Free(i) => if let Some(i) = pick(i, held.len()) {
                    pool.lock().free(&held.swap_remove(i)).unwrap();
                }
                PoolOp::Forget(id) => { pool.lock().forget(id); }
            }
            let guard = pool.lock();
            guard.check_invariants().map_err(TestCaseError::fail)?;
            let mut owners = std::collections::HashMap::new();
            for kv in &seqs {
                for &b in kv.blocks() {
                    prop_assert!(owners.insert(b, kv.seq_id()).is_none(), "{} in two tables", b);
                    prop_assert_eq!(guard.holder(b), Some(kv.seq_id()));
                }
            }
            for &b in held.iter().flatten() {
                prop_assert!(owners.insert(b, u64::MAX).is_none(), "{} held twice", b);
            }
            let stats = guard.stats();
            prop_assert_eq!(stats.used, owners.len());
            prop_assert_eq!(stats.free + stats.used, stats.total);
        }
    }
}

// ---- restore ----

#[test]
fn a_dropped_sequence_is_restored_in_process() {
    let s = shape(2, 2, 3);
    let pool = memory_pool(s, 4, 8);
    let mut kv = pool.sequence(9).unwrap();
    fill(&mut kv, 14);
    assert_eq!(kv.sealed_len(), 14);
    drop(kv);
    let r = pool.restore(9, &tokens(20)).unwrap();
    assert_eq!((r.valid_len, r.dropped_blocks), (14, 0));
    assert_holds(&r.kv, 14);
    // It carries on where it stopped.
    let mut kv = r.kv;
    for pos in 14..18 {
        forward(&mut kv, pos, 1);
    }
    assert_holds(&kv, 18);
    pool.lock().check_invariants().unwrap();
}

#[test]
fn only_sealed_positions_are_restorable() {
    let s = shape(1, 1, 2);
    let pool = memory_pool(s, 4, 8);
    let mut kv = pool.sequence(1).unwrap();
    kv.reserve(6).unwrap();
    kv.write(0, 0, &rows(s, 0, 0, 0, 6), &rows(s, 0, 1, 0, 6))
        .unwrap();
    kv.commit(6).unwrap();
    assert_eq!(kv.sealed_len(), 0, "no tokens recorded yet");
    kv.record_tokens(0, &tokens(5)).unwrap();
    assert_eq!(kv.sealed_len(), 5, "sealed once the tokens arrive");
    kv.record_tokens(2, &[token(2) ^ 1]).unwrap();
    assert_eq!(
        kv.sealed_len(),
        2,
        "a changed token unseals it and what follows"
    );
    kv.truncate(1);
    assert_eq!((kv.sealed_len(), kv.tokens().len()), (1, 1));
    drop(kv);
    assert_eq!(pool.restore(1, &tokens(6)).unwrap().valid_len, 1);
}

#[test]
fn a_reopened_file_restores_each_sequence_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.pool");
    let s = shape(2, 2, 4);
    let cfg = config(s, 4, 16, Backing::File(path.clone())).with_model_tag(42);
    let pool = SharedPool::new(BlockPool::new(cfg.clone()).unwrap());
    assert_eq!(pool.lock().origin(), &PoolOrigin::Created);
    let mut a = pool.sequence(1).unwrap();
    let mut b = pool.sequence(2).unwrap();
    fill(&mut a, 13);
    fill(&mut b, 8);
    // A crash: nothing dropped, nothing flushed.
    let crashed = crash_copy(&pool, "crashed.pool");
    drop((a, b, pool));

    let reopened = SharedPool::new(BlockPool::open_existing(&crashed).unwrap());
    assert_eq!(reopened.lock().restorable_sequences(), vec![1, 2]);
    assert_eq!(reopened.stats().restorable, 4 + 2);
    let ra = reopened.restore(1, &tokens(13)).unwrap();
    let rb = reopened.restore(2, &tokens(30)).unwrap();
    assert_eq!((ra.valid_len, rb.valid_len), (13, 8));
    assert_holds(&ra.kv, 13);
    assert_holds(&rb.kv, 8);
    drop((ra, rb, reopened));

    // Configured the same way, the original file is reopened with its contents (the
    // sequences were dropped cleanly there, which keeps sealed blocks restorable too).
    let pool = SharedPool::new(BlockPool::new(cfg.clone()).unwrap());
    assert_eq!(pool.lock().origin(), &PoolOrigin::Reopened);
    let mut r = pool.restore(1, &tokens(13)).unwrap();
    assert_eq!(r.valid_len, 13);
    // A restored sequence goes on, and what it seals next survives the next crash too.
    fill_from(&mut r.kv, 13, 21);
    let again = crash_copy(&pool, "again.pool");
    drop((r, pool));
    let pool = SharedPool::new(BlockPool::open_existing(&again).unwrap());
    let r = pool.restore(1, &tokens(21)).unwrap();
    assert_eq!(r.valid_len, 21);
    assert_holds(&r.kv, 21);
}

fn fill_from(kv: &mut PagedKv, from: usize, to: usize) {
    for pos in from..to {
        forward(kv, pos, 1);
    }
}

/// A file pool holding sequence 7 (`len` positions, blocks of 4) crashed at the end.
fn crashed_pool(dir: &Path, len: usize) -> (PathBuf, Vec<BlockId>, Geometry) {
    let s = shape(2, 1, 3);
    let path = dir.join("kv.pool");
    let pool = SharedPool::new(BlockPool::new(config(s, 4, 8, Backing::File(path))).unwrap());
    let mut kv = pool.sequence(7).unwrap();
    fill(&mut kv, len);
    let blocks = kv.blocks().to_vec();
    let copy = crash_copy(&pool, "crashed.pool");
    (copy, blocks, geometry_of(&pool))
}

/// Restores sequence 7 from a copy of `path` (a restore frees what does not verify, so
/// the original stays as it was for the next attempt).
fn restore_from(path: &Path, toks: &[u32]) -> (usize, usize) {
    let copy = path.with_extension("attempt");
    std::fs::copy(path, &copy).unwrap();
    let pool = SharedPool::new(BlockPool::open_existing(&copy).unwrap());
    let r = pool.restore(7, toks).unwrap();
    assert_holds(&r.kv, r.valid_len);
    drop(r.kv);
    pool.lock().check_invariants().unwrap();
    (r.valid_len, r.dropped_blocks)
}

#[test]
fn damaged_kv_ends_the_prefix_at_its_block() {
    let dir = tempfile::tempdir().unwrap();
    let (path, blocks, g) = crashed_pool(dir.path(), 14);
    assert_eq!(restore_from(&path, &tokens(14)), (14, 0));
    // Layer 1's values at position 1 of the third block (position 9).
    let at = data_at(
        &g,
        blocks[2],
        crate::layout::run_offset(3, 4, 1, 1, 1, 4) + 4,
    );
    poke(&path, at, |b| *b ^= 0x01);
    assert_eq!(restore_from(&path, &tokens(14)), (8, 2));
}

#[test]
fn damaged_record_ends_the_prefix_at_its_block() {
    let dir = tempfile::tempdir().unwrap();
    let (path, blocks, _) = crashed_pool(dir.path(), 14);
    for (byte, block) in [(5, 1), (20, 3), (62, 0)] {
        let copy = path.with_file_name(format!("record-{byte}.pool"));
        std::fs::copy(&path, &copy).unwrap();
        poke(&copy, record_at(blocks[block], byte), |b| {
            *b = b.wrapping_add(1)
        });
        let (valid, _) = restore_from(&copy, &tokens(14));
        assert_eq!(valid, block * 4, "record byte {byte} of block {block}");
    }
}

#[test]
fn different_tokens_end_the_prefix_at_their_block() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = crashed_pool(dir.path(), 14);
    for (changed, valid) in [(0, 0), (5, 4), (11, 8), (13, 12)] {
        let mut toks = tokens(14);
        toks[changed] ^= 1;
        assert_eq!(
            restore_from(&path, &toks).0,
            valid,
            "token {changed} changed"
        );
    }
    // Fewer tokens than were sealed: only whole blocks they cover can be checked.
    assert_eq!(restore_from(&path, &tokens(10)).0, 8);
    assert_eq!(restore_from(&path, &[]).0, 0);
}

#[test]
fn a_truncated_file_is_a_clear_error_or_a_fresh_pool() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, g) = crashed_pool(dir.path(), 14);
    let full = std::fs::metadata(&path).unwrap().len();
    let cut = path.with_file_name("cut.pool");
    for len in [0, 100, SUPER_BYTES as u64 + 10, full - 1] {
        std::fs::copy(&path, &cut).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
        f.set_len(len).unwrap();
        drop(f);
        let err = BlockPool::open_existing(&cut).unwrap_err();
        let KvError::Corrupt { reason, .. } = &err else {
            panic!("{err:?}");
        };
        assert!(reason.contains("truncated"), "{len} bytes: {reason}");
        assert!(err.to_string().contains("unusable"), "{err}");
    }
    let cfg = config(g.shape, g.block_tokens, g.n_blocks, Backing::File(cut));
    let pool = BlockPool::new(cfg).unwrap();
    assert!(matches!(pool.origin(), PoolOrigin::Reset { reason } if reason.contains("truncated")));
    assert_eq!(pool.stats().free, g.n_blocks);
    assert_eq!(pool.stats().restorable, 0);
}

#[test]
fn a_file_for_another_model_or_geometry_is_started_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.pool");
    let s = shape(1, 1, 4);
    let cfg = config(s, 4, 4, Backing::File(path.clone()));
    {
        let pool = SharedPool::new(BlockPool::new(cfg.clone()).unwrap());
        fill(&mut pool.sequence(1).unwrap(), 6);
        assert_eq!(pool.stats().restorable, 2);
    }
    for other in [
        cfg.clone().with_model_tag(1),
        config(s, 4, 5, Backing::File(path.clone())),
        config(shape(1, 2, 2), 4, 4, Backing::File(path.clone())),
    ] {
        let pool = BlockPool::new(other).unwrap();
        assert!(
            matches!(pool.origin(), PoolOrigin::Reset { .. }),
            "{:?}",
            pool.origin()
        );
        assert_eq!(pool.stats().restorable, 0);
    }
}

#[test]
fn a_file_is_mapped_by_one_pool_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.pool");
    let cfg = config(shape(1, 1, 2), 4, 2, Backing::File(path.clone()));
    let pool = BlockPool::new(cfg.clone()).unwrap();
    assert!(matches!(
        BlockPool::new(cfg.clone()),
        Err(KvError::Io { .. })
    ));
    assert!(matches!(
        BlockPool::open_existing(&path),
        Err(KvError::Io { .. })
    ));
    drop(pool);
    BlockPool::open_existing(&path).unwrap();
}

#[test]
fn eviction_takes_the_oldest_gone_sequence_tail_first() {
    let s = shape(1, 1, 2);
    let pool = memory_pool(s, 4, 6);
    let mut old = pool.sequence(1).unwrap();
    fill(&mut old, 12);
    drop(old);
    let mut young = pool.sequence(2).unwrap();
    fill(&mut young, 8);
    drop(young);
    assert_eq!(pool.stats().restorable, 5);
    let mut kv = pool.sequence(3).unwrap();
    kv.reserve(4 * 3).unwrap();
    assert_eq!(
        pool.stats().restorable,
        3,
        "the plain free block, then sequence 1's last two blocks went"
    );
    assert_eq!(pool.restore(1, &tokens(12)).unwrap().valid_len, 4);
    assert_eq!(pool.restore(2, &tokens(8)).unwrap().valid_len, 8);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever single byte of the file is damaged, and wherever the file is cut, the pool
    /// either refuses the file or restores a prefix holding exactly what was written.
    #[test]
    fn damage_never_yields_wrong_data(at in 0.0..1.0f64, flip in 1..=255u8, cut in prop::option::of(0.0..1.0f64)) {
        let dir = tempfile::tempdir().unwrap();
        let (path, _, _) = crashed_pool(dir.path(), 14);
        let mut bytes = std::fs::read(&path).unwrap();
        let i = ((bytes.len() - 1) as f64 * at) as usize;
        bytes[i] ^= flip;
        if let Some(cut) = cut {
            bytes.truncate((bytes.len() as f64 * cut) as usize);
        }
        std::fs::write(&path, &bytes).unwrap();
        match BlockPool::open_existing(&path) {
            Err(KvError::Corrupt { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error {e}"),
            Ok(pool) => {
                prop_assert!(cut.is_none());
                let pool = SharedPool::new(pool);
                let r = pool.restore(7, &tokens(14)).unwrap();
                prop_assert!(r.valid_len <= 14);
                assert_holds(&r.kv, r.valid_len);
            }
        }
    }

    #[test]
    fn garbage_files_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..10_000), magic in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("garbage.pool");
        let mut bytes = bytes;
        if magic && bytes.len() >= 8 {
            bytes[..8].copy_from_slice(b"LLMOSKV\x01");
        }
        std::fs::write(&path, &bytes).unwrap();
        let refused = matches!(BlockPool::open_existing(&path), Err(KvError::Corrupt { .. }));
        prop_assert!(refused);
    }
}

#[test]
fn views_move_between_threads_and_stats_are_read_from_others() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<SharedPool>();
    send_sync::<PagedKv>();
    let pool = memory_pool(shape(2, 2, 4), 4, 16);
    let mut kv = pool.sequence(1).unwrap();
    let watcher = {
        let pool = pool.clone();
        std::thread::spawn(move || {
            (0..200)
                .map(|_| pool.stats())
                .all(|s| s.free + s.used == s.total)
        })
    };
    let writer = std::thread::spawn(move || {
        fill(&mut kv, 40);
        kv
    });
    let kv = writer.join().unwrap();
    assert!(watcher.join().unwrap());
    assert_holds(&kv, 40);
    assert_eq!(pool.stats().used, 10);
}

/// An f16 pool stores half the bytes, reads back the values rounded to f16 (exactly, when
/// they are representable), seals and restores them from a reopened file like an f32
/// pool, and a file of the other type starts over.
#[test]
fn an_f16_pool_halves_the_bytes_and_restores_like_f32() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv16.pool");
    let s = shape(2, 2, 4);
    let f32_block = Geometry::bytes_per_block(s, 4, KvDtype::F32).unwrap();
    let f16_block = Geometry::bytes_per_block(s, 4, KvDtype::F16).unwrap();
    assert_eq!(f16_block * 2, f32_block);
    let cfg = config(s, 4, 16, Backing::File(path.clone())).with_dtype(KvDtype::F16);
    let pool = SharedPool::new(BlockPool::new(cfg.clone()).unwrap());
    assert_eq!(pool.stats().bytes_per_block, f16_block);
    // Quarter steps below 64 are exact in f16; 1/3 is not.
    let exact = |pos: usize, j: usize| ((pos * 7 + j) % 256) as f32 * 0.25;
    let row = s.row_len();
    let mut kv = pool.sequence(1).unwrap();
    kv.reserve(10).unwrap();
    kv.record_tokens(0, &tokens(10)).unwrap();
    for layer in 0..s.n_layers {
        let k: Vec<f32> = (0..10)
            .flat_map(|p| (0..row).map(move |j| exact(p, j)))
            .collect();
        let v: Vec<f32> = k.iter().map(|x| x + 1.0 / 3.0).collect();
        kv.write_rows(layer, 0, &k, &v).unwrap();
    }
    kv.commit(10).unwrap();
    let check = |kv: &PagedKv, len: usize| {
        for layer in 0..s.n_layers {
            kv.view(layer, len, &mut |view| {
                for p in 0..len {
                    let key = view.key(p);
                    let value = view.value(p);
                    for j in 0..row {
                        assert_eq!(key[j], exact(p, j), "key {layer}/{p}/{j}");
                        let rounded = half::f16::from_f32(exact(p, j) + 1.0 / 3.0).to_f32();
                        assert_eq!(value[j], rounded, "value {layer}/{p}/{j}");
                    }
                }
            })
            .unwrap();
        }
    };
    check(&kv, 10);
    drop((kv, pool));
    let pool = SharedPool::new(BlockPool::new(cfg).unwrap());
    assert_eq!(pool.lock().origin(), &PoolOrigin::Reopened);
    let restored = pool.restore(1, &tokens(10)).unwrap();
    assert_eq!(restored.valid_len, 10);
    check(&restored.kv, 10);
    drop((restored, pool));
    let as_f32 = config(s, 4, 16, Backing::File(path));
    let pool = BlockPool::new(as_f32).unwrap();
    assert!(
        matches!(pool.origin(), PoolOrigin::Reset { reason } if reason.contains("F16")),
        "{:?}",
        pool.origin()
    );
}
