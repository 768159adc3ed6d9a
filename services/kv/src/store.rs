//! The KV store contract between the model forward and KV memory, and a contiguous
//! implementation (one growing buffer per layer) for single sequences and baselines.

use std::borrow::Cow;

use candle_core::{Device, Tensor};

use crate::error::KvError;

/// Shape of one sequence's KV cache: per layer, per position, `n_kv_heads × head_dim`
/// keys and as many values (f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    /// Transformer layers.
    pub n_layers: usize,
    /// Key/value heads (grouped-query attention may have fewer than query heads).
    pub n_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
}

impl KvShape {
    /// f32 values per position per layer for K (and as many for V).
    pub fn row_len(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// Where one sequence's keys and values live (shared across the threads of a step, hence
/// `Send + Sync`). The forward calls, for each layer,
/// [`KvStore::write_rows`] for the new positions and then [`KvStore::view`] to attend over
/// everything up to them.
///
/// Contract: `reserve(n)` before a forward that ends at position `n` (it may fail with
/// [`KvError::OutOfBlocks`], leaving the store unchanged); `write_rows(layer, start, k, v)`
/// with `k`, `v` holding `count` rows of `n_kv_heads × head_dim` f32 stores positions
/// `start..start+count`; `view(layer, len, f)` lends positions `0..len` to `f` in place.
/// `len()` counts positions written in every layer (the forward bumps it with `commit`);
/// a write at `start` below `len()` un-commits the positions from `start` until the next
/// `commit`. The tensor forms [`KvStore::write`] and [`KvStore::read`] are conveniences on
/// top of these.
pub trait KvStore: Send + Sync {
    /// The cache's shape.
    fn shape(&self) -> KvShape;
    /// Positions complete in every layer.
    fn len(&self) -> usize;
    /// Whether nothing is stored.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Makes room for positions `0..total`.
    fn reserve(&mut self, total: usize) -> Result<(), KvError>;
    /// Stores K and V rows of `layer` for positions `start..start+count`
    /// (`k.len() == v.len() == count × row_len`).
    fn write_rows(
        &mut self,
        layer: usize,
        start: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvError>;
    /// Lends K and V of `layer` for positions `0..len` to `f`, without copying where the
    /// storage allows.
    fn view(&self, layer: usize, len: usize, f: &mut dyn FnMut(&KvView<'_>))
        -> Result<(), KvError>;
    /// Declares positions `0..len` complete in every layer.
    fn commit(&mut self, len: usize) -> Result<(), KvError>;
    /// Forgets positions `len..` (the next forward recomputes them).
    fn truncate(&mut self, len: usize);

    /// [`KvStore::write_rows`] from tensors of shape `[count, n_kv_heads, head_dim]`.
    fn write(&mut self, layer: usize, start: usize, k: &Tensor, v: &Tensor) -> Result<(), KvError> {
        let shape = self.shape();
        let (count, k) = rows_of(shape, k, "k")?;
        let (v_count, v) = rows_of(shape, v, "v")?;
        if count != v_count {
            return Err(KvError::Shape(format!("{count} keys but {v_count} values")));
        }
        self.write_rows(layer, start, &k, &v)
    }

    /// K and V of `layer` for positions `0..len` as two `[len, n_kv_heads, head_dim]`
    /// tensors on `device` (a copy).
    fn read(&self, layer: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor), KvError> {
        let shape = self.shape();
        let row = shape.row_len();
        let (mut keys, mut values) = (Vec::with_capacity(len * row), Vec::with_capacity(len * row));
        self.view(layer, len, &mut |view| {
            for pos in 0..view.len() {
                keys.extend_from_slice(&view.key(pos));
                values.extend_from_slice(&view.value(pos));
            }
        })?;
        let dims = (len, shape.n_kv_heads, shape.head_dim);
        Ok((
            Tensor::from_vec(keys, dims, device)?,
            Tensor::from_vec(values, dims, device)?,
        ))
    }
}

/// How a store keeps K/V elements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDtype {
    /// 4 bytes an element: exactly what the forward computed.
    #[default]
    F32,
    /// 2 bytes an element (IEEE half, rounded to nearest even): half the memory and the
    /// bandwidth attention reads; the forward reads the values back as f32.
    F16,
}

impl KvDtype {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }

    pub(crate) fn code(self) -> u64 {
        match self {
            KvDtype::F32 => 0,
            KvDtype::F16 => 1,
        }
    }

    pub(crate) fn from_code(code: u64) -> Option<Self> {
        match code {
            0 => Some(KvDtype::F32),
            1 => Some(KvDtype::F16),
            _ => None,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            other => Err(format!("unknown K/V type `{other}` (f32 or f16)")),
        }
    }
}

/// One run of K or V rows, as stored.
#[derive(Debug)]
pub enum KvRows<'a> {
    /// f32 rows.
    F32(Cow<'a, [f32]>),
    /// f16 rows.
    F16(Cow<'a, [half::f16]>),
}

impl<'a> KvRows<'a> {
    /// Elements in the run.
    pub fn len(&self) -> usize {
        match self {
            KvRows::F32(r) => r.len(),
            KvRows::F16(r) => r.len(),
        }
    }

    /// Whether the run is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` with each row of `row_len` elements as f32, in order, until it returns
    /// `false`. f16 rows are widened into one scratch row (exact: every f16 is an f32).
    pub fn for_each_row(&self, row_len: usize, f: &mut dyn FnMut(&[f32]) -> bool) {
        match self {
            KvRows::F32(rows) => {
                for row in rows.chunks_exact(row_len) {
                    if !f(row) {
                        return;
                    }
                }
            }
            KvRows::F16(rows) => {
                use half::slice::HalfFloatSliceExt;
                let mut wide = vec![0f32; row_len];
                for row in rows.chunks_exact(row_len) {
                    row.convert_to_f32_slice(&mut wide);
                    if !f(&wide) {
                        return;
                    }
                }
            }
        }
    }

    /// Row `i` (of `row_len` elements) as f32.
    pub fn row(&self, i: usize, row_len: usize) -> Cow<'_, [f32]> {
        self.borrowed().into_row(i, row_len)
    }

    /// [`KvRows::row`], keeping a borrowed run's lifetime.
    pub fn into_row(self, i: usize, row_len: usize) -> Cow<'a, [f32]> {
        let at = i * row_len..(i + 1) * row_len;
        match self {
            KvRows::F32(Cow::Borrowed(rows)) => Cow::Borrowed(&rows[at]),
            KvRows::F32(Cow::Owned(rows)) => Cow::Owned(rows[at].to_vec()),
            KvRows::F16(rows) => Cow::Owned(rows[at].iter().map(|x| x.to_f32()).collect()),
        }
    }

    /// The same rows, borrowed.
    pub fn borrowed(&self) -> KvRows<'_> {
        match self {
            KvRows::F32(rows) => KvRows::F32(Cow::Borrowed(rows)),
            KvRows::F16(rows) => KvRows::F16(Cow::Borrowed(rows)),
        }
    }
}

impl<'a> From<Cow<'a, [f32]>> for KvRows<'a> {
    fn from(rows: Cow<'a, [f32]>) -> Self {
        KvRows::F32(rows)
    }
}

