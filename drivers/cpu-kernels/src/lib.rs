//! The forward's hot-path CPU kernels — dense `x·wᵀ` and causal attention over K/V read in
//! place from the paged pool — with SIMD chosen at run time, each bit-identical to its
//! scalar reference. This is the one crate of the workspace allowed `unsafe`: SIMD
//! intrinsics, reached only through a token that proves the CPU has them.
//!
//! # The contract: one fixed order of operations per output element
//!
//! Every output element is computed by one sequence of IEEE operations that depends only
//! on its own inputs — never on how many rows share the call, where a row sits in it, how
//! a prompt was chunked, how many threads run or which instruction set was detected. So a
//! sequence's logits are bit-identical whatever else is batched with it, which is what
//! makes recomputed K/V equal to the original and resume exact under load.
//!
//! - A dot product accumulates eight lanes (element `i` into lane `i % 8`, a product then
//!   a sum, never fused) over the whole multiple of eight, reduces the lanes as
//!   `((l0+l4)+(l1+l5)) + ((l2+l6)+(l3+l7))`, then adds the remainder summed in order
//!   ([`reference::dot`]).
//! - An accumulation `acc += w·x` rounds the product, then the sum ([`reference::axpy`]).
//! - f16 and bf16 inputs are widened to f32 first (exact: every f16 and bf16 is an f32).
//! - The softmax's exponential is our own [`reference::exp`] (range reduction and a
//!   polynomial in fused multiply-adds, within 2 ulp), not libm's: every step is one
//!   vector instruction, so it vectorises bit for bit.
//!
//! The scalar implementations in [`reference`] are the definition; the SIMD paths
//! (AVX2 + F16C + FMA on x86-64 here) reproduce them bit for bit, which the property tests check
//! on random shapes with ragged tails. A CPU without those features, or another
//! architecture, runs the reference itself. `LLMOS_CPU_KERNELS=portable` forces it.

mod attention;
mod dense;
mod ops;
mod q4;
mod q8;
pub mod reference;
mod scratch;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use attention::{attention, AttentionShape, KvRuns, Rows};
pub use dense::{
    matmul_t, matmul_t_bf16, matmul_t_bf16_into, matmul_t_f16, matmul_t_f16_into, matmul_t_into,
};
pub use half::{bf16, f16};
pub use q4::{Q4Format, Q4Matrix};
pub use q8::{quantize_row, quantized_accelerated, Q8Format, Q8Matrix, QuantError, Q8_0_BLOCK};

use ops::Ops;

/// The instruction set the kernels run on, detected once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// The scalar reference (any CPU).
    Portable,
    /// AVX2 with F16C and FMA (x86-64).
    Avx2,
}

impl Isa {
    /// Its name, as logs and benches print it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2+f16c+fma",
        }
    }
}

/// The instruction set the kernels use in this process.
pub fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    if x86::Avx2::get().is_some() {
        return Isa::Avx2;
    }
    Isa::Portable
}

/// Whether `LLMOS_CPU_KERNELS=portable` asks for the scalar reference.
fn portable_forced() -> bool {
    std::env::var("LLMOS_CPU_KERNELS").is_ok_and(|v| v.eq_ignore_ascii_case("portable"))
}

/// Calls `f` with the best [`Ops`] this CPU has.
#[inline(always)]
fn with_ops<R>(f: impl Dispatch<R>) -> R {
    #[cfg(target_arch = "x86_64")]
    if let Some(avx2) = x86::Avx2::get() {
        return f.run(avx2);
    }
    f.run(ops::Portable)
}

/// A computation generic over the instruction set ([`with_ops`] picks one).
trait Dispatch<R> {
    fn run<O: Ops>(self, ops: O) -> R;
}

/// Calls `f((index, chunk))` for each `size`-element chunk of `data`, across rayon's
/// current pool when `parallel` (work too small to be worth the hand-off stays on the
/// calling thread).
fn for_each_chunk<T: Send>(
    data: &mut [T],
    size: usize,
    parallel: bool,
    f: impl Fn((usize, &mut [T])) + Send + Sync,
) {
    use rayon::prelude::*;
    if parallel {
        data.par_chunks_mut(size).enumerate().for_each(f);
    } else {
        data.chunks_mut(size).enumerate().for_each(f);
    }
}

/// `Σ a[i]·b[i]` over the shorter length, in the contract's order ([`reference::dot`]).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    struct Dot<'a>(&'a [f32], &'a [f32]);
    impl Dispatch<f32> for Dot<'_> {
        fn run<O: Ops>(self, ops: O) -> f32 {
            ops.dot(self.0, self.1)
        }
    }
    with_ops(Dot(a, b))
}
