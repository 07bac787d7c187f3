//! Rate-distortion optimized level-1 codes (`unimic_codec::rdo`) with the shipped TAEF2
//! tokenizer and generic transformer, on the committed sample photo: λ = 0 is the tokenizer's own
//! grid, a larger λ codes in fewer bytes with codes a little farther, the ladder's later levels
//! quantize what the chosen codes leave, and the errors.
//!
//! The sizes and qualities over Kodak are measured by `unimic bench tokenizer --rdo`, not here.
#![cfg(feature = "vq")]

use std::path::PathBuf;
use std::sync::Arc;

use image::RgbImage;
use unimic_codec::entropy::generic::{Generic, GenericConfig};
use unimic_codec::rdo::{choose_level1, load_dir, RdoConfig, RdoError, RdoTokenizer};
use unimic_codec::shipped::{entropy_dir, manifest_path, GENERIC_ID};
use unimic_codec::tokenizer::{ImageTokenizer, Taef2Tokenizer, TokenizerError};

fn sample(side: u32) -> RgbImage {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../samples/kodim23.png"
    ));
    let img = image::open(&p).expect("samples/kodim23.png").to_rgb8();
    image::imageops::resize(&img, side, side, image::imageops::FilterType::Triangle)
}

fn models() -> (Arc<Taef2Tokenizer>, Arc<Generic>) {
    let tok = Taef2Tokenizer::default_model().expect("the shipped TAEF2 tokenizer");
    let (g, _) = Generic::load(&manifest_path(&entropy_dir(None), GENERIC_ID))
        .expect("the shipped generic model");
    (Arc::new(tok), Arc::new(g))
}

/// Squared distance of each cell's vector to the level-1 codeword it got.
fn distortion(
    tok: &Taef2Tokenizer,
    cells: &unimic_codec::tokenizer::taef2::CellVectors,
    ids: &[u32],
) -> f64 {
    let cb = tok.quantizer().codebook(0);
    let d = cells.dim;
    ids.iter()
        .enumerate()
        .map(|(i, &k)| {
            let c = &cb[k as usize * d..(k as usize + 1) * d];
            cells
                .cell(i)
                .iter()
                .zip(c)
                .map(|(x, y)| f64::from(x - y).powi(2))
                .sum::<f64>()
        })
        .sum()
}

#[test]
fn trades_distance_for_bits() {
    let (tok, generic) = models();
    let img = sample(256);
    let plain = tok.encode_levels(&img, 2).unwrap();
    let cells = tok.embed(&img).unwrap();
    assert_eq!((cells.height, cells.width, cells.dim), (16, 16, 32));
    // embed + quantize_levels is encode_levels.
    assert_eq!(tok.quantize_levels(&cells, 2, None).unwrap(), plain);

    // nearest_k: sorted, its first is the residual search's code.
    let mut near = Vec::new();
    for i in [0, 37, 255] {
        tok.quantizer().nearest_k(0, cells.cell(i), 8, &mut near);
        assert_eq!(near.len(), 8);
        assert_eq!(near[0].1, plain[0].ids()[i]);
        assert!(near.windows(2).all(|w| w[0].0 <= w[1].0), "{near:?}");
    }

    // λ = 0: the nearest codes, nothing changed.
    let (ids0, s0) = choose_level1(
        tok.quantizer(),
        &cells,
        &generic,
        &RdoConfig::with_lambda(0.0),
    )
    .unwrap();
    assert_eq!(ids0, plain[0].ids());
    assert_eq!((s0.changed, s0.extra_distortion), (0, 0.0));
    let bytes0 = generic.encode(&plain[0]).unwrap().len();
    // The estimate is the range coder's size within its termination.
    assert!(
        (s0.bits / 8.0 - bytes0 as f64).abs() <= 4.0,
        "{} vs {bytes0}",
        s0.bits / 8.0
    );

    let mut last = (bytes0, 0.0f64);
    for lambda in [0.05f32, 0.3] {
        let (ids, s) = choose_level1(
            tok.quantizer(),
            &cells,
            &generic,
            &RdoConfig::with_lambda(lambda),
        )
        .unwrap();
        assert!(s.changed > 0, "λ {lambda} changed nothing");
        let grid = unimic_codec::grid::TokenGrid::new(16, 16, 1024, ids.clone()).unwrap();
        let payload = generic.encode(&grid).unwrap();
        assert_eq!(generic.decode(16, 16, &payload).unwrap(), grid);
        // Fewer bytes as λ grows, at a little more distortion.
        assert!(
            payload.len() < last.0,
            "λ {lambda}: {} B, before {} B",
            payload.len(),
            last.0
        );
        assert!(
            s.extra_distortion > last.1 && s.extra_distortion < 0.5,
            "{s:?}"
        );
        let extra = distortion(&tok, &cells, &ids) / distortion(&tok, &cells, &ids0) - 1.0;
        assert!(
            (extra - s.extra_distortion).abs() < 1e-3,
            "{extra} vs {s:?}"
        );
        last = (payload.len(), s.extra_distortion);

        // The wrapper: the same codes, its levels quantize what they leave, same identity.
        let rdo = RdoTokenizer::new(tok.clone(), generic.clone(), RdoConfig::with_lambda(lambda))
            .unwrap();
        let (levels, stats) = rdo.encode_levels_with_stats(&img, 3).unwrap();
        assert_eq!(stats, Some(s));
        assert_eq!(levels[0].ids(), &ids[..]);
        assert_eq!(levels, tok.quantize_levels(&cells, 3, Some(&ids)).unwrap());
        assert_ne!(levels[1], plain[1], "level 2 refines the chosen codes");
        assert_eq!(rdo.encode(&img).unwrap(), levels[0]);
        assert_eq!(
            rdo.decode_levels(&levels).unwrap(),
            tok.decode_levels(&levels).unwrap()
        );
    }
}

