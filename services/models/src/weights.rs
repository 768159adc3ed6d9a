//! In-memory weights of a Llama-family model, independent of the file format, and the
//! fusion of projections that share an input (q/k/v, gate/up) into one matmul.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use llmos_cpu_kernels::{Q4Format, Q4Matrix, Q8Format, Q8Matrix};

use crate::error::Result;

/// One projection weight `[out, in]` as loaded, before fusion.
pub(crate) enum RawLinear<'a> {
    /// A float matrix (f32, f16 or bf16, as stored) on the target device.
    Dense(Tensor),
    /// A GGML block-quantized matrix: its raw blocks (borrowed from the file's map),
    /// row-major, `rows × cols`.
    Quant {
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        bytes: Cow<'a, [u8]>,
    },
}

impl RawLinear<'_> {
    /// The projection for this weight alone.
    pub(crate) fn into_linear(self, device: &Device) -> Result<Linear> {
        match self {
            RawLinear::Dense(t) => Linear::dense(&t),
            RawLinear::Quant {
                dtype,
                rows,
                cols,
                bytes,
            } => Linear::quant(dtype, rows, cols, bytes, device),
        }
    }
}

/// A projection `y = x · Wᵀ`, batch-invariant: row `r` of the result depends only on row
/// `r` of the input, never on the other rows of the call (see [`crate::kernels`]).
#[derive(Clone, Debug)]
pub(crate) enum Linear {
    /// A float matrix `[out, in]`, computed by our own kernel ([`crate::kernels::matmul_t`]):
    /// candle's gemm sums in another order for one row (and, for small outputs, for up to
    /// four rows) than for many.
    Dense {
        /// Row-major `[out, in]` (f32 shared with the embedding when tied).
        w: DenseWeights,
        /// Output width.
        out: usize,
    },
    /// GGML blocks through candle's quantized matmul, whose result for a row does not
    /// depend on the other rows except through the paths it picks by row count: it is
    /// called with at least two rows (one row takes another path for q6_K) and at most
    /// [`QUANT_MAX_ROWS`] per call for q4_K (more rows take an AMX path where the CPU has
    /// it). Checked bit for bit by the batch-invariance tests.
    Quant { matmul: QMatMul, dtype: GgmlDType },
    /// q8_0 or q6_K blocks through our own kernel ([`llmos_cpu_kernels::Q8Matrix`]:
    /// int8 weights, AVX-512 VNNI or AVX2, activations quantised per block of 32,
    /// batch-invariant by construction), where the CPU has one.
    Q8(Arc<llmos_cpu_kernels::Q8Matrix>),
    /// q4_0, q4_1 or q4_K blocks through our own kernel ([`llmos_cpu_kernels::Q4Matrix`]:
    /// weights kept as nibbles), where the CPU has one.
    Q4(Arc<llmos_cpu_kernels::Q4Matrix>),
}

/// A float matrix's elements, at the width they were stored in: f16 and bf16 stay 16-bit
/// (half the bytes to stream per token), widened exactly in the kernel's registers.
#[derive(Clone, Debug)]
pub(crate) enum DenseWeights {
    F32(Arc<Vec<f32>>),
    F16(Arc<Vec<llmos_cpu_kernels::f16>>),
    BF16(Arc<Vec<llmos_cpu_kernels::bf16>>),
}

/// Which of our own quantized kernels reads a GGML type.
enum OwnFormat {
    Q8(Q8Format),
    Q4(Q4Format),
}

/// Our kernel for `dtype` where it runs here (a CPU with AVX2), else `None` (candle's).
fn own_format(dtype: GgmlDType, device: &Device) -> Option<OwnFormat> {
    if !device.is_cpu() || !llmos_cpu_kernels::quantized_accelerated() {
        return None;
    }
    Some(match dtype {
        GgmlDType::Q8_0 => OwnFormat::Q8(Q8Format::Q8_0),
        GgmlDType::Q6K => OwnFormat::Q8(Q8Format::Q6K),
        GgmlDType::Q4_0 => OwnFormat::Q4(Q4Format::Q4_0),
        GgmlDType::Q4_1 => OwnFormat::Q4(Q4Format::Q4_1),
        GgmlDType::Q4K => OwnFormat::Q4(Q4Format::Q4K),
        _ => return None,
    })
}

