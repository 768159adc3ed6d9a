//! Causal attention of new query rows over K/V read in place from the runs (blocks) of the
//! paged pool, f32 or f16, in a fixed order over positions so that a row's result does not
//! depend on the chunk it arrived in, the rows sharing its tile, or the pool's layout.

use half::f16;

use crate::ops::{Elem, Ops, RunShape};
use crate::scratch::Scratch;
use crate::{for_each_chunk, with_ops, Dispatch};

/// Shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (query head `h` reads KV head `h / (n_heads / n_kv_heads)`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// One run of consecutive K or V rows, as the pool stores them.
#[derive(Clone, Copy, Debug)]
pub enum Rows<'a> {
    /// f32 rows.
    F32(&'a [f32]),
    /// f16 rows (widened exactly as they are read).
    F16(&'a [f16]),
}

/// The K/V an attention call reads, run by run: a run is consecutive positions stored
/// together (a block of the paged pool), its key rows and its value rows.
pub trait KvRuns: Sync {
    /// Number of runs.
    fn count(&self) -> usize;
    /// Calls `f` with run `i`'s key rows and value rows (`i < count()`): lent for the
    /// call, so a source may form or convert them on demand.
    fn with_run<R>(&self, i: usize, f: impl FnOnce(Rows<'_>, Rows<'_>) -> R) -> R;
}

impl KvRuns for [(Rows<'_>, Rows<'_>)] {
    fn count(&self) -> usize {
        self.len()
    }

    fn with_run<R>(&self, i: usize, f: impl FnOnce(Rows<'_>, Rows<'_>) -> R) -> R {
        f(self[i].0, self[i].1)
    }
}

impl KvRuns for Vec<(Rows<'_>, Rows<'_>)> {
    fn count(&self) -> usize {
        self.as_slice().count()
    }

    fn with_run<R>(&self, i: usize, f: impl FnOnce(Rows<'_>, Rows<'_>) -> R) -> R {
        self.as_slice().with_run(i, f)
    }
}

/// Multiply-adds below which one attention call runs on the calling thread: spreading a
/// decode row's dozen heads over the pool costs more than it saves.
const PARALLEL_ATTENTION_WORK: usize = 1 << 18;

/// Query rows attended together: each key and value row is read once for the whole tile.
const ATTENTION_TILE: usize = 8;

/// Rows ahead of the one being read that are prefetched: K/V rows are a few KiB, their
/// pages scattered over the pool, which the hardware prefetcher does not follow.
const PREFETCH_ROWS: usize = 2;

/// Causal attention of `n` new rows at positions `start..start + n` over the keys and
/// values of positions `0..start + n`, stored in `runs` of `(keys, values)` with rows of
/// `row_len` (`n_kv_heads × head_dim`) elements, already holding the new rows. `q` is
/// `n × (n_heads·head_dim)`, pre-scaled by `1/√head_dim`; the result goes to `out`, same
/// shape.
///
/// For each row (at position `p`) and head, in this order: the scores of positions
/// `0..=p` by [`crate::dot`], their maximum, `exp(score − max)` by
/// [`crate::reference::exp`] summed in position order,
/// the values weighted and summed in position order ([`crate::reference::axpy`]), then
/// divided by the sum. Rows are taken in tiles, and each key and value row is read once
/// per tile, every head at a time (one pass over the cache).
pub fn attention<R: KvRuns + ?Sized>(
    q: &[f32],
    runs: &R,
    row_len: usize,
    start: usize,
    shape: AttentionShape,
    out: &mut [f32],
) {
    struct Attention<'a, R: ?Sized> {
        q: &'a [f32],
        runs: &'a R,
        row_len: usize,
        start: usize,
        shape: AttentionShape,
        out: &'a mut [f32],
    }
    impl<R: KvRuns + ?Sized> Dispatch<()> for Attention<'_, R> {
        fn run<O: Ops>(self, ops: O) {
            attention_with(
                ops,
                self.q,
                self.runs,
                self.row_len,
                self.start,
                self.shape,
                self.out,
            )
        }
    }
    with_ops(Attention {
        q,
        runs,
        row_len,
        start,
        shape,
        out,
    })
}