/// Positions `0..len` of one layer's keys and values, lent in place: runs of consecutive
/// positions (one per block of a paged store), each a slice of rows. Runs are formed on
/// demand from where the store keeps them, so lending a view allocates nothing.
#[derive(Debug)]
pub struct KvView<'a> {
    row: usize,
    run: usize,
    len: usize,
    source: RunSource<'a>,
}

/// Where a view's runs come from.
#[derive(Debug)]
enum RunSource<'a> {
    /// Given run by run.
    Given {
        keys: Vec<KvRows<'a>>,
        values: Vec<KvRows<'a>>,
    },
    /// One run each of keys and values, f32.
    Contiguous { keys: &'a [f32], values: &'a [f32] },
    /// The blocks of a paged store.
    Blocks(crate::paged::BlockRuns<'a>),
}

impl<'a> KvView<'a> {
    /// A view of `len` positions stored in runs of `run` positions (the last may be
    /// shorter); `keys[i]` and `values[i]` hold run `i`'s rows of `row` elements each.
    pub fn new(
        row: usize,
        run: usize,
        len: usize,
        keys: Vec<KvRows<'a>>,
        values: Vec<KvRows<'a>>,
    ) -> Self {
        Self {
            row,
            run: run.max(1),
            len,
            source: RunSource::Given { keys, values },
        }
    }

