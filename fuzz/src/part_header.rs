//! Part header validation alone: the bytes of a PART_HEADER payload are parsed as the protocol
//! parser does, and a coded part's header is then checked as a receiver checks it before any
//! context wait or decoding (`unimic_transport::fuzzing::HeaderChecker`), against a session that
//! negotiated every built-in entropy model (tiny synthetic transformers, a three-level ladder, a
//! static grid model) and an image tokenizer of 16 ids.
//!
//! Invariants: no panic; an accepted header is consistent with the rules of PROTOCOL.md
//! §6.2–6.4 (shapes within the limits, token counts, regions, modes against models, ladder
//! levels, transformer positions bounded by the grid); a refused one gets one of the documented
//! codes.

use std::sync::{Arc, OnceLock};

use unimic_codec::entropy::generic::{Generic, GenericConfig};
use unimic_codec::entropy::ladder::{Ladder, LadderModel};
use unimic_codec::entropy::masked::{Masked, MaskedConfig};
use unimic_codec::entropy::text_cond::{TextCond, TextCondConfig};
use unimic_codec::entropy::Static;
use unimic_codec::part::CodecConfig;
use unimic_protocol::{CodingMode, Decode, ErrorCode, Limits, PartBody, PartHeader, VarInt};
use unimic_transport::fuzzing::HeaderChecker;
use unimic_transport::TokenizerInfo;

const K: u32 = 16;

/// The limits the target runs under (small grids, so that masked layouts stay cheap).
pub fn limits() -> Limits {
    Limits {
        max_grid_height: VarInt::from_u32(24),
        max_grid_width: VarInt::from_u32(24),
        ..Limits::default()
    }
}

fn checker() -> &'static HeaderChecker {
    static C: OnceLock<HeaderChecker> = OnceLock::new();
    C.get_or_init(|| {
        let k = K as usize;
        let ladder = Ladder::new(
            (2..=4)
                .map(|l| LadderModel::new(l, 1, Static::from_counts(vec![1; k]).unwrap()))
                .collect(),
        )
        .unwrap();
        let codec = CodecConfig::default()
            .with_generic(Arc::new(
                Generic::synthetic(&GenericConfig::tiny(k), 1).unwrap(),
            ))
            .with_masked(Arc::new(
                Masked::synthetic(&MaskedConfig::tiny(k), 2).unwrap(),
            ))
            .with_text_cond(Arc::new(
                TextCond::synthetic(&TextCondConfig::tiny(k), 3).unwrap(),
            ))
            .with_static_grid(Arc::new(Static::from_counts(vec![1; k]).unwrap()))
            .with_ladder(Arc::new(ladder));
        let tokenizers = [
            TokenizerInfo::o200k(),
            TokenizerInfo::image("fuzz-vq", [9; 32], K, 16),
        ];
        HeaderChecker::new(&codec, &tokenizers, limits())
    })
}

/// The checker the target uses (for the seed tests).
pub fn checker_for_tests() -> &'static HeaderChecker {
    checker()
}

/// Runs the target on one input (a PART_HEADER payload).
pub fn run(data: &[u8]) {
    let limits = limits();
    let mut buf = data;
    let Ok(header) = PartHeader::decode(&mut buf, &limits) else {
        return;
    };
    let (image, c) = match &header.body {
        PartBody::Text(c) => (false, c),
        PartBody::Image(c) => (true, c),
        _ => return,
    };
    let checker = checker();
    let summary = match checker.check(image, c) {
        Ok(s) => s,
        Err((code, reason)) => {
            assert!(
                [
                    ErrorCode::MODEL_MISSING,
                    ErrorCode::UNSUPPORTED,
                    ErrorCode::PROTOCOL_VIOLATION,
                    ErrorCode::LIMIT_EXCEEDED,
                ]
                .contains(&code),
                "refused with {code}: {reason}"
            );
            assert!(!reason.is_empty());
            return;
        }
    };
    let rows = c.shape.rows.into_inner();
    let cols = c.shape.cols.into_inner();
    let tokens = c.token_count.into_inner();
    assert_eq!(summary.tokens, tokens);
    let model = summary.model.as_str();
    let transformer = matches!(
        model,
        "unimic-entropy/generic" | "unimic-entropy/masked" | "unimic-entropy/text"
    );
    // Modes against models (PROTOCOL.md §6.3).
    assert_eq!(
        matches!(c.mode, CodingMode::Masked(_)),
        model == "unimic-entropy/masked"
    );
    assert_eq!(
        matches!(c.mode, CodingMode::Refinement { .. }),
        model == "unimic-entropy/ladder"
    );
    if model == "unimic-entropy/text" {
        assert_eq!(c.mode, CodingMode::TextConditioned);
    }
    // A transformer part runs the model (unless it is an edit of no cell: an empty region);
    // the other models run none.
    let empty_region = summary.region.as_ref().is_some_and(|r| !r.contains(&true));
    assert_eq!(
        summary.positions > 0,
        transformer && !empty_region,
        "{model}"
    );
    if !image {
        assert_eq!(rows, 1);
        assert_eq!(tokens, cols);
        assert!(summary.grid.is_none() && summary.region.is_none() && summary.level.is_none());
        assert!(!transformer);
        return;
    }
    let (h, w, k) = summary.grid.expect("an accepted image part has a grid");
    assert_eq!((u64::from(h), u64::from(w), k), (rows, cols, K));
    assert!(h >= 1 && w >= 1);
    assert!(u64::from(h) <= limits.max_grid_height.into_inner());
    assert!(u64::from(w) <= limits.max_grid_width.into_inner());
    let cells = u64::from(h) * u64::from(w);
    match &summary.region {
        Some(region) => {
            assert_eq!(region.len() as u64, cells);
            assert_eq!(region.iter().filter(|&&r| r).count() as u64, tokens);
        }
        None => assert_eq!(tokens, cells),
    }
    match (&c.mode, summary.level) {
        (CodingMode::Refinement { level }, Some(l)) => {
            assert_eq!(u64::from(l), level.into_inner());
            assert!((2..=16).contains(&l));
        }
        (_, None) => {}
        (mode, level) => panic!("level {level:?} with mode {mode:?}"),
    }
    // A transformer runs at most the grid's positions plus the text prompt's; the masked model
    // runs the known cells after the region's first cell as a prefix, then the raster up to the
    // region's last cell, so at most twice the grid.
    let most = if summary.region.is_some() {
        2 * cells
    } else {
        cells + 64
    };
    assert!(summary.positions <= most, "{} positions", summary.positions);
}