pub(crate) fn attention_with<O: Ops, R: KvRuns + ?Sized>(
    ops: O,
    q: &[f32],
    runs: &R,
    row_len: usize,
    start: usize,
    shape: AttentionShape,
    out: &mut [f32],
) {
    let width = shape.n_heads * shape.head_dim;
    let rows = out.len() / width.max(1);
    let tile = |(index, o): (usize, &mut [f32])| {
        let first = index * ATTENTION_TILE;
        let count = o.len() / width;
        let q = &q[first * width..(first + count) * width];
        ops.vectorize(
            #[inline(always)]
            || attend_tile(ops, q, runs, row_len, start + first, shape, o),
        )
    };
    let work = rows * width * (start + rows);
    let parallel = work >= PARALLEL_ATTENTION_WORK && rows >= 2;
    for_each_chunk(out, ATTENTION_TILE * width, parallel, tile);
}

/// What one tile's pass over the keys needs.
struct Tile<'a> {
    q: &'a [f32],
    shape: AttentionShape,
    row_len: usize,
    /// Position of the tile's first row.
    first: usize,
    rows: usize,
    /// Positions attended by the tile's last row (`first + rows`).
    len: usize,
    /// Where query head `h`'s key/value head starts in a K/V row (no division per pair).
    kv_at: Scratch<usize>,
}

impl Tile<'_> {
    /// The layout of a run of K/V rows for the decode primitives.
    fn run_shape(&self) -> RunShape<'_> {
        RunShape {
            row_len: self.row_len,
            hd: self.shape.head_dim,
            kv_at: &self.kv_at,
        }
    }
}

/// [`attention`] of the rows of one tile, the first at position `first`.
#[inline(always)]
fn attend_tile<O: Ops, R: KvRuns + ?Sized>(
    ops: O,
    q: &[f32],
    runs: &R,
    row_len: usize,
    first: usize,
    shape: AttentionShape,
    out: &mut [f32],
) {
    let n_heads = shape.n_heads;
    let width = n_heads * shape.head_dim;
    let rows = out.len() / width;
    let group = (n_heads / shape.n_kv_heads.max(1)).max(1);
    let tile = Tile {
        q,
        shape,
        row_len,
        first,
        rows,
        len: first + rows,
        kv_at: {
            let mut kv_at = Scratch::<usize>::overwritten(n_heads);
            for (h, at) in kv_at.iter_mut().enumerate() {
                *at = (h / group) * shape.head_dim;
            }
            kv_at
        },
    };
    let len = tile.len;
    // scores[j·pairs + t·heads + h]: position j, row t, head h (j ≤ first + t); one
    // position's scores are adjacent, as both passes over the keys write and read them.
    let pairs = rows * n_heads;
    let mut scores = Scratch::<f32>::overwritten(len * pairs);
    let mut j = 0;
    for i in 0..runs.count() {
        if j >= len {
            break;
        }
        j = runs.with_run(i, |keys, _| match keys {
            Rows::F32(k) => score_run(ops, &tile, k, j, &mut scores),
            Rows::F16(k) => score_run(ops, &tile, k, j, &mut scores),
        });
    }
    // Position by position, every (row, head) maximum and sum advancing together: each
    // sum is still in position order, but the chains are independent (no add waits on the
    // one before), and a position's scores are adjacent. Row t attends positions up to
    // first + t.
    let attended = |j: usize| j.saturating_sub(first) * n_heads..pairs;
    let mut max = Scratch::filled(pairs, f32::NEG_INFINITY);
    for j in 0..len {
        let at = attended(j);
        ops.max_assign(
            &mut max[at.clone()],
            &scores[j * pairs..(j + 1) * pairs][at],
        );
    }
    let mut sums = Scratch::<f32>::zeroed(pairs);
    for j in 0..len {
        let at = attended(j);
        let row = &mut scores[j * pairs..(j + 1) * pairs][at.clone()];
        ops.exp_sums(row, &max[at.clone()], &mut sums[at]);
    }
    out.fill(0.0);
    let mut j = 0;
    for i in 0..runs.count() {
        if j >= len {
            break;
        }
        j = runs.with_run(i, |_, values| match values {
            Rows::F32(v) => weigh_run(ops, &tile, v, j, &scores, out),
            Rows::F16(v) => weigh_run(ops, &tile, v, j, &scores, out),
        });
    }
    let hd = shape.head_dim;
    for t in 0..rows {
        for h in 0..n_heads {
            let sum = sums[t * n_heads + h];
            for acc in &mut out[t * width + h * hd..t * width + (h + 1) * hd] {
                *acc /= sum;
            }
        }
    }
}