/// Rows per call of a q4_K matmul (see [`Linear::Quant`]).
const QUANT_MAX_ROWS: usize = 31;

impl Linear {
    /// A dense projection from a float tensor `[out, in]`.
    pub(crate) fn dense(t: &Tensor) -> Result<Linear> {
        let (out, _) = t.dims2()?;
        let w = match t.dtype() {
            DType::F16 => DenseWeights::F16(Arc::new(t.flatten_all()?.to_vec1()?)),
            DType::BF16 => DenseWeights::BF16(Arc::new(t.flatten_all()?.to_vec1()?)),
            _ => DenseWeights::F32(Arc::new(to_f32(t.clone())?.flatten_all()?.to_vec1()?)),
        };
        Ok(Linear::Dense { w, out })
    }

    /// A projection over GGML blocks of `dtype`, `rows × cols`: our own kernel where it
    /// runs ([`own_format`]), else candle's (the caller checks [`aligned_for`] for it).
    pub(crate) fn quant(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        bytes: Cow<'_, [u8]>,
        device: &Device,
    ) -> Result<Linear> {
        let invalid = |e: llmos_cpu_kernels::QuantError| {
            crate::error::ModelError::InvalidInput(e.to_string())
        };
        match own_format(dtype, device) {
            Some(OwnFormat::Q8(format)) => Ok(Linear::Q8(Arc::new(
                Q8Matrix::from_ggml(format, &bytes, rows, cols).map_err(invalid)?,
            ))),
            Some(OwnFormat::Q4(format)) => Ok(Linear::Q4(Arc::new(
                Q4Matrix::from_ggml(format, &bytes, rows, cols).map_err(invalid)?,
            ))),
            None => Ok(Linear::Quant {
                matmul: QMatMul::from_arc(Arc::new(qtensor(dtype, rows, cols, bytes, device)?))?,
                dtype,
            }),
        }
    }

    /// A dense projection sharing `w` (`[out, in]` row-major).
    pub(crate) fn shared(w: Arc<Vec<f32>>, out: usize) -> Linear {
        Linear::Dense {
            w: DenseWeights::F32(w),
            out,
        }
    }