#[test]
fn falls_back_and_refuses() {
    let (tok, generic) = models();
    // 1,040 px wide: 65 columns, more than the model's 64 positions: the nearest codes.
    let wide = RgbImage::from_fn(1040, 16, |x, y| {
        image::Rgb([(x % 256) as u8, (y * 9) as u8, 90])
    });
    let rdo = RdoTokenizer::new(tok.clone(), generic.clone(), RdoConfig::with_lambda(0.5)).unwrap();
    let (grids, stats) = rdo.encode_levels_with_stats(&wide, 1).unwrap();
    assert_eq!(stats, None);
    assert_eq!(grids, tok.encode_levels(&wide, 1).unwrap());

    let cells = tok.embed(&sample(32)).unwrap();
    for (cfg, what) in [
        (RdoConfig::with_lambda(-1.0), "lambda"),
        (RdoConfig::with_lambda(f32::NAN), "lambda"),
        (RdoConfig::with_lambda(f32::INFINITY), "lambda"),
        (
            RdoConfig {
                lambda: 0.1,
                candidates: 0,
            },
            "candidates",
        ),
    ] {
        match choose_level1(tok.quantizer(), &cells, &generic, &cfg) {
            Err(e @ RdoError::Config(_)) => assert!(e.to_string().contains(what), "{e}"),
            other => panic!("{cfg:?}: {other:?}"),
        }
        assert!(matches!(
            RdoTokenizer::new(tok.clone(), generic.clone(), cfg),
            Err(RdoError::Config(_))
        ));
        let dir = unimic_codec::tokenizer::default_dir();
        match load_dir(&dir, Some(generic.clone()), cfg) {
            Err(TokenizerError::Rdo(e)) => assert!(matches!(*e, RdoError::Config(_)), "{e}"),
            other => panic!("{cfg:?}: {:?}", other.map(|(_, c)| c)),
        }
    }
    // Vectors that are not the tokenizer's, and a model of another codebook size.
    let mut short = cells.clone();
    short.data.pop();
    let mut wide = cells.clone();
    wide.width = usize::MAX;
    for bad in [short, wide] {
        let r = choose_level1(tok.quantizer(), &bad, &generic, &RdoConfig::default());
        assert!(matches!(r, Err(RdoError::Mismatch(_))), "{r:?}");
    }
    let other = Arc::new(Generic::synthetic(&GenericConfig::tiny(16), 1).unwrap());
    let r = choose_level1(tok.quantizer(), &cells, &other, &RdoConfig::default());
    assert!(
        matches!(&r, Err(RdoError::Mismatch(m)) if m.contains("16")),
        "{r:?}"
    );
    assert!(matches!(
        RdoTokenizer::new(tok.clone(), other.clone(), RdoConfig::default()),
        Err(RdoError::Mismatch(_))
    ));
    // Levels out of range, and level-1 codes that do not fit.
    assert!(matches!(
        rdo.encode_levels_with_stats(&sample(32), 0),
        Err(TokenizerError::Levels { requested: 0, .. })
    ));
    assert!(matches!(
        rdo.encode_levels_with_stats(&sample(32), 5),
        Err(TokenizerError::Levels { requested: 5, .. })
    ));
    assert!(matches!(
        tok.quantize_levels(&cells, 1, Some(&[0, 1, 2])),
        Err(TokenizerError::Config(_))
    ));
    assert!(matches!(
        tok.quantize_levels(&cells, 1, Some(&[1024, 0, 0, 0])),
        Err(TokenizerError::Config(_))
    ));

    // load_dir wraps only a TAEF2 tokenizer, with a model, at λ > 0, and says so.
    let dir = unimic_codec::tokenizer::default_dir();
    let img = sample(64);
    let (wrapped, cfg) =
        load_dir(&dir, Some(generic.clone()), RdoConfig::with_lambda(0.3)).unwrap();
    assert_eq!(cfg, Some(RdoConfig::with_lambda(0.3)));
    let (direct, _) = RdoTokenizer::new(tok.clone(), generic.clone(), RdoConfig::with_lambda(0.3))
        .unwrap()
        .encode_levels_with_stats(&img, 1)
        .unwrap();
    assert_eq!(wrapped.encode(&img).unwrap(), direct[0]);
    assert_ne!(
        direct[0],
        tok.encode(&img).unwrap(),
        "λ 0.3 changes some code"
    );
    for (plain, cfg) in [
        load_dir(&dir, None, RdoConfig::with_lambda(0.3)).unwrap(),
        load_dir(&dir, Some(generic.clone()), RdoConfig::with_lambda(0.0)).unwrap(),
    ] {
        assert_eq!(cfg, None);
        assert_eq!(plain.encode(&img).unwrap(), tok.encode(&img).unwrap());
    }
    let r = load_dir(&dir, Some(other), RdoConfig::default());
    assert!(
        matches!(r, Err(TokenizerError::Rdo(_))),
        "{:?}",
        r.map(|(_, c)| c)
    );
}