/// Scores of the tile's rows against the keys of one run, whose first row is position
/// `j`; returns the position after the last one used.
#[inline(always)]
fn score_run<O: Ops, E: Elem>(
    ops: O,
    tile: &Tile<'_>,
    keys: &[E],
    j: usize,
    scores: &mut [f32],
) -> usize {
    let n_heads = tile.shape.n_heads;
    let hd = tile.shape.head_dim;
    let width = n_heads * hd;
    if tile.rows == 1 {
        // A decode row: every head's scores of the run's rows in one call.
        let count = (keys.len() / tile.row_len).min(tile.len - j);
        let out = &mut scores[j * n_heads..(j + count) * n_heads];
        E::head_dots(
            ops,
            tile.q,
            &keys[..count * tile.row_len],
            tile.run_shape(),
            out,
        );
        return j + count;
    }
    each_row(ops, tile, keys, j, |j, key| {
        let at = j * tile.rows * n_heads;
        for t in j.saturating_sub(tile.first)..tile.rows {
            let qt = &tile.q[t * width..(t + 1) * width];
            let q = |h: usize| &qt[h * hd..(h + 1) * hd];
            let k = |h: usize| &key[tile.kv_at[h]..tile.kv_at[h] + hd];
            let out = &mut scores[at + t * n_heads..at + (t + 1) * n_heads];
            // Eight heads, then four, at a time: their dependency chains interleaved.
            let mut h = 0;
            while h + 8 <= n_heads {
                let s = E::dot_pairs8(
                    ops,
                    std::array::from_fn(|i| q(h + i)),
                    std::array::from_fn(|i| k(h + i)),
                );
                out[h..h + 8].copy_from_slice(&s);
                h += 8;
            }
            while h + 4 <= n_heads {
                let s = E::dot_pairs(
                    ops,
                    [q(h), q(h + 1), q(h + 2), q(h + 3)],
                    [k(h), k(h + 1), k(h + 2), k(h + 3)],
                );
                out[h..h + 4].copy_from_slice(&s);
                h += 4;
            }
            for (h, o) in out.iter_mut().enumerate().skip(h) {
                *o = E::dot(ops, q(h), k(h));
            }
        }
    })
}

/// Adds the values of one run, whose first row is position `j`, weighted by the tile's
/// normalised scores; returns the position after the last one used.
#[inline(always)]
fn weigh_run<O: Ops, E: Elem>(
    ops: O,
    tile: &Tile<'_>,
    values: &[E],
    j: usize,
    scores: &[f32],
    out: &mut [f32],
) -> usize {
    let n_heads = tile.shape.n_heads;
    let hd = tile.shape.head_dim;
    let width = n_heads * hd;
    if tile.rows == 1 {
        // A decode row: the run's values added straight into its output, no gather.
        let count = (values.len() / tile.row_len).min(tile.len - j);
        let weights = &scores[j * n_heads..(j + count) * n_heads];
        let values = &values[..count * tile.row_len];
        E::head_axpy(ops, out, weights, values, tile.run_shape());
        return j + count;
    }
    each_row(ops, tile, values, j, |j, value| {
        let t0 = j.saturating_sub(tile.first);
        let count = tile.rows - t0;
        for h in 0..n_heads {
            let at = tile.kv_at[h];
            // Every row of the tile from t0 takes this head's value once, widened once.
            let mut weights = [0f32; ATTENTION_TILE];
            for (i, w) in weights[..count].iter_mut().enumerate() {
                *w = scores[j * tile.rows * n_heads + (t0 + i) * n_heads + h];
            }
            E::axpy_rows(
                ops,
                &mut out[t0 * width + h * hd..],
                width,
                &weights[..count],
                &value[at..at + hd],
            );
        }
    })
}

/// Calls `f(position, row)` for the rows of one run from position `j` up to the tile's
/// last, prefetching a few rows ahead; returns the position after the last one used.
#[inline(always)]
fn each_row<O: Ops, E: Elem>(
    ops: O,
    tile: &Tile<'_>,
    run: &[E],
    mut j: usize,
    mut f: impl FnMut(usize, &[E]),
) -> usize {
    let run_start = j;
    for row in run.chunks_exact(tile.row_len) {
        if j >= tile.len {
            break;
        }
        let ahead = (j - run_start + PREFETCH_ROWS) * tile.row_len;
        if ahead + tile.row_len <= run.len() && j + PREFETCH_ROWS < tile.len {
            ops.prefetch(&run[ahead..ahead + tile.row_len]);
        }
        f(j, row);
        j += 1;
    }
    j
}
