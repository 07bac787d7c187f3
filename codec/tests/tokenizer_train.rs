//! Training smoke test and the `ImageTokenizer` contract on a tiny model trained in-process:
//! a few steps run, the loss falls, checkpoints load as tokenizers and resume.
#![cfg(feature = "vq")]

use std::path::PathBuf;

use image::{Rgb, RgbImage};
use unimic_codec::grid::TokenGrid;
use unimic_codec::tokenizer::train::{read_record, TrainConfig, Trainer, TrainingRecord};
use unimic_codec::tokenizer::{ImageTokenizer, TokenizerError, Vq, VqConfig};

fn tiny() -> VqConfig {
    let mut c = VqConfig::default();
    c.codebook_size = 16;
    c.codebook_embed_dim = 4;
    c.ch = 8;
    c.encoder_ch_mult = vec![1, 2];
    c.decoder_ch_mult = vec![1, 2];
    c.z_channels = 8;
    c.num_res_blocks = 1;
    c.norm_groups = 4;
    c
}

fn images() -> Vec<RgbImage> {
    (0..3)
        .map(|k| {
            RgbImage::from_fn(32, 32, |x, y| {
                Rgb([(x * 8) as u8, (y * 8) as u8, (40 + 60 * k + x + y) as u8])
            })
        })
        .collect()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("unimic-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn record(step: usize) -> TrainingRecord {
    TrainingRecord {
        step,
        train: TrainConfig::default(),
        data: vec!["synthetic".into()],
        val_data: "synthetic".into(),
        last: None,
        val: None,
        best_val_l1: None,
        wall_seconds: 0.0,
        command: "test".into(),
        notes: String::new(),
    }
}

#[test]
fn trains_checkpoints_resumes_and_tokenizes() {
    let cfg = tiny();
    let mut tc = TrainConfig::default();
    tc.crop = 16;
    tc.batch = 2;
    tc.lr = 1e-2;
    tc.warmup = 0;
    tc.restart_every = 5;
    tc.min_scale = 1.0;
    let imgs = images();
    let mut t = Trainer::new(&cfg, &tc, imgs.clone(), &imgs, None).unwrap();
    let mut losses = Vec::new();
    for _ in 0..30 {
        let s = t.train_step().unwrap();
        assert!(s.loss.is_finite() && s.usage > 0.0 && s.usage <= 1.0);
        losses.push(s.loss);
    }
    let first = losses[0];
    let tail = losses[25..].iter().sum::<f64>() / 5.0;
    assert!(tail < 0.8 * first, "loss did not fall: {first} -> {tail}");
    let v = t.validate().unwrap();
    assert!(v.psnr.is_finite() && v.usage > 0.0);

    let dir = tmp("tok-ckpt");
    let m = t.save(&dir, "tiny", &record(t.step_count())).unwrap();
    assert_eq!(m.sha256.len(), 64);
    assert_eq!(read_record(&dir).unwrap().step, 30);

    // Resume continues the step count from the checkpoint.
    let mut r = Trainer::new(&cfg, &tc, imgs.clone(), &imgs, Some(&dir)).unwrap();
    assert_eq!(r.step_count(), 30);
    assert_eq!(r.train_step().unwrap().step, 31);

    // The checkpoint is a tokenizer directory.
    let tok = Vq::from_dir(&dir).unwrap();
    assert_eq!(tok.id().sha256, m.sha256);
    assert_eq!((tok.codebook_size(), tok.factor()), (16, 2));
    let img = RgbImage::from_fn(21, 13, |x, y| Rgb([(x * 9) as u8, (y * 15) as u8, 90]));
    let grid = tok.encode(&img).unwrap();
    assert_eq!((grid.height(), grid.width()), (7, 11));
    assert_eq!(tok.decode(&grid).unwrap().dimensions(), (22, 14));
    assert_eq!(tok.decode_to(&grid, 21, 13).unwrap().dimensions(), (21, 13));
    assert!(matches!(
        tok.decode_to(&grid, 23, 13),
        Err(TokenizerError::BadCrop { .. })
    ));
    let other = TokenGrid::new(2, 2, 32, vec![0, 1, 2, 31]).unwrap();
    assert!(matches!(
        tok.decode(&other),
        Err(TokenizerError::CodebookMismatch { .. })
    ));
    assert!(matches!(
        tok.encode(&RgbImage::new(0, 4)),
        Err(TokenizerError::EmptyImage)
    ));
    assert!(matches!(
        tok.encode(&RgbImage::new(200, 200)),
        Err(TokenizerError::TooLarge(10000))
    ));

    // A changed weights file is refused.
    let w = dir.join("tokenizer.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&w, bytes).unwrap();
    assert!(matches!(
        Vq::from_dir(&dir),
        Err(TokenizerError::HashMismatch { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn default_model_round_trips_when_shipped() {
    let dir = Vq::default_dir();
    if !dir.join("manifest.json").exists() {
        println!("skipping: no shipped tokenizer at {}", dir.display());
        return;
    }
    let tok = Vq::default_model().unwrap();
    let manifest: unimic_codec::tokenizer::Manifest =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(tok.id().sha256, manifest.sha256);
    assert_eq!(tok.id().name, manifest.name);
    assert_eq!(tok.factor(), 16);
    let img = RgbImage::from_fn(48, 40, |x, y| Rgb([(x * 5) as u8, (y * 6) as u8, 128]));
    let grid = tok.encode(&img).unwrap();
    assert_eq!((grid.height(), grid.width()), (3, 3));
    assert_eq!(tok.encode(&img).unwrap(), grid, "encoding is deterministic");
    let back = tok.decode_to(&grid, 48, 40).unwrap();
    assert_eq!(back.dimensions(), (48, 40));
    assert_eq!(tok.decode(&grid).unwrap().dimensions(), (48, 48));
}

#[test]
fn encode_among_restricts_codes_and_matches_encode_with_all_codes() {
    let dir = Vq::default_dir();
    if !dir.join("manifest.json").exists() {
        println!("skipping: no shipped tokenizer at {}", dir.display());
        return;
    }
    let tok = Vq::default_model().unwrap();
    let k = tok.codebook_size();
    let img = RgbImage::from_fn(64, 48, |x, y| {
        Rgb([(x * 4) as u8, (y * 5) as u8, ((x + y) * 2) as u8])
    });
    let full = tok.encode(&img).unwrap();
    let all: Vec<u32> = (0..k).collect();
    // Only even codes allowed: every token is even, and the grid keeps the full codebook size.
    // A single allowed code: a constant grid.
    let even: Vec<u32> = (0..k).step_by(2).collect();
    let grids = tok.encode_among(&img, &[&all, &even, &[7]]).unwrap();
    assert_eq!(grids.len(), 3);
    assert_eq!(grids[0], full);
    assert_eq!(grids[1].codebook_size(), k);
    assert!(grids[1].ids().iter().all(|id| id % 2 == 0));
    assert!(grids[2].ids().iter().all(|&id| id == 7));
    // Invalid sets are refused with an error, not a panic.
    assert!(tok.encode_among(&img, &[&[]]).is_err());
    assert!(tok.encode_among(&img, &[&[k]]).is_err());
    assert!(tok.encode_among(&img, &[&[3, 3]]).is_err());
}
