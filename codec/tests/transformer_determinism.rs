//! Bit-exactness of the transformer entropy models' deterministic inference path: incremental (KV
//! cache) vs full recompute, vectorisable vs scalar kernels, round trips, and pinned coded bytes.

use unimic_codec::entropy::generic::{Generic, GenericConfig};
use unimic_codec::entropy::masked::{Masked, MaskedConfig};
use unimic_codec::entropy::text_cond::{TextCond, TextCondConfig};
use unimic_codec::grid::TokenGrid;
use unimic_codec::nn::kernels::Kernel;
use unimic_codec::nn::weights::{sha256_hex, splitmix64, Weights};

const K: u32 = 32;

/// A grid with local structure (so a model's probabilities vary), from a fixed integer formula.
fn grid(h: u32, w: u32, seed: u64) -> TokenGrid {
    let mut z = seed;
    let ids = (0..h * w)
        .map(|i| {
            z = splitmix64(z);
            let (r, c) = (i / w, i % w);
            if z % 5 == 0 {
                (z >> 8) as u32 % K
            } else {
                (r / 2 + c / 3 + seed as u32) % K
            }
        })
        .collect();
    TokenGrid::new(h, w, K, ids).unwrap()
}

fn generic() -> Generic {
    Generic::synthetic(&GenericConfig::tiny(K as usize), 11).unwrap()
}

fn masked() -> Masked {
    Masked::synthetic(&MaskedConfig::tiny(K as usize), 12).unwrap()
}

fn text() -> TextCond {
    TextCond::synthetic(&TextCondConfig::tiny(K as usize), 13).unwrap()
}

const PROMPT: [u32; 5] = [3_923, 41, 200_000, 7, 12_345];

#[test]
fn generic_kv_cache_equals_full_recompute() {
    let m = generic();
    let g = grid(6, 7, 1);
    let full = m.weights_full(&g).unwrap();
    let mut cache = m.new_cache();
    let mut w = Vec::new();
    for (t, want) in full.iter().enumerate() {
        let prev = if t == 0 { None } else { Some(g.ids()[t - 1]) };
        m.step(&mut cache, prev, 7, &mut w);
        assert_eq!(&w, want, "position {t}");
    }
    // The weights are not trivial: they differ between positions.
    assert_ne!(full[0], full[1]);
}

#[test]
fn text_kv_cache_equals_full_recompute() {
    let m = text();
    let g = grid(5, 5, 2);
    let full = m.weights_full(&PROMPT, &g).unwrap();
    let mut cache = m.start(&PROMPT);
    let mut w = Vec::new();
    for (t, want) in full.iter().enumerate() {
        let prev = if t == 0 { None } else { Some(g.ids()[t - 1]) };
        m.step(&mut cache, t, prev, 5, &mut w);
        assert_eq!(&w, want, "position {t}");
    }
    // The prompt matters.
    let other = m.weights_full(&PROMPT[..2], &g).unwrap();
    assert_ne!(other[0], full[0]);
}

#[test]
fn scalar_and_lanes_kernels_give_identical_weights() {
    let g = grid(5, 6, 3);
    let a = generic().weights_full(&g).unwrap();
    let b = generic()
        .with_kernel(Kernel::Scalar)
        .weights_full(&g)
        .unwrap();
    assert_eq!(a, b);
    let a = text().weights_full(&PROMPT, &g).unwrap();
    let b = text()
        .with_kernel(Kernel::Scalar)
        .weights_full(&PROMPT, &g)
        .unwrap();
    assert_eq!(a, b);
    let unknown: Vec<bool> = (0..30).map(|i| i % 4 != 0).collect();
    let a = masked().weights_unknown(6, g.ids(), &unknown);
    let b = masked()
        .with_kernel(Kernel::Scalar)
        .weights_unknown(6, g.ids(), &unknown);
    assert_eq!(a.len(), 22);
    assert_eq!(a, b);
}

#[test]
fn generic_round_trip_across_kernels() {
    let g = grid(8, 8, 4);
    let bytes = generic().encode(&g).unwrap();
    assert_eq!(generic().decode(8, 8, &bytes).unwrap(), g);
    let scalar = generic().with_kernel(Kernel::Scalar);
    assert_eq!(scalar.decode(8, 8, &bytes).unwrap(), g);
    // Encoding and decoding on another thread gives the same bytes and grid.
    let g2 = g.clone();
    let other = std::thread::spawn(move || {
        let m = generic();
        let b = m.encode(&g2).unwrap();
        (b.clone(), m.decode(8, 8, &b).unwrap())
    })
    .join()
    .unwrap();
    assert_eq!(other, (bytes, g));
}

#[test]
fn text_round_trip_across_kernels() {
    let g = grid(6, 6, 5);
    let bytes = text().encode(&PROMPT, &g).unwrap();
    let scalar = text().with_kernel(Kernel::Scalar);
    assert_eq!(scalar.decode(&PROMPT, 6, 6, &bytes).unwrap(), g);
    assert_eq!(text().decode(&PROMPT, 6, 6, &bytes).unwrap(), g);
    // No prompt works too.
    let bytes = text().encode(&[], &g).unwrap();
    assert_eq!(text().decode(&[], 6, 6, &bytes).unwrap(), g);
}

