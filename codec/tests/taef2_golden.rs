//! Golden test of the TAEF2 encoder and decoder against the upstream reference implementation.
//!
//! `tests/data/taef2-golden.safetensors` (written by `tools/taef2/record_golden.py` from upstream
//! `taesd.py` with its own weights, in f32) holds a 64×64 crop of kodim23 (`input_rgb8`, u8
//! `[3, 64, 64]`), its latents (`latent`, `[32, 8, 8]`) and the decoder's output for those latents
//! (`decoded`, `[3, 64, 64]`). The weights come from `models/taef2` in the repository, so the test
//! never skips.
//!
//! Tolerance: both sides run the same f16 weights widened to f32 with f32 activations; only the
//! order of the sums inside each convolution differs (the module's banded im2col GEMM against PyTorch's
//! kernels), so the outputs differ by accumulated rounding alone. Measured here (x86-64, AVX-512
//! GEMM kernels): latent 5.2e-6 (values up to 3.8), decoded 6.0e-7. `1e-4` leaves a margin of about
//! 20× for other CPUs' kernels and summation orders, and is still two orders of magnitude below
//! what a wrong layer, padding, epsilon or weight moves (1e-2 and more); the recorder accepted the
//! same 1e-4 between two PyTorch implementations.
#![cfg(feature = "vq")]

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use unimic_codec::tokenizer::taef2::{Taef2Decoder, Taef2Encoder};

const TOL: f32 = 1e-4;

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn taef2_matches_reference() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let models = root.join("../models/taef2");
    let enc = Taef2Encoder::load(&models.join("taef2_encoder.safetensors")).unwrap();
    let dec = Taef2Decoder::load(&models.join("taef2_decoder.safetensors")).unwrap();
    let t = candle_core::safetensors::load(
        root.join("tests/data/taef2-golden.safetensors"),
        &Device::Cpu,
    )
    .unwrap();

    let x = (t["input_rgb8"].to_dtype(DType::F32).unwrap() / 255.0)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let latent = enc.latent(&x).unwrap().squeeze(0).unwrap();
    let want = &t["latent"];
    let d_lat = max_abs(&latent, want);
    let range = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    println!(
        "latent: max abs error {d_lat:.3e} (values up to {:.3}; tolerance {TOL:.0e})",
        range.to_scalar::<f32>().unwrap()
    );

    let decoded = dec
        .forward(&want.unsqueeze(0).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap();
    let d_dec = max_abs(&decoded, &t["decoded"]);
    println!("decoded: max abs error {d_dec:.3e} (tolerance {TOL:.0e})");

    assert!(d_lat <= TOL, "latent max abs error {d_lat}");
    assert!(d_dec <= TOL, "decoded max abs error {d_dec}");
}