/// A grid wider than tall: the model reads the chosen codes in raster order, so the estimate
/// of their bits is the range coder's size (a walk with the sides swapped would be off).
#[test]
fn wide_grids_are_walked_in_raster_order() {
    let (tok, generic) = models();
    let img = image::imageops::resize(
        &sample(256),
        256,
        128,
        image::imageops::FilterType::Triangle,
    );
    let cells = tok.embed(&img).unwrap();
    assert_eq!((cells.height, cells.width), (8, 16));
    let (ids, s) = choose_level1(
        tok.quantizer(),
        &cells,
        &generic,
        &RdoConfig::with_lambda(0.1),
    )
    .unwrap();
    assert!(s.changed > 0);
    let grid = unimic_codec::grid::TokenGrid::new(8, 16, 1024, ids).unwrap();
    let payload = generic.encode(&grid).unwrap();
    assert!(
        (s.bits / 8.0 - payload.len() as f64).abs() <= 4.0,
        "{} vs {}",
        s.bits / 8.0,
        payload.len()
    );
    // The same codes read as a 16×8 grid (what a walk with the sides swapped would price).
    let swapped = unimic_codec::grid::TokenGrid::new(16, 8, 1024, grid.ids().to_vec()).unwrap();
    let t_bytes = generic.encode(&swapped).unwrap().len();
    assert!(
        (s.bits / 8.0 - t_bytes as f64).abs() > 4.0,
        "the swapped grid costs {t_bytes} B too"
    );
}
