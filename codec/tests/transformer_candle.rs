//! The candle training networks agree with the deterministic inference path (same checkpoint,
//! probabilities within a small tolerance), and the training loop runs, resumes and produces a
//! checkpoint the coder loads.
#![cfg(feature = "vq")]

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use unimic_codec::entropy::generic::{Generic, GenericConfig};
use unimic_codec::entropy::masked::{Masked, MaskedConfig};
use unimic_codec::entropy::text_cond::{TextCond, TextCondConfig};
use unimic_codec::entropy::train::{
    import_weights, masked_sequence, train, Event, GenericNet, GridSet, MaskedNet, MaskedSequence,
    ModelSpec, TextCondNet, TrainOptions,
};
use unimic_codec::grid::TokenGrid;
use unimic_codec::nn::weights::Weights;
use unimic_codec::nn::WEIGHT_SCALE;

const K: usize = 32;

fn ids(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7 + i / 3) % K as u32).collect()
}

/// `exp(l - max)` per row of candle logits `(1, n, K)`.
fn rel_probs(logits: &Tensor) -> Vec<Vec<f32>> {
    let rows: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
    rows.into_iter()
        .map(|r| {
            let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            r.iter().map(|&l| (l - m).exp()).collect()
        })
        .collect()
}

fn assert_close(candle: &[Vec<f32>], det: &[Vec<u64>]) {
    assert_eq!(candle.len(), det.len());
    let mut worst = 0.0f32;
    for (c, d) in candle.iter().zip(det) {
        for (&a, &b) in c.iter().zip(d) {
            worst = worst.max((a - b as f32 / WEIGHT_SCALE).abs());
        }
    }
    assert!(worst < 1e-4, "largest difference {worst}");
}

fn vb_from(w: &Weights) -> VarBuilder<'static> {
    VarBuilder::from_buffered_safetensors(w.to_safetensors().unwrap(), DType::F32, &Device::Cpu)
        .unwrap()
}

#[test]
fn generic_candle_matches_deterministic_path() {
    let cfg = GenericConfig::tiny(K);
    let w = Weights::synthetic(&cfg.tensor_shapes(), 21, 1.0);
    let net = GenericNet::new(&cfg, vb_from(&w)).unwrap();
    let det = Generic::from_weights(&cfg, w).unwrap();
    let (h, wd) = (4usize, 5usize);
    let g = TokenGrid::new(h as u32, wd as u32, K as u32, ids(h * wd)).unwrap();
    let mut prev = vec![K as u32];
    prev.extend_from_slice(&g.ids()[..h * wd - 1]);
    let prev = Tensor::from_vec(prev, (1, h * wd), &Device::Cpu).unwrap();
    let logits = net.forward(&prev, h, wd).unwrap();
    assert_close(&rel_probs(&logits), &det.weights_full(&g).unwrap());
}

#[test]
fn masked_candle_matches_deterministic_path() {
    let cfg = MaskedConfig::tiny(K);
    let w = Weights::synthetic(&cfg.tensor_shapes(), 22, 1.0);
    let net = MaskedNet::new(&cfg, vb_from(&w)).unwrap();
    let det = Masked::from_weights(&cfg, w).unwrap();
    let (h, wd) = (5usize, 4usize);
    let g = ids(h * wd);
    let unknown: Vec<bool> = (0..h * wd).map(|i| i % 3 != 0).collect();
    let seq = masked_sequence(&g, wd, K as u32, cfg.max_side, &unknown);
    let all = vec![true; h * wd];
    let whole = masked_sequence(&g, wd, K as u32, cfg.max_side, &all);
    // Two sequences of different lengths in one (padded) batch.
    let logits = net.forward(&[seq.clone(), whole], &Device::Cpu).unwrap();
    // Only the raster rows of unknown cells are coded.
    let pick = |b: usize, s: &MaskedSequence, unknown: &[bool]| -> Tensor {
        let rows: Vec<u32> = (0..h * wd)
            .filter(|&t| unknown[t])
            .map(|t| (s.prefix + t) as u32)
            .collect();
        let idx = Tensor::from_vec(rows.clone(), rows.len(), &Device::Cpu).unwrap();
        logits
            .narrow(0, b, 1)
            .unwrap()
            .index_select(&idx, 1)
            .unwrap()
    };
    assert_close(
        &rel_probs(&pick(0, &seq, &unknown)),
        &det.weights_unknown(wd, &g, &unknown),
    );
    let whole = masked_sequence(&g, wd, K as u32, cfg.max_side, &all);
    assert_close(
        &rel_probs(&pick(1, &whole, &all)),
        &det.weights_unknown(wd, &g, &all),
    );
}