    /// A view of `len` positions held in one run of f32 rows each.
    pub(crate) fn contiguous(row: usize, len: usize, keys: &'a [f32], values: &'a [f32]) -> Self {
        Self {
            row,
            run: len.max(1),
            len,
            source: RunSource::Contiguous { keys, values },
        }
    }

    /// A view of a paged store's blocks.
    pub(crate) fn blocks(
        row: usize,
        run: usize,
        len: usize,
        blocks: crate::paged::BlockRuns<'a>,
    ) -> Self {
        Self {
            row,
            run: run.max(1),
            len,
            source: RunSource::Blocks(blocks),
        }
    }

    /// Positions in view.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is in view.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of runs.
    pub fn run_count(&self) -> usize {
        match &self.source {
            RunSource::Given { keys, .. } => keys.len(),
            RunSource::Contiguous { .. } => usize::from(self.len > 0),
            RunSource::Blocks(_) => self.len.div_ceil(self.run),
        }
    }

    /// Run `i`'s key rows and value rows (whole rows; a run may hold rows past `len()`,
    /// which callers stop before). Borrowed in place wherever the store's bytes allow.
    pub fn run(&self, i: usize) -> (KvRows<'_>, KvRows<'_>) {
        match &self.source {
            RunSource::Given { keys, values } => (keys[i].borrowed(), values[i].borrowed()),
            RunSource::Contiguous { keys, values } => (
                KvRows::F32(Cow::Borrowed(keys)),
                KvRows::F32(Cow::Borrowed(values)),
            ),
            RunSource::Blocks(blocks) => blocks.run(i),
        }
    }

    /// The key row (`n_kv_heads × head_dim`) of position `pos`, as f32.
    pub fn key(&self, pos: usize) -> Cow<'_, [f32]> {
        self.run(pos / self.run)
            .0
            .into_row(pos % self.run, self.row)
    }

    /// The value row of position `pos`, as f32.
    pub fn value(&self, pos: usize) -> Cow<'_, [f32]> {
        self.run(pos / self.run)
            .1
            .into_row(pos % self.run, self.row)
    }

    /// The runs in position order (see [`KvView::run`]).
    pub fn runs(&self) -> impl Iterator<Item = (KvRows<'_>, KvRows<'_>)> + '_ {
        (0..self.run_count()).map(|i| self.run(i))
    }

    /// Floats per row (`n_kv_heads × head_dim`).
    pub fn row_len(&self) -> usize {
        self.row
    }
}

/// One growing f32 buffer per layer for K and for V.
#[derive(Clone, Debug)]
pub struct ContiguousKv {
    shape: KvShape,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
}

impl ContiguousKv {
    /// An empty cache of this shape.
    pub fn new(shape: KvShape) -> Self {
        Self {
            shape,
            keys: vec![Vec::new(); shape.n_layers],
            values: vec![Vec::new(); shape.n_layers],
            len: 0,
        }
    }
}

/// Checks that `k` and `v` hold the same whole number of rows of `row` f32.
pub(crate) fn check_rows(row: usize, k: &[f32], v: &[f32]) -> Result<usize, KvError> {
    if row == 0 || !k.len().is_multiple_of(row) || k.len() != v.len() {
        return Err(KvError::Shape(format!(
            "{} key and {} value floats are not whole rows of {row}",
            k.len(),
            v.len()
        )));
    }
    Ok(k.len() / row)
}