fn inpaint(h: usize, w: usize, frac_num: usize, frac_den: usize) -> Vec<bool> {
    // Centred square covering about frac of the grid.
    let side = (((h * w * frac_num) as f64 / frac_den as f64).sqrt().round() as usize).max(1);
    let (r0, c0) = ((h - side.min(h)) / 2, (w - side.min(w)) / 2);
    (0..h * w)
        .map(|i| {
            let (r, c) = (i / w, i % w);
            r >= r0 && r < r0 + side && c >= c0 && c < c0 + side
        })
        .collect()
}

#[test]
fn masked_round_trips_for_every_split() {
    let (h, w) = (8usize, 8usize);
    let g = grid(h as u32, w as u32, 6);
    let splits = [
        ("whole", vec![true; h * w]),
        ("inpaint25", inpaint(h, w, 1, 4)),
        ("inpaint50", inpaint(h, w, 1, 2)),
        (
            "outpaint",
            inpaint(h, w, 3, 4).iter().map(|&b| !b).collect(),
        ),
        ("none", vec![false; h * w]),
        ("single", (0..h * w).map(|i| i == 17).collect()),
    ];
    for (name, unknown) in splits {
        let bytes = masked().encode(&g, &unknown).unwrap();
        // The receiver's tokens at unknown positions are garbage: they must not matter.
        let held: Vec<u32> = g
            .ids()
            .iter()
            .zip(&unknown)
            .map(|(&id, &u)| if u { (id + 7) % K } else { id })
            .collect();
        let back = masked()
            .with_kernel(Kernel::Scalar)
            .decode(h as u32, w as u32, &held, &unknown, &bytes)
            .unwrap();
        assert_eq!(back, g, "split {name}");
        if name == "none" {
            assert!(bytes.is_empty());
        }
    }
}

#[test]
fn masked_codes_fewer_bytes_for_a_smaller_region() {
    let g = grid(8, 8, 7);
    let m = masked();
    let whole = m.encode(&g, &[true; 64]).unwrap().len();
    let part = m.encode(&g, &inpaint(8, 8, 1, 4)).unwrap().len();
    assert!(part < whole, "{part} >= {whole}");
}

#[test]
fn masked_sees_known_cells_on_every_side() {
    // A known cell below and right of the hole changes the weights of the hole's first cell,
    // which a raster-order model could not see.
    let g = grid(6, 6, 8);
    let unknown: Vec<bool> = (0..36).map(|i| (14..16).contains(&i)).collect();
    let m = masked();
    let a = m.weights_unknown(6, g.ids(), &unknown);
    let mut ids = g.ids().to_vec();
    ids[35] = (ids[35] + 1) % K;
    let b = m.weights_unknown(6, &ids, &unknown);
    assert_ne!(a[0], b[0]);
    // Decoding with other known tokens does not reproduce the region: they condition the code.
    let half: Vec<bool> = (0..36).map(|i| i % 2 == 0).collect();
    let region = |ids: &[u32]| -> Vec<u32> {
        ids.iter()
            .zip(&half)
            .filter(|(_, &u)| u)
            .map(|(&x, _)| x)
            .collect()
    };
    let bytes = m.encode(&g, &half).unwrap();
    let other: Vec<u32> = g.ids().iter().map(|&id| (id + 3) % K).collect();
    if let Ok(back) = m.decode(6, 6, &other, &half, &bytes) {
        assert_ne!(region(back.ids()), region(g.ids()));
    }
}

#[test]
fn corrupt_payloads_do_not_panic() {
    let g = grid(6, 6, 9);
    let mut bytes = generic().encode(&g).unwrap();
    for b in bytes.iter_mut().take(4) {
        *b ^= 0x5A;
    }
    let _ = generic().decode(6, 6, &bytes);
    let _ = generic().decode(6, 6, &[]);
    let _ = masked().decode(6, 6, &[99; 36], &[true; 36], &[0xFF; 3]);
    let _ = text().decode(&[u32::MAX], 6, 6, &[1, 2, 3]);
    // Shape errors are reported, not panics.
    assert!(generic().decode(100, 2, &[]).is_err());
    assert!(masked().decode(2, 2, &[0; 3], &[true; 4], &[]).is_err());
    assert!(masked().encode(&g, &[true; 5]).is_err());
    let wrong_k = TokenGrid::new(2, 2, 16, vec![0; 4]).unwrap();
    assert!(generic().encode(&wrong_k).is_err());
}

