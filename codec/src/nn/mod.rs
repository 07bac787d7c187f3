//! The project-owned deterministic inference path for the transformer entropy models (no candle).
//!
//! Encoder and decoder must derive bit-identical integer distributions on every machine (see the
//! design brief, section 5). candle's CPU kernels are not: results change with the CPU's SIMD
//! level, its cache sizes and the batch shape. This module therefore re-implements inference with
//! plain f32 arithmetic in a fixed, documented order:
//!
//! * [`kernels`]: every reduction is a dot product over 8 fixed lanes, combined in a fixed tree; no
//!   fused multiply-add, no threads. On x86-64 the same code also runs compiled with AVX (chosen
//!   at run time): wider registers for the same eight lanes, so the bits do not change.
//! * [`math`]: `exp` by Cody–Waite reduction and a degree-7 polynomial (no libm), SiLU, RMS norm
//!   and softmax built on it.
//! * [`transformer`]: the pre-norm transformer body with an explicit [`transformer::KvCache`]; a
//!   position gives the same bits whether computed incrementally or in a batch.
//! * [`weights`]: safetensors checkpoints read without candle, and deterministic synthetic weights.
//! * [`logits_to_weights`]: the last step, logits to the integer weights of the codec's
//!   quantization rule ([`crate::entropy`]).
//!
//! [`kernels::Kernel::Lanes`] (the default) runs a blocked, vectorised implementation of exactly
//! these operations: matrix products register-tiled over several rows and weight rows (incremental
//! decoding reads weights re-laid in panels, in order), attention a block of query rows at a
//! time, and `exp`, SiLU, softmax and the integer weights eight lanes at a time, compiled with AVX
//! (never FMA) where the CPU has it. Only loop blocking differs: every dot product keeps its lanes
//! and order, every softmax sum and attention output stays sequential over the keys, so
//! [`kernels::Kernel::Scalar`] (the definition, one operation at a time) gives the same bits,
//! which the tests check.
//!
//! The training code (candle, feature `vq`) uses the same tensor names and the same formulas, so a
//! trained checkpoint loads here unchanged; candle's and this path's probabilities agree to about
//! 1e-5, while this path agrees with itself bit for bit everywhere.
//!
//! ```
//! use unimic_codec::nn::{logits_to_weights, math::exp};
//! let mut w = Vec::new();
//! logits_to_weights(&[0.0, -1.0, -100.0], &mut w);
//! assert_eq!(w[0], 1 << 32);
//! assert_eq!(w[1], (exp(-1.0) * 4_294_967_296.0) as u64);
//! assert_eq!(w[2], 0); // the quantization rule still gives it a non-zero frequency
//! ```

mod fast;
pub mod kernels;
mod lanes;
pub mod math;
pub mod model;
pub mod transformer;
pub mod weights;

use thiserror::Error;

/// Why a model could not be built or loaded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NnError {
    /// The file is not a valid safetensors checkpoint of f32 tensors.
    #[error("bad checkpoint: {0}")]
    Format(String),
    /// A tensor the model needs is absent.
    #[error("tensor {0} is missing")]
    Missing(String),
    /// The checkpoint holds a tensor the model does not use.
    #[error("unexpected tensor {0}")]
    Unexpected(String),
    /// A tensor has the wrong shape.
    #[error("tensor {name} has shape {got:?}, expected {expected:?}")]
    Shape {
        /// Tensor name.
        name: String,
        /// Shape the configuration implies.
        expected: Vec<usize>,
        /// Shape found.
        got: Vec<usize>,
    },
    /// The configuration is invalid.
    #[error("bad configuration: {0}")]
    Config(String),
}

/// Fixed-point scale of [`logits_to_weights`]: the most probable symbol gets weight `2^32`.
pub const WEIGHT_SCALE: f32 = 4_294_967_296.0;

/// Converts logits to the non-negative integer weights of the codec's quantization rule:
/// `m = max(logits)` (NaNs ignored), `w_i = trunc(exp(l_i - m) * 2^32)` with the deterministic
/// [`math::exp`] (so the most likely symbol gets exactly `2^32` and the sum stays below `2^48` for
/// 65,536 symbols). NaN logits give weight 0; if every logit is NaN or `-inf`, all weights are 0,
/// which the rule turns into a uniform distribution. Symbols whose weight truncates to 0 still
/// get one unit of `2^-24` from the rule.
pub fn logits_to_weights(logits: &[f32], out: &mut Vec<u64>) {
    out.clear();
    let mut m = f32::NEG_INFINITY;
    for &v in logits {
        if v > m {
            m = v;
        }
    }
    if m == f32::NEG_INFINITY {
        out.resize(logits.len(), 0);
        return;
    }
    if m == f32::INFINITY {
        out.extend(logits.iter().map(|&v| u64::from(v == f32::INFINITY)));
        return;
    }
    // `as u64` saturates and maps NaN to 0: defined on every platform.
    out.extend(
        logits
            .iter()
            .map(|&v| (math::exp(v - m) * WEIGHT_SCALE) as u64),
    );
}

/// Embedding lookup: row `id` of a `(rows, d)` table, or `None` if `id` is out of range.
pub fn embedding_row(table: &[f32], d: usize, id: usize) -> Option<&[f32]> {
    table.get(id * d..(id + 1) * d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_edge_cases() {
        let mut w = Vec::new();
        logits_to_weights(&[f32::NAN, 1.0, 1.0], &mut w);
        assert_eq!(w, [0, 1 << 32, 1 << 32]);
        logits_to_weights(&[f32::NEG_INFINITY; 3], &mut w);
        assert_eq!(w, [0, 0, 0]);
        logits_to_weights(&[f32::INFINITY, 0.0], &mut w);
        assert_eq!(w, [1, 0]);
        logits_to_weights(&[], &mut w);
        assert!(w.is_empty());
    }
}