pub(crate) fn rows_of(
    shape: KvShape,
    tensor: &Tensor,
    what: &str,
) -> Result<(usize, Vec<f32>), KvError> {
    let dims = tensor.dims();
    if dims.len() != 3 || dims[1] != shape.n_kv_heads || dims[2] != shape.head_dim {
        return Err(KvError::Shape(format!(
            "{what} has shape {dims:?}, expected [_, {}, {}]",
            shape.n_kv_heads, shape.head_dim
        )));
    }
    let flat = tensor
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((dims[0], flat))
}

impl KvStore for ContiguousKv {
    fn shape(&self) -> KvShape {
        self.shape
    }

    fn len(&self) -> usize {
        self.len
    }

    fn reserve(&mut self, total: usize) -> Result<(), KvError> {
        let want = total * self.shape.row_len();
        for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
            buf.reserve(want.saturating_sub(buf.len()));
        }
        Ok(())
    }

    fn write_rows(
        &mut self,
        layer: usize,
        start: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvError> {
        let row = self.shape.row_len();
        if layer >= self.shape.n_layers {
            return Err(KvError::OutOfRange(format!("layer {layer}")));
        }
        check_rows(row, k, v)?;
        // Rewritten positions are not complete in every layer until the next commit.
        self.len = self.len.min(start);
        for (buf, data) in [(&mut self.keys[layer], k), (&mut self.values[layer], v)] {
            if buf.len() < start * row {
                return Err(KvError::OutOfRange(format!(
                    "write at {start} leaves a gap (have {})",
                    buf.len() / row
                )));
            }
            buf.truncate(start * row);
            buf.extend_from_slice(data);
        }
        Ok(())
    }

    fn view(
        &self,
        layer: usize,
        len: usize,
        f: &mut dyn FnMut(&KvView<'_>),
    ) -> Result<(), KvError> {
        let row = self.shape.row_len();
        if layer >= self.shape.n_layers {
            return Err(KvError::OutOfRange(format!("layer {layer}")));
        }
        let (keys, values) = (&self.keys[layer], &self.values[layer]);
        if keys.len() < len * row {
            return Err(KvError::OutOfRange(format!(
                "read of {len} positions, {} written",
                keys.len() / row
            )));
        }
        f(&KvView::contiguous(
            row,
            len,
            &keys[..len * row],
            &values[..len * row],
        ));
        Ok(())
    }

    fn commit(&mut self, len: usize) -> Result<(), KvError> {
        self.len = len;
        Ok(())
    }

    fn truncate(&mut self, len: usize) {
        let row = self.shape.row_len();
        for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
            buf.truncate(len * row);
        }
        self.len = self.len.min(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_then_reads_back_in_order() {
        let shape = KvShape {
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 3,
        };
        let mut kv = ContiguousKv::new(shape);
        let dev = Device::Cpu;
        let k = Tensor::arange(0f32, 12., &dev)
            .unwrap()
            .reshape((2, 2, 3))
            .unwrap();
        let v = (k.clone() * 10.).unwrap();
        kv.reserve(3).unwrap();
        kv.write(1, 0, &k, &v).unwrap();
        let k1 = Tensor::full(7f32, (1, 2, 3), &dev).unwrap();
        kv.write(1, 2, &k1, &k1).unwrap();
        kv.commit(3).unwrap();
        let (rk, rv) = kv.read(1, 3, &dev).unwrap();
        let rk = rk.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(
            &rk[..12],
            (0..12).map(|x| x as f32).collect::<Vec<_>>().as_slice()
        );
        assert_eq!(&rk[12..], &[7.0; 6]);
        assert_eq!(rv.dims(), &[3, 2, 3]);
        assert!(kv.write(0, 5, &k, &v).is_err(), "gap");
        kv.truncate(1);
        assert_eq!(kv.len(), 1);
        assert!(kv.read(1, 2, &dev).is_err());
    }
}
