//! Speed of the deterministic transformer entropy models on a 16×16 grid (256 tokens, the grid of
//! a 256×256 image under the 16× tokenizer), one core, synthetic weights of the default size.
//!
//! ```text
//! cargo run --release -p unimic-codec --no-default-features --example transformer_speed [K [D LAYERS D_FF]]
//! ```
//! Prints one JSON object per line: model, scenario, parameters, encode and decode milliseconds
//! (median of 5), coded bytes. `K` defaults to 1,024; the body defaults to the models' `small`
//! size; `UNIMIC_NO_AVX=1` measures the baseline (SSE2) variant of the kernels on x86-64. A last
//! line times the adaptive grid model (no transformer) on a structured 256×256 grid, for
//! comparison.

use std::time::Instant;

use unimic_codec::coder::{Decoder, Encoder};
use unimic_codec::entropy::generic::{Generic, GenericConfig};
use unimic_codec::entropy::masked::{Masked, MaskedConfig};
use unimic_codec::entropy::text_cond::{TextCond, TextCondConfig};
use unimic_codec::entropy::AdaptiveGrid;
use unimic_codec::grid::TokenGrid;
use unimic_codec::nn::kernels::{linear, Kernel};
use unimic_codec::nn::transformer::BodyConfig;
use unimic_codec::nn::weights::splitmix64;

fn median_ms(mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let k: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1024);
    let arg = |i: usize| -> Result<Option<usize>, Box<dyn std::error::Error>> {
        Ok(std::env::args().nth(i).map(|s| s.parse()).transpose()?)
    };
    let body = match (arg(2)?, arg(3)?, arg(4)?) {
        (Some(d_model), Some(n_layers), Some(d_ff)) => Some(BodyConfig {
            d_model,
            n_layers,
            n_heads: (d_model / 32).max(1),
            d_ff,
        }),
        _ => None,
    };
    #[cfg(target_arch = "x86_64")]
    println!(
        "{{\"avx\":{}}}",
        unimic_codec::nn::kernels::simd::avx_enabled()
    );
    let (h, w) = (16u32, 16u32);
    let mut z = 7u64;
    let ids: Vec<u32> = (0..h * w)
        .map(|_| {
            z = splitmix64(z);
            (z % k as u64) as u32
        })
        .collect();
    let grid = TokenGrid::new(h, w, k as u32, ids)?;

    // The per-token output projection alone: 1×256 by 256×K.
    let d = 256;
    let wt: Vec<f32> = (0..k * d).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
    let x: Vec<f32> = (0..d).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut y = vec![0.0f32; k];
    let head = median_ms(|| {
        for _ in 0..100 {
            linear(Kernel::Lanes, &x, &wt, None, &mut y);
        }
    }) / 100.0;
    println!("{{\"op\":\"matvec_256x{k}\",\"ms\":{head:.4}}}");

    let mut gc = GenericConfig::small(k);
    let mut mc = MaskedConfig::small(k);
    let mut tc = TextCondConfig::small(k);
    if let Some(b) = body {
        gc.body = b.clone();
        mc.body = b.clone();
        tc.body = b;
    }
    let g = Generic::synthetic(&gc, 1)?;
    let mut bytes = Vec::new();
    let enc = median_ms(|| bytes = g.encode(&grid).unwrap_or_default());
    let dec = median_ms(|| {
        let _ = g.decode(h, w, &bytes);
    });
    println!(
        "{{\"model\":\"generic\",\"scenario\":\"whole\",\"params\":{},\"encode_ms\":{enc:.1},\"decode_ms\":{dec:.1},\"bytes\":{}}}",
        g.config().num_params(),
        bytes.len()
    );

    let m = Masked::synthetic(&mc, 2)?;
    let n = (h * w) as usize;
    let centre = |frac: f64| -> Vec<bool> {
        let side = ((n as f64 * frac).sqrt().round() as u32).min(h);
        let (r0, c0) = ((h - side) / 2, (w - side) / 2);
        (0..n as u32)
            .map(|i| {
                let (r, c) = (i / w, i % w);
                r >= r0 && r < r0 + side && c >= c0 && c < c0 + side
            })
            .collect()
    };
    let outpaint: Vec<bool> = centre(0.75).iter().map(|b| !b).collect();
    for (name, unknown) in [
        ("whole", vec![true; n]),
        ("inpaint25", centre(0.25)),
        ("inpaint50", centre(0.5)),
        ("outpaint", outpaint),
    ] {
        let mut bytes = Vec::new();
        let enc = median_ms(|| bytes = m.encode(&grid, &unknown).unwrap_or_default());
        let dec = median_ms(|| {
            let _ = m.decode(h, w, grid.ids(), &unknown, &bytes);
        });
        println!(
            "{{\"model\":\"masked\",\"scenario\":\"{name}\",\"params\":{},\"encode_ms\":{enc:.1},\"decode_ms\":{dec:.1},\"bytes\":{}}}",
            m.config().num_params(),
            bytes.len()
        );
    }

    let t = TextCond::synthetic(&tc, 3)?;
    let prompt: Vec<u32> = (0..20).map(|i| 1000 + 37 * i).collect();
    let mut bytes = Vec::new();
    let enc = median_ms(|| bytes = t.encode(&prompt, &grid).unwrap_or_default());
    let dec = median_ms(|| {
        let _ = t.decode(&prompt, h, w, &bytes);
    });
    println!(
        "{{\"model\":\"text\",\"scenario\":\"whole+20 text tokens\",\"params\":{},\"encode_ms\":{enc:.1},\"decode_ms\":{dec:.1},\"bytes\":{}}}",
        t.config().num_params(),
        bytes.len()
    );

    // The adaptive grid model on 65,536 tokens: smooth 8×8 blocks, one token in four random.
    let side = 256usize;
    let ids: Vec<u32> = (0..side * side)
        .map(|i| {
            z = splitmix64(z);
            let (r, c) = (i / side, i % side);
            if z % 4 == 0 {
                (z >> 20) as u32 % k as u32
            } else {
                ((r / 8) * 37 + (c / 8) * 11) as u32 % k as u32
            }
        })
        .collect();
    let mut bytes = Vec::new();
    let enc = median_ms(|| {
        let mut e = Encoder::new();
        let ok = AdaptiveGrid::new(k as u32)
            .encode(&mut e, &ids, side as u32, 0..ids.len())
            .is_ok();
        bytes = if ok { e.finish() } else { Vec::new() };
    });
    let mut back = Vec::new();
    let dec = median_ms(|| {
        back.clear();
        let _ = AdaptiveGrid::new(k as u32).decode(
            &mut Decoder::new(&bytes),
            &mut back,
            side as u32,
            0..ids.len(),
        );
    });
    if back != ids {
        return Err("adaptive grid round trip failed".into());
    }
    println!(
        "{{\"model\":\"adaptive_grid\",\"scenario\":\"256x256\",\"params\":0,\"encode_ms\":{enc:.1},\"decode_ms\":{dec:.1},\"bytes\":{}}}",
        bytes.len()
    );
    Ok(())
}
