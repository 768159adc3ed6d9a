//! The KV store contract between the model forward and KV memory, and a contiguous
//! implementation (one growing buffer per layer) for single sequences and baselines.

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

/// Where one sequence's keys and values live. The forward calls, for each layer, `write`
/// for the new positions and then `read` for everything up to them.
///
/// Contract: `reserve(n)` before a forward that ends at position `n` (it may fail with
/// [`KvError::OutOfBlocks`], leaving the store unchanged); `write(layer, start, k, v)` with
/// `k`, `v` of shape `[count, n_kv_heads, head_dim]` (f32, any device) stores positions
/// `start..start+count`; `read(layer, len, device)` returns positions `0..len` as two
/// tensors of shape `[len, n_kv_heads, head_dim]` on `device`. `len()` counts positions
/// written in every layer (the forward bumps it with `commit`); a write at `start` below
/// `len()` un-commits the positions from `start` until the next `commit`.
pub trait KvStore {
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
    /// Stores K and V of `layer` for positions `start..start+count`.
    fn write(&mut self, layer: usize, start: usize, k: &Tensor, v: &Tensor) -> Result<(), KvError>;
    /// K and V of `layer` for positions `0..len`.
    fn read(&self, layer: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor), KvError>;
    /// Declares positions `0..len` complete in every layer.
    fn commit(&mut self, len: usize) -> Result<(), KvError>;
    /// Forgets positions `len..` (the next forward recomputes them).
    fn truncate(&mut self, len: usize);
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

    fn write(&mut self, layer: usize, start: usize, k: &Tensor, v: &Tensor) -> Result<(), KvError> {
        let row = self.shape.row_len();
        if layer >= self.shape.n_layers {
            return Err(KvError::OutOfRange(format!("layer {layer}")));
        }
        let (count, k) = rows_of(self.shape, k, "k")?;
        let (v_count, v) = rows_of(self.shape, v, "v")?;
        if count != v_count {
            return Err(KvError::Shape(format!("{count} keys but {v_count} values")));
        }
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
            buf.extend_from_slice(&data);
        }
        Ok(())
    }

    fn read(&self, layer: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor), KvError> {
        let row = self.shape.row_len();
        let (keys, values) = (&self.keys[layer], &self.values[layer]);
        if keys.len() < len * row {
            return Err(KvError::OutOfRange(format!(
                "read of {len} positions, {} written",
                keys.len() / row
            )));
        }
        let dims = (len, self.shape.n_kv_heads, self.shape.head_dim);
        Ok((
            Tensor::from_slice(&keys[..len * row], dims, device)?,
            Tensor::from_slice(&values[..len * row], dims, device)?,
        ))
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