/// Golden coded bytes: tiny models with weights from the documented integer formula
/// ([`Weights::synthetic`]) and fixed grids. Any change to the arithmetic, the `exp`
/// approximation, the quantization or the coding order changes these hashes.
#[test]
fn golden_coded_bytes() {
    let g = grid(8, 8, 10);
    let gen = generic().encode(&g).unwrap();
    let msk = masked().encode(&g, &inpaint(8, 8, 1, 2)).unwrap();
    let all = masked().encode(&g, &[true; 64]).unwrap();
    let txt = text().encode(&PROMPT, &g).unwrap();
    let got = [
        (gen.len(), sha256_hex(&gen)),
        (msk.len(), sha256_hex(&msk)),
        (all.len(), sha256_hex(&all)),
        (txt.len(), sha256_hex(&txt)),
    ];
    let got: Vec<(usize, &str)> = got.iter().map(|(l, h)| (*l, h.as_str())).collect();
    assert_eq!(got, GOLDEN, "generic, masked inpaint50, masked whole, text");
}

const GOLDEN: [(usize, &str); 4] = [
    (
        38,
        "66cb381ba527aa00baf079462c61af01cd51fcefc807c78a13ec3d86e8810195",
    ),
    (
        24,
        "bc6f0de830b3ba81647124c3c38eee02bd169e510894df4b601262b277a14bea",
    ),
    (
        40,
        "eee48b54cbe7765af19dde6050118ca50c723457c896a2dcc88cbf253308fe8a",
    ),
    (
        44,
        "4c2f486bdce53735fbccd3aa6dca47197db9d596041e2a337c89681ee57fecf1",
    ),
];

#[test]
fn content_hash_names_the_weights() {
    let a = generic();
    let b = Generic::synthetic(&GenericConfig::tiny(K as usize), 12).unwrap();
    assert_eq!(a.content_hash().len(), 64);
    assert_ne!(a.content_hash(), b.content_hash());
    let bytes = Weights::synthetic(&GenericConfig::tiny(K as usize).tensor_shapes(), 11, 1.0)
        .to_safetensors()
        .unwrap();
    let c = Generic::from_safetensors(&GenericConfig::tiny(K as usize), &bytes).unwrap();
    assert_eq!(c.content_hash(), sha256_hex(&bytes));
    assert_eq!(c.content_hash(), a.content_hash());
}

#[test]
fn wrong_checkpoints_are_refused() {
    let cfg = GenericConfig::tiny(K as usize);
    let mut shapes = cfg.tensor_shapes();
    shapes.push(("extra.weight".into(), vec![2]));
    assert!(Generic::from_weights(&cfg, Weights::synthetic(&shapes, 1, 1.0)).is_err());
    shapes.pop();
    shapes.retain(|(n, _)| n != "head.bias");
    assert!(Generic::from_weights(&cfg, Weights::synthetic(&shapes, 1, 1.0)).is_err());
    assert!(Generic::from_safetensors(&cfg, b"not a checkpoint").is_err());
}

#[test]
fn manifest_load_checks_kind_and_hash() {
    use unimic_codec::nn::model::Manifest;
    let dir = std::env::temp_dir().join(format!("unimic-manifest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = GenericConfig::tiny(K as usize);
    let bytes = Weights::synthetic(&cfg.tensor_shapes(), 11, 1.0)
        .to_safetensors()
        .unwrap();
    std::fs::write(dir.join("g.safetensors"), &bytes).unwrap();
    let m = Manifest {
        id: "test-generic".into(),
        kind: "generic".into(),
        weights: "g.safetensors".into(),
        sha256: sha256_hex(&bytes),
        params: cfg.num_params() as u64,
        config: serde_json::to_value(&cfg).unwrap(),
        training: None,
    };
    let path = dir.join("g.json");
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let (model, back) = Generic::load(&path).unwrap();
    assert_eq!(back, m);
    assert_eq!(model.content_hash(), m.sha256);
    assert!(Masked::load(&path).is_err(), "kind is checked");
    let mut tampered = bytes.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    std::fs::write(dir.join("g.safetensors"), &tampered).unwrap();
    assert!(Generic::load(&path).is_err(), "hash is checked");
    std::fs::write(dir.join("g.safetensors"), &bytes).unwrap();
    // Upper-case hex names the same weights.
    let upper = Manifest {
        sha256: m.sha256.to_ascii_uppercase(),
        ..m.clone()
    };
    std::fs::write(&path, serde_json::to_vec(&upper).unwrap()).unwrap();
    assert!(Generic::load(&path).is_ok(), "hash comparison ignores case");
    // The weights must be a file next to the manifest.
    for bad in [
        "../g.safetensors",
        "/etc/passwd",
        "sub/g.safetensors",
        "..",
        "",
    ] {
        let escaping = Manifest {
            weights: bad.into(),
            ..m.clone()
        };
        std::fs::write(&path, serde_json::to_vec(&escaping).unwrap()).unwrap();
        let err = Generic::load(&path).unwrap_err().to_string();
        assert!(err.contains("must be a file name"), "{bad:?}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn default_sizes_are_lightweight() {
    // The 1,024-entry tokenizer: well under the 10 M parameter budget.
    assert_eq!(GenericConfig::small(1024).num_params(), 3_190_272);
    assert_eq!(
        MaskedConfig::small(1024).num_params(),
        3_190_272 + 2 * 64 * 256
    );
    assert_eq!(
        TextCondConfig::small(1024).num_params(),
        3_190_272 + 4096 * 256 + 64 * 256
    );
}
