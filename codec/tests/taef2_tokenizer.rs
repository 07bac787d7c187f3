//! The TAEF2 tokenizer with a tiny random quantizer (ch 8, dim 4, codes 16, levels 3, res 1)
//! between the shipped TAEF2 halves: loading from a manifest directory, hashes, the residual
//! search against a brute-force recomputation, the decode path, and the errors.
//!
//! Speed is measured by `unimic bench tokenizer` (per-image encode/decode times), not here.
#![cfg(feature = "vq")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use unimic_codec::grid::TokenGrid;
use unimic_codec::tokenizer::taef2::{combined_sha256, to_rgb8, TAEF2_MANIFEST_FORMAT};
use unimic_codec::tokenizer::{ImageTokenizer, Taef2Config, Taef2Tokenizer, TokenizerError};

const SMALL: Taef2Config = Taef2Config {
    ch: 8,
    dim: 4,
    codes: 16,
    levels: 3,
    res: 1,
};

fn taef2_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/taef2"))
}

fn uniform(rng: &mut StdRng, shape: &[usize], bound: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-bound..bound)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A `Quantizer` state dict with PyTorch-default-like random weights (uniform, ±1/√fan_in) and
/// codebooks of decreasing scale per level (level 1 about as wide as the `down` output, ±0.3), plus the EMA buffers the loader must ignore.
fn random_quantizer(cfg: &Taef2Config, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = HashMap::new();
    let mut conv = |t: &mut HashMap<String, Tensor>, name: &str, cin: usize, cout: usize, k| {
        let b = 1.0 / ((cin * k * k) as f32).sqrt();
        t.insert(
            format!("{name}.weight"),
            uniform(&mut rng, &[cout, cin, k, k], b),
        );
        t.insert(format!("{name}.bias"), uniform(&mut rng, &[cout], b));
    };
    let (ch, d) = (cfg.ch, cfg.dim);
    conv(&mut t, "down_in", 32, ch, 3);
    for stack in ["down_a", "down_b", "up_a", "up_b"] {
        for i in 0..cfg.res {
            conv(&mut t, &format!("{stack}.{i}.conv1"), ch, ch, 3);
            conv(&mut t, &format!("{stack}.{i}.conv2"), ch, ch, 3);
        }
    }
    conv(&mut t, "down_s", ch, ch, 2);
    conv(&mut t, "down_out", ch, d, 1);
    conv(&mut t, "up_in", d, ch, 1);
    conv(&mut t, "up_s", ch, ch, 3);
    conv(&mut t, "up_out", ch, 32, 3);
    let (l, k) = (cfg.levels, cfg.codes);
    let cbs: Vec<Tensor> = (0..l)
        .map(|i| uniform(&mut rng, &[1, k, d], 0.3 * 0.5f32.powi(i as i32)))
        .collect();
    t.insert("codebooks".into(), Tensor::cat(&cbs, 0).unwrap());
    t.insert("ema_sum".into(), uniform(&mut rng, &[l, k, d], 1.0));
    t.insert(
        "ema_count".into(),
        Tensor::ones((l, k), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    t.insert(
        "last_used".into(),
        Tensor::zeros((l, k), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    t
}

fn sha(path: &Path) -> String {
    let d = Sha256::digest(std::fs::read(path).unwrap());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// `<tmp>/unimic-taef2-<name>-<pid>/{taef2/, tok/manifest.json, tok/quantizer.safetensors}`,
/// the manifest pointing at `../taef2/` as a shipped one does. Returns the `tok` directory.
fn write_dir(name: &str, cfg: &Taef2Config, seed: u64) -> PathBuf {
    let root = std::env::temp_dir().join(format!("unimic-taef2-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (ae, tok) = (root.join("taef2"), root.join("tok"));
    std::fs::create_dir_all(&ae).unwrap();
    std::fs::create_dir_all(&tok).unwrap();
    for f in ["taef2_encoder.safetensors", "taef2_decoder.safetensors"] {
        std::fs::copy(taef2_dir().join(f), ae.join(f)).unwrap();
    }
    let q = tok.join("quantizer.safetensors");
    candle_core::safetensors::save(&random_quantizer(cfg, seed), &q).unwrap();
    let file = |p: &str, full: &Path| serde_json::json!({"path": p, "sha256": sha(full)});
    let manifest = serde_json::json!({
        "format": TAEF2_MANIFEST_FORMAT,
        "name": "taef2-test",
        "architecture": "taef2-rvq",
        "config": cfg,
        "files": {
            "quantizer": file("quantizer.safetensors", &q),
            "encoder": file("../taef2/taef2_encoder.safetensors", &ae.join("taef2_encoder.safetensors")),
            "decoder": file("../taef2/taef2_decoder.safetensors", &ae.join("taef2_decoder.safetensors")),
        },
        "training": {"note": "random weights"},
    });
    std::fs::write(
        tok.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    tok
}

fn cleanup(tok: &Path) {
    let _ = std::fs::remove_dir_all(tok.parent().unwrap());
}

/// A gradient over blocks of unrelated colours (so that the grid cells differ).
fn test_image(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let b = (x / 16 * 7 + y / 16 * 13) as u8;
        Rgb([
            b.wrapping_mul(37).wrapping_add((x * 2) as u8),
            b.wrapping_mul(91).wrapping_add(y as u8),
            b.wrapping_mul(53) ^ ((x * y) as u8),
        ])
    })
}

/// Brute force in f64: per cell and level, the codeword of least squared distance to the residual
/// (lowest index on ties), the residual then reduced by it.
fn brute_force(e: &Tensor, cfg: &Taef2Config, cb: &[Vec<f32>]) -> Vec<Vec<u32>> {
    let d = e.dim(1).unwrap();
    // [1, d, h, w] -> cells in (y, x) order, d values each.
    let v = e
        .permute((0, 2, 3, 1))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut out = vec![Vec::new(); cfg.levels];
    for (cell, e) in v.chunks_exact(d).enumerate() {
        let mut r: Vec<f64> = e.iter().map(|&x| f64::from(x)).collect();
        for (l, ids) in out.iter_mut().enumerate() {
            let row = |k: usize| &cb[l][k * d..(k + 1) * d];
            let dist = |k: usize| -> f64 {
                r.iter()
                    .zip(row(k))
                    .map(|(a, &c)| (a - f64::from(c)).powi(2))
                    .sum()
            };
            let mut best = 0;
            for k in 1..cfg.codes {
                if dist(k) < dist(best) {
                    best = k;
                }
            }
            // A near tie would make f32 and f64 disagree legitimately; random data has none.
            for k in (0..cfg.codes).filter(|&k| k != best) {
                assert!(
                    dist(k) - dist(best) > 1e-9,
                    "near tie at cell {cell} level {l}"
                );
            }
            ids.push(best as u32);
            for (a, &c) in r.iter_mut().zip(row(best)) {
                *a -= f64::from(c);
            }
        }
    }
    out
}

#[test]
fn roundtrip_levels_and_search() {
    let dir = write_dir("roundtrip", &SMALL, 7);
    let tok = Taef2Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.levels(), 3);
    assert_eq!(tok.codebook_size(), 16);
    assert_eq!(tok.factor(), 16);
    assert_eq!(tok.config(), &SMALL);

    // Identity: SHA-256 over the three raw digests, encoder, decoder, quantizer.
    let bytes = |p: PathBuf| std::fs::read(p).unwrap();
    let (e, d, q) = (
        bytes(dir.join("../taef2/taef2_encoder.safetensors")),
        bytes(dir.join("../taef2/taef2_decoder.safetensors")),
        bytes(dir.join("quantizer.safetensors")),
    );
    let mut cat = Vec::new();
    for b in [&e, &d, &q] {
        cat.extend_from_slice(&Sha256::digest(b));
    }
    let want: String = Sha256::digest(&cat)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(tok.id().sha256, want);
    assert_eq!(combined_sha256(&e, &d, &q), want);
    assert_eq!(tok.id().name, "taef2-test");

    // 48×40: padded to 48×48, a 3×3 grid per level.
    let img = test_image(48, 40);
    let grids = tok.encode_levels(&img, 3).unwrap();
    assert_eq!(grids.len(), 3);
    for g in &grids {
        assert_eq!((g.height(), g.width(), g.codebook_size()), (3, 3, 16));
        assert!(g.ids().iter().all(|&i| i < 16));
    }
    assert_eq!(tok.encode(&img).unwrap(), grids[0]);
    assert_eq!(tok.encode_levels(&img, 2).unwrap(), grids[..2].to_vec());

    // The residual search against a brute force on the `down` output.
    let x = tok.input(&img).unwrap();
    assert_eq!(x.dims(), &[1, 3, 48, 48]);
    let e_down = tok
        .quantizer()
        .down(&tok.encoder().latent(&x).unwrap())
        .unwrap();
    assert_eq!(e_down.dims(), &[1, 4, 3, 3]);
    let cb: Vec<Vec<f32>> = (0..3)
        .map(|l| tok.quantizer().codebook(l).to_vec())
        .collect();
    let want = brute_force(&e_down, &SMALL, &cb);
    for (l, g) in grids.iter().enumerate() {
        assert_eq!(g.ids(), &want[l][..], "level {}", l + 1);
    }
    // The codes are not all alike (the search is exercised).
    for g in &grids {
        let distinct: std::collections::BTreeSet<u32> = g.ids().iter().copied().collect();
        println!("ids {:?} ({} distinct)", g.ids(), distinct.len());
        assert!(distinct.len() >= 2);
    }

    // Decoding: the summed codewords through `up` and the decoder, padded size, then the crop.
    let full = tok.decode_levels(&grids).unwrap();
    assert_eq!(full.dimensions(), (48, 48));
    let mut qv = vec![0f32; 9 * 4];
    for (l, g) in grids.iter().enumerate() {
        for (cell, &k) in g.ids().iter().enumerate() {
            for j in 0..4 {
                qv[cell * 4 + j] += cb[l][k as usize * 4 + j];
            }
        }
    }
    let qt = Tensor::from_vec(qv, (1, 3, 3, 4), &Device::Cpu)
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap()
        .contiguous()
        .unwrap();
    let out = tok
        .decoder()
        .forward(&tok.quantizer().up(&qt).unwrap())
        .unwrap();
    let (oh, ow, rgb) = to_rgb8(&out).unwrap();
    assert_eq!((oh, ow), (48, 48));
    assert_eq!(full.as_raw(), &rgb);
    let cropped = tok.decode_to(&grids[0], 48, 40).unwrap();
    assert_eq!(cropped.dimensions(), (48, 40));
    assert_eq!(
        tok.decode(&grids[0]).unwrap(),
        tok.decode_levels(&grids[..1]).unwrap()
    );
    cleanup(&dir);
}

#[test]
fn errors() {
    let dir = write_dir("errors", &SMALL, 11);
    let tok = Taef2Tokenizer::from_dir(&dir).unwrap();
    let img = test_image(48, 40);
    let grids = tok.encode_levels(&img, 3).unwrap();

    let levels = |r: Result<_, TokenizerError>, n: usize| match r {
        Err(TokenizerError::Levels {
            requested,
            available: 3,
        }) => assert_eq!(requested, n),
        other => panic!("expected Levels({n}), got {other:?}"),
    };
    levels(tok.encode_levels(&img, 0).map(|_| ()), 0);
    levels(tok.encode_levels(&img, 4).map(|_| ()), 4);
    levels(tok.decode_levels(&[]).map(|_| ()), 0);
    let mut four = grids.clone();
    four.push(grids[0].clone());
    levels(tok.decode_levels(&four).map(|_| ()), 4);

    let wrong_k = TokenGrid::new(3, 3, 17, vec![16; 9]).unwrap();
    assert!(matches!(
        tok.decode_levels(&[grids[0].clone(), wrong_k.clone()]),
        Err(TokenizerError::CodebookMismatch {
            grid: 17,
            tokenizer: 16
        })
    ));
    assert!(matches!(
        tok.decode(&wrong_k),
        Err(TokenizerError::CodebookMismatch { .. })
    ));
    let narrow = TokenGrid::new(3, 2, 16, vec![0; 6]).unwrap();
    assert!(matches!(
        tok.decode_levels(&[grids[0].clone(), grids[1].clone(), narrow]),
        Err(TokenizerError::GridShape {
            level: 3,
            height: 3,
            width: 2,
            expected_height: 3,
            expected_width: 3
        })
    ));
    let huge = TokenGrid::new(65, 64, 16, vec![0; 65 * 64]).unwrap();
    assert!(matches!(
        tok.decode(&huge),
        Err(TokenizerError::TooLarge(4160))
    ));
    assert!(matches!(
        tok.encode(&RgbImage::new(0, 5)),
        Err(TokenizerError::EmptyImage)
    ));
    assert!(matches!(
        tok.encode(&RgbImage::new(1040, 1024)),
        Err(TokenizerError::TooLarge(4160))
    ));
    assert!(matches!(
        tok.decode_to(&grids[0], 49, 40),
        Err(TokenizerError::BadCrop { .. })
    ));

    // A file whose bytes changed after the manifest was written.
    let q = dir.join("quantizer.safetensors");
    let good = std::fs::read(&q).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    std::fs::write(&q, &bad).unwrap();
    match Taef2Tokenizer::from_dir(&dir) {
        Err(TokenizerError::HashMismatch { expected, actual }) => assert_ne!(expected, actual),
        other => panic!("expected HashMismatch, got {other:?}"),
    }
    std::fs::write(&q, &good).unwrap();

    // Wrong format tag; wrong codebook shape for the config.
    let mpath = dir.join("manifest.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    let mut m = manifest.clone();
    m["format"] = "unimic-vq-tokenizer/1".into();
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
    assert!(matches!(
        Taef2Tokenizer::from_dir(&dir),
        Err(TokenizerError::Config(_))
    ));
    let mut m = manifest.clone();
    m["config"]["codes"] = 32.into();
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
    assert!(matches!(
        Taef2Tokenizer::from_dir(&dir),
        Err(TokenizerError::Model(_))
    ));
    cleanup(&dir);
}

/// The quantizer's `down` and `up` equal the same layers written with candle's own operations
/// (`conv2d`, `silu`, `upsample_nearest2d`) on the same weights: the codec's CPU forward
/// (Winograd 3×3, per-tap stride-2, 1×1 GEMMs) computes the `Quantizer` of `tools/taef2/taef2.py`.
#[test]
fn quantizer_matches_candle_ops() {
    let cfg = Taef2Config {
        ch: 16,
        dim: 8,
        codes: 16,
        levels: 2,
        res: 2,
    };
    let w = random_quantizer(&cfg, 11);
    let dir = write_dir("candle-ref", &cfg, 11);
    let tok = Taef2Tokenizer::from_dir(&dir).unwrap();
    let conv = |x: &Tensor, name: &str, stride: usize, pad: usize| -> Tensor {
        let y = x
            .conv2d(&w[&format!("{name}.weight")], pad, stride, 1, 1)
            .unwrap();
        let b = w[&format!("{name}.bias")].reshape((1, (), 1, 1)).unwrap();
        y.broadcast_add(&b).unwrap()
    };
    let res = |x: Tensor, stack: &str| -> Tensor {
        (0..cfg.res).fold(x, |x, i| {
            let h = conv(&x.silu().unwrap(), &format!("{stack}.{i}.conv1"), 1, 1);
            let h = conv(&h.silu().unwrap(), &format!("{stack}.{i}.conv2"), 1, 1);
            (x + h).unwrap()
        })
    };
    let mut rng = StdRng::seed_from_u64(5);
    // Odd latent sizes (10×14 → 5×7) exercise the partial Winograd tiles.
    let z = uniform(&mut rng, &[1, 32, 10, 14], 2.0);
    let want = {
        let h = res(conv(&z, "down_in", 1, 1), "down_a");
        let h = res(conv(&h, "down_s", 2, 0), "down_b");
        conv(&h.silu().unwrap(), "down_out", 1, 0)
    };
    let got = tok.quantizer().down(&z).unwrap();
    let q = uniform(&mut rng, &[1, cfg.dim, 5, 7], 0.5);
    let want_up = {
        let h = res(conv(&q, "up_in", 1, 0), "up_a");
        let h = h.upsample_nearest2d(10, 14).unwrap();
        let h = res(conv(&h, "up_s", 1, 1), "up_b");
        conv(&h.silu().unwrap(), "up_out", 1, 1)
    };
    let got_up = tok.quantizer().up(&q).unwrap();
    for (name, got, want) in [("down", got, want), ("up", got_up, want_up)] {
        assert_eq!(got.dims(), want.dims(), "{name}");
        let err = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!("{name}: max abs error {err:.2e}");
        assert!(err < 1e-4, "{name}: max abs error {err}");
    }
    cleanup(&dir);
}