    /// `x · Wᵀ` for `x` of `rows × in` (row-major): `rows × out`, row-major.
    #[cfg(test)]
    pub(crate) fn forward_rows(&self, x: &[f32], rows: usize, device: &Device) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.forward_into(x, rows, device, &mut out)?;
        Ok(out)
    }

    /// `x · Wᵀ` into `out`, resized to `rows × out` (our kernels write it in place: no
    /// allocation once `out` has the capacity; candle's path copies its result in).
    pub(crate) fn forward_into(
        &self,
        x: &[f32],
        rows: usize,
        device: &Device,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        match self {
            Linear::Dense {
                w: DenseWeights::F32(w),
                out: n,
            } => crate::kernels::matmul_t_into(x, rows, w, *n, sized(out, rows * n)),
            Linear::Dense {
                w: DenseWeights::F16(w),
                out: n,
            } => crate::kernels::matmul_t_f16_into(x, rows, w, *n, sized(out, rows * n)),
            Linear::Dense {
                w: DenseWeights::BF16(w),
                out: n,
            } => crate::kernels::matmul_t_bf16_into(x, rows, w, *n, sized(out, rows * n)),
            Linear::Q8(m) => m.matmul_t_into(x, rows, sized(out, rows * m.n())),
            Linear::Q4(m) => m.matmul_t_into(x, rows, sized(out, rows * m.n())),
            Linear::Quant { matmul, dtype } => {
                let k = x.len() / rows.max(1);
                let x = Tensor::from_slice(x, (rows, k), device)?;
                let y = candle_forward(matmul, *dtype, &x, rows)?;
                out.clear();
                out.extend_from_slice(&to_f32(y)?.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }
}

/// `v` as a slice of `len` elements: grown with zeros or cut, its capacity kept (what is
/// left in it is overwritten by the caller).
pub(crate) fn sized(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    v.resize(len, 0.0);
    v
}

/// candle's quantized matmul, called so that a row's result never depends on the batch:
/// never one row alone (another path), q4_K in calls of at most [`QUANT_MAX_ROWS`].
fn candle_forward(matmul: &QMatMul, dtype: GgmlDType, x: &Tensor, rows: usize) -> Result<Tensor> {
    if rows == 1 {
        let twice = Tensor::cat(&[x, x], 0)?;
        return Ok(matmul.forward(&twice)?.narrow(0, 0, 1)?);
    }
    if dtype == GgmlDType::Q4K && rows > QUANT_MAX_ROWS {
        let mut parts = Vec::new();
        let mut start = 0;
        while start < rows {
            // Never a one-row tail: it would take the one-row path.
            let mut n = QUANT_MAX_ROWS.min(rows - start);
            if rows - start - n == 1 {
                n -= 1;
            }
            parts.push(matmul.forward(&x.narrow(0, start, n)?)?);
            start += n;
        }
        return Ok(Tensor::cat(&parts, 0)?);
    }
    Ok(matmul.forward(x)?)
}

/// True when `bytes` may be handed to candle as blocks of `dtype` without tripping its
/// alignment assertion (a panic, not an error, inside candle).
pub(crate) fn aligned_for(dtype: GgmlDType, bytes: &[u8]) -> bool {
    let align = match dtype {
        GgmlDType::F32 | GgmlDType::Q8K => 4,
        _ => 2,
    };
    (bytes.as_ptr() as usize).is_multiple_of(align)
}

/// A `QTensor` of shape `[rows, cols]` from raw GGML blocks.
/// The caller checks [`aligned_for`] first.
pub(crate) fn qtensor(
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    bytes: Cow<'_, [u8]>,
    device: &Device,
) -> Result<QTensor> {
    let storage = QStorage::from_data(bytes, device, dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

/// Several projections of the same input, computed as one matmul when they can be fused
/// (one weight read, one kernel launch) and split again by column ranges afterwards.
#[derive(Clone, Debug)]
pub(crate) enum Fused {
    /// One matmul; its output columns are the parts' outputs, in order.
    One(Linear),
    /// Separate matmuls (the parts have different storage types).
    Many(Vec<Linear>),
}

impl Fused {
    /// Fuses `parts` when they are all float or all the same GGML type.
    pub(crate) fn build(parts: Vec<RawLinear>, device: &Device) -> Result<Fused> {
        let all_dense = parts.iter().all(|p| matches!(p, RawLinear::Dense(_)));
        let first_q = match parts.first() {
            Some(RawLinear::Quant { dtype, cols, .. }) => Some((*dtype, *cols)),
            _ => None,
        };
        let same_quant = first_q.is_some_and(|(d0, c0)| {
            parts.iter().all(|p| {
                matches!(p, RawLinear::Quant { dtype, cols, .. } if *dtype == d0 && *cols == c0)
            })
        });
        if all_dense {
            let ts: Vec<Tensor> = parts
                .into_iter()
                .map(|p| match p {
                    RawLinear::Dense(t) => t,
                    RawLinear::Quant { .. } => unreachable!("checked all dense"),
                })
                .collect();
            // One storage type for the fused matrix: the parts' own when they share it.
            let ts = if ts.iter().all(|t| t.dtype() == ts[0].dtype()) {
                ts
            } else {
                ts.into_iter().map(to_f32).collect::<Result<Vec<_>>>()?
            };
            return Ok(Fused::One(Linear::dense(&Tensor::cat(&ts, 0)?)?));
        }
        if let (true, Some((dtype, cols))) = (same_quant, first_q) {
            // GGML blocks never straddle rows, so stacking rows is concatenating bytes.
            let mut rows = 0;
            let mut bytes = Vec::new();
            for p in &parts {
                if let RawLinear::Quant {
                    rows: r, bytes: b, ..
                } = p
                {
                    rows += r;
                    bytes.extend_from_slice(b);
                }
            }
            // Our kernels repack the bytes; only candle needs them aligned.
            if own_format(dtype, device).is_some() || aligned_for(dtype, &bytes) {
                return Ok(Fused::One(Linear::quant(
                    dtype,
                    rows,
                    cols,
                    Cow::Owned(bytes),
                    device,
                )?));
            }
        }
        let mats = parts
            .into_iter()
            .map(|p| p.into_linear(device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Fused::Many(mats))
    }

    /// The parts' outputs for `x` of `rows × in`, each into its buffer of `rows ×
    /// widths[i]`: one matmul into `fused` then its columns split when fused, else one
    /// matmul per part.
    pub(crate) fn forward_into<const N: usize>(
        &self,
        x: &[f32],
        rows: usize,
        device: &Device,
        widths: [usize; N],
        fused: &mut Vec<f32>,
        mut parts: [&mut Vec<f32>; N],
    ) -> Result<()> {
        match self {
            Fused::One(m) => {
                m.forward_into(x, rows, device, fused)?;
                let row: usize = widths.iter().sum();
                if fused.len() != rows * row {
                    return Err(crate::error::ModelError::InvalidInput(format!(
                        "a fused projection of {} columns split into {row}",
                        fused.len() / rows.max(1)
                    )));
                }
                for (part, &w) in parts.iter_mut().zip(&widths) {
                    sized(part, rows * w);
                }
                for (r, all) in fused.chunks_exact(row).enumerate() {
                    let mut at = 0;
                    for (part, &w) in parts.iter_mut().zip(&widths) {
                        part[r * w..(r + 1) * w].copy_from_slice(&all[at..at + w]);
                        at += w;
                    }
                }
            }
            Fused::Many(ms) if ms.len() == N => {
                for (m, part) in ms.iter().zip(parts) {
                    m.forward_into(x, rows, device, part)?;
                }
            }
            Fused::Many(ms) => {
                return Err(crate::error::ModelError::InvalidInput(format!(
                    "a fused projection of {} parts split into {N}",
                    ms.len()
                )))
            }
        }
        Ok(())
    }
}

/// One transformer block.
#[derive(Clone, Debug)]
pub(crate) struct Layer {
    pub attn_norm: Vec<f32>,
    /// q, k, v (rows in that order when fused).
    pub qkv: Fused,
    pub wo: Linear,
    pub ffn_norm: Vec<f32>,
    /// gate (w1), up (w3).
    pub gate_up: Fused,
    pub down: Linear,
}

/// All weights of a model.
#[derive(Clone, Debug)]
pub(crate) struct Weights {
    /// `[vocab, dim]` f32, row-major (shared with `lm_head` when tied and float).
    pub embed: Arc<Vec<f32>>,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    pub lm_head: Linear,
}

/// A float tensor's elements as f32, row-major (norm weights).
pub(crate) fn vector(t: Tensor) -> Result<Vec<f32>> {
    Ok(to_f32(t)?.flatten_all()?.to_vec1::<f32>()?)
}

/// A float tensor as f32 on `device` (norm weights and embeddings are computed in f32).
pub(crate) fn to_f32(t: Tensor) -> Result<Tensor> {
    Ok(if t.dtype() == DType::F32 {
        t
    } else {
        t.to_dtype(DType::F32)?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_weights_stay_16_bit_and_compute_what_their_f32_widening_computes() {
        let (out, k, rows) = (37, 70, 5);
        let w: Vec<f32> = (0..out * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 997.0 - 0.5)
            .collect();
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 104_729) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let dev = Device::Cpu;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for dtype in [DType::F16, DType::BF16] {
            let half = Tensor::from_vec(w.clone(), (out, k), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let at_width = Linear::dense(&half).unwrap();
            let kept = match &at_width {
                Linear::Dense { w, .. } => matches!(
                    (w, dtype),
                    (DenseWeights::F16(_), DType::F16) | (DenseWeights::BF16(_), DType::BF16)
                ),
                _ => false,
            };
            assert!(kept, "{dtype:?} weights widened");
            let widened = Linear::dense(&half.to_dtype(DType::F32).unwrap()).unwrap();
            assert!(matches!(
                widened,
                Linear::Dense {
                    w: DenseWeights::F32(_),
                    ..
                }
            ));
            let a = at_width.forward_rows(&x, rows, &dev).unwrap();
            let b = widened.forward_rows(&x, rows, &dev).unwrap();
            assert_eq!(bits(&a), bits(&b), "{dtype:?}");
        }
    }
}