#[test]
fn text_candle_matches_deterministic_path_with_padding() {
    let cfg = TextCondConfig::tiny(K);
    let w = Weights::synthetic(&cfg.tensor_shapes(), 23, 1.0);
    let net = TextCondNet::new(&cfg, vb_from(&w)).unwrap();
    let det = TextCond::from_weights(&cfg, w).unwrap();
    let (h, wd) = (3usize, 4usize);
    let g = TokenGrid::new(h as u32, wd as u32, K as u32, ids(h * wd)).unwrap();
    let long = vec![5u32, 100, 2000, 30_000, 7];
    let short = vec![9u32, 8];
    let mut prev = Vec::new();
    for _ in 0..2 {
        prev.push(K as u32);
        prev.extend_from_slice(&g.ids()[..h * wd - 1]);
    }
    let prev = Tensor::from_vec(prev, (2, h * wd), &Device::Cpu).unwrap();
    let logits = net
        .forward(&[long.clone(), short.clone()], &prev, h, wd)
        .unwrap();
    // The short prompt was left-padded in the batch; it must match its unpadded computation.
    for (b, text) in [long, short].iter().enumerate() {
        let l = logits.narrow(0, b, 1).unwrap();
        assert_close(&rel_probs(&l), &det.weights_full(text, &g).unwrap());
    }
}

fn tiny_opts(dir: &std::path::Path, steps: u64) -> TrainOptions {
    let mut o = TrainOptions::new("tiny", dir);
    o.steps = steps;
    o.batch_size = 8;
    o.lr = 3e-3;
    o.warmup = 5;
    o.eval_every = 20;
    o.val_samples = 16;
    o.data = "synthetic".into();
    o.command = "test".into();
    o
}

#[test]
fn training_learns_resumes_and_loads_into_the_coder() {
    let dir = std::env::temp_dir().join(format!("unimic-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let k = 16usize;
    let train_set = GridSet::synthetic(6, 6, k, 64, 1);
    let val_set = GridSet::synthetic(6, 6, k, 16, 2);
    let mut cfg = GenericConfig::tiny(k);
    cfg.max_side = 8;
    let spec = ModelSpec::Generic(cfg.clone());
    let mut events = Vec::new();
    let r1 = train(
        &spec,
        &train_set,
        &val_set,
        &tiny_opts(&dir, 40),
        &Device::Cpu,
        &mut |e| events.push(e),
    )
    .unwrap();
    let first_val = events
        .iter()
        .find_map(|e| match e {
            Event::Eval { val_bits, .. } => Some(*val_bits),
            _ => None,
        })
        .unwrap();
    let t1 = r1.manifest.training.clone().unwrap();
    assert_eq!(t1.steps, 40);
    assert!(t1.val_bits_per_token < 4.0, "uniform is 4 bits: {t1:?}");
    assert!(t1.val_bits_per_token <= first_val + 1e-9);

    // Resume to 60 steps: starts at 40.
    let mut events = Vec::new();
    let r2 = train(
        &spec,
        &train_set,
        &val_set,
        &tiny_opts(&dir, 60),
        &Device::Cpu,
        &mut |e| events.push(e),
    )
    .unwrap();
    assert!(matches!(events[0], Event::Start { step: 40, .. }));
    assert_eq!(r2.manifest.training.clone().unwrap().steps, 60);

    // The checkpoint loads into the deterministic model and codes.
    let (model, m) = Generic::load(&r2.manifest_path).unwrap();
    assert_eq!(model.content_hash(), m.sha256);
    let g = TokenGrid::new(6, 6, k as u32, train_set.samples[0].ids.clone()).unwrap();
    let bytes = model.encode(&g).unwrap();
    assert_eq!(model.decode(6, 6, &bytes).unwrap(), g);
    // Learned: fewer bits than uniform (36 tokens * 4 bits = 18 bytes).
    assert!(bytes.len() < 18, "{} bytes", bytes.len());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn masked_and_text_training_steps_run() {
    let dir = std::env::temp_dir().join(format!("unimic-train-mt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let k = 16usize;
    let train_set = GridSet::synthetic(4, 4, k, 32, 3);
    let val_set = GridSet::synthetic(4, 4, k, 8, 4);
    let mut mc = MaskedConfig::tiny(k);
    mc.max_side = 4;
    let mut tc = TextCondConfig::tiny(k);
    tc.max_side = 4;
    for spec in [ModelSpec::Masked(mc), ModelSpec::Text(tc)] {
        let mut o = tiny_opts(&dir, 6);
        o.id = spec.kind().to_string();
        o.eval_every = 3;
        let r = train(&spec, &train_set, &val_set, &o, &Device::Cpu, &mut |_| {}).unwrap();
        let t = r.manifest.training.unwrap();
        assert!(t.val_bits_per_token.is_finite() && t.val_bits_per_token > 0.0);
        assert_eq!(r.manifest.kind, spec.kind());
    }
    let (m, _) = Masked::load(&dir.join("masked.json")).unwrap();
    let g = TokenGrid::new(4, 4, k as u32, train_set.samples[1].ids.clone()).unwrap();
    let b = m.encode(&g, &[true; 16]).unwrap();
    assert_eq!(m.decode(4, 4, &[0; 16], &[true; 16], &b).unwrap(), g);
    let (t, _) = TextCond::load(&dir.join("text.json")).unwrap();
    let b = t.encode(&train_set.samples[1].text, &g).unwrap();
    assert_eq!(t.decode(&train_set.samples[1].text, 4, 4, &b).unwrap(), g);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_masked_run_can_start_from_a_generic_checkpoint() {
    let dir = std::env::temp_dir().join(format!("unimic-train-init-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let k = 16usize;
    let set = GridSet::synthetic(4, 4, k, 16, 5);
    let mut gc = GenericConfig::tiny(k);
    gc.max_side = 4;
    let generic = Weights::synthetic(&gc.tensor_shapes(), 31, 1.0);
    let gpath = dir.join("generic.safetensors");
    std::fs::write(&gpath, generic.to_safetensors().unwrap()).unwrap();
    let mc = MaskedConfig {
        codebook_size: k,
        max_side: 4,
        body: gc.body.clone(),
    };
    // One step at learning rate 0: the written weights are the initialisation itself.
    let mut o = tiny_opts(&dir, 1);
    o.lr = 0.0;
    o.id = "masked".into();
    o.init_from = Some(gpath.clone());
    let spec = ModelSpec::Masked(mc.clone());
    train(&spec, &set, &set, &o, &Device::Cpu, &mut |_| {}).unwrap();
    let saved = std::fs::read(dir.join("masked.safetensors")).unwrap();
    let mut saved = Weights::from_safetensors(&saved).unwrap();
    let mut generic = generic;
    for (name, shape) in gc.tensor_shapes() {
        assert_eq!(
            saved.take(&name, &shape).unwrap(),
            generic.take(&name, &shape).unwrap(),
            "{name} copied"
        );
    }
    // The known cells' tables are not in the generic file: seeded, not zero.
    let known = saved.take("known_row_emb.weight", &[4, 16]).unwrap();
    assert!(known.iter().any(|&v| v != 0.0));
    // A file with nothing in common is refused.
    let other = dir.join("other.safetensors");
    std::fs::write(
        &other,
        Weights::synthetic(&[("x.weight".to_string(), vec![2])], 1, 1.0)
            .to_safetensors()
            .unwrap(),
    )
    .unwrap();
    o.id = "masked2".into();
    o.init_from = Some(other);
    assert!(train(&spec, &set, &set, &o, &Device::Cpu, &mut |_| {}).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn imported_weights_are_validated_and_get_a_manifest_that_loads() {
    let dir = std::env::temp_dir().join(format!("unimic-train-import-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let k = 16usize;
    let val = GridSet::synthetic(6, 6, k, 16, 2);
    let mut cfg = GenericConfig::tiny(k);
    cfg.max_side = 8;
    let spec = ModelSpec::Generic(cfg.clone());
    // A trained checkpoint stands in for weights from an outside trainer.
    let mut o = tiny_opts(&dir.join("trained"), 30);
    o.id = "trained".into();
    let r = train(
        &spec,
        &GridSet::synthetic(6, 6, k, 64, 1),
        &val,
        &o,
        &Device::Cpu,
        &mut |_| {},
    )
    .unwrap();
    let trained_val = r.manifest.training.unwrap().val_bits_per_token;
    let src = dir.join("trained").join("trained.safetensors");
    let mut io = tiny_opts(&dir.join("out"), 1);
    io.id = "imported".into();
    io.command = "outside trainer".into();
    let m = import_weights(&spec, &src, &val, &io, 12_345, 3.25, &Device::Cpu).unwrap();
    let t = m.manifest.training.clone().unwrap();
    assert_eq!((t.steps, t.train_bits_per_token), (12_345, 3.25));
    assert!(
        (t.val_bits_per_token - trained_val).abs() < 1e-4,
        "{t:?} vs {trained_val}"
    );
    assert_eq!(t.command, "outside trainer");
    let (model, man) = Generic::load(&m.manifest_path).unwrap();
    assert_eq!(model.content_hash(), man.sha256);
    let g = TokenGrid::new(6, 6, k as u32, val.samples[0].ids.clone()).unwrap();
    assert_eq!(model.decode(6, 6, &model.encode(&g).unwrap()).unwrap(), g);

    // A file missing a tensor, with a wrong shape, or with an extra tensor is refused.
    let write = |name: &str, shapes: &[(String, Vec<usize>)]| {
        let p = dir.join(name);
        std::fs::write(
            &p,
            Weights::synthetic(shapes, 3, 1.0).to_safetensors().unwrap(),
        )
        .unwrap();
        p
    };
    let mut shapes = cfg.tensor_shapes();
    let ok = write("ok.safetensors", &shapes);
    assert!(import_weights(&spec, &ok, &val, &io, 1, 1.0, &Device::Cpu).is_ok());
    shapes.push(("extra.weight".to_string(), vec![2]));
    let extra = write("extra.safetensors", &shapes);
    shapes.pop();
    let last = shapes.pop().unwrap();
    let missing = write("missing.safetensors", &shapes);
    shapes.push((last.0, vec![last.1[0] + 1]));
    let wrong = write("wrong.safetensors", &shapes);
    for bad in [extra, missing, wrong] {
        let e = import_weights(&spec, &bad, &val, &io, 1, 1.0, &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains(&*bad.display().to_string()), "{e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
