//! The generic transformer through the part facade (`ModelChoice::Generic`): round trips, identity
//! by content hash, and the typed refusals (no model, other weights, chunking, text parts, grids
//! beyond the position tables, corrupt payloads).

use std::sync::Arc;

use unimic_codec::context::{ContextKey, Sequence, SessionContext};
use unimic_codec::entropy::generic::{Generic, GenericConfig};
use unimic_codec::grid::TokenGrid;
use unimic_codec::nn::weights::splitmix64;
use unimic_codec::part::{
    model_id, CodecConfig, DecodedPart, ModelChoice, PartCodec, PartError, PartShape, PartSpec,
    PartTokens,
};

const K: u32 = 16;

fn model(seed: u64) -> Arc<Generic> {
    Arc::new(Generic::synthetic(&GenericConfig::tiny(K as usize), seed).unwrap())
}

fn grid(h: u32, w: u32, seed: u64) -> TokenGrid {
    let mut z = seed;
    let ids = (0..h * w)
        .map(|_| {
            z = splitmix64(z);
            (z % u64::from(K)) as u32
        })
        .collect();
    TokenGrid::new(h, w, K, ids).unwrap()
}

fn shape(g: &TokenGrid) -> PartShape {
    PartShape::Grid {
        height: g.height(),
        width: g.width(),
        codebook_size: g.codebook_size(),
    }
}

#[test]
fn round_trip_with_context_references() {
    let m = model(1);
    let mut ctx = SessionContext::new(1 << 20);
    let earlier = grid(4, 4, 9);
    ctx.insert(ContextKey::new(0, 0), Sequence::grid(&earlier))
        .unwrap();
    let g = grid(5, 7, 2);
    let spec = PartSpec::new(ModelChoice::Generic).with_refs(vec![ContextKey::new(0, 0)]);
    let mut sender = PartCodec::new(CodecConfig::default().with_generic(m.clone()));
    let part = sender.encode(&ctx, PartTokens::Grid(&g), &spec).unwrap();
    assert_eq!(part.chunks.len(), 1);
    assert_eq!(part.model.id, model_id::GENERIC_GRID);
    assert_eq!(hex(&part.model.hash), m.content_hash());
    // The facade's payload is exactly the model's own payload.
    assert_eq!(part.chunks[0].payload, m.encode(&g).unwrap());
    assert!(part.cross_entropy_bits > 0.0);

    let mut receiver = PartCodec::new(CodecConfig::default().with_generic(m));
    let dec = receiver
        .decoder(&ctx, shape(&g), &spec, &part.digest, &part.model)
        .unwrap();
    assert_eq!(dec.chunks(), 1);
    let back = dec
        .decode_all(part.chunks.iter().map(|c| c.payload.as_slice()))
        .unwrap();
    assert_eq!(back, DecodedPart::Grid(g));
}

#[test]
fn identity_and_availability_are_checked() {
    let ctx = SessionContext::new(1 << 20);
    let g = grid(4, 4, 3);
    let spec = PartSpec::new(ModelChoice::Generic);
    let mut sender = PartCodec::new(CodecConfig::default().with_generic(model(1)));
    let part = sender.encode(&ctx, PartTokens::Grid(&g), &spec).unwrap();

    // A receiver without the model.
    let mut none = PartCodec::default();
    let err = none
        .decoder(&ctx, shape(&g), &spec, &part.digest, &part.model)
        .unwrap_err();
    assert!(matches!(err, PartError::ModelUnavailable { .. }), "{err}");
    // A receiver with other weights: the content hash differs.
    let mut other = PartCodec::new(CodecConfig::default().with_generic(model(2)));
    let err = other
        .decoder(&ctx, shape(&g), &spec, &part.digest, &part.model)
        .unwrap_err();
    assert!(matches!(err, PartError::ModelMismatch { .. }), "{err}");
    // Text parts and other codebooks are not for this model.
    let err = sender
        .encode(&ctx, PartTokens::Text(&[1, 2, 3]), &spec)
        .unwrap_err();
    assert!(matches!(err, PartError::ModelUnavailable { .. }), "{err}");
    let g32 = TokenGrid::new(2, 2, 32, vec![0, 1, 2, 31]).unwrap();
    let err = sender
        .encode(&ctx, PartTokens::Grid(&g32), &spec)
        .unwrap_err();
    assert!(matches!(err, PartError::ModelUnavailable { .. }), "{err}");
}

#[test]
fn chunked_parts_decode_in_order_and_oversized_grids_are_refused() {
    let ctx = SessionContext::new(1 << 20);
    let m = model(1);
    let mut codec = PartCodec::new(CodecConfig::default().with_generic(m.clone()));
    let g = grid(4, 4, 5);
    // In chunks of 6: 6 + 6 + 4 tokens, each its own payload, decoded on one run of the model.
    let chunked = PartSpec::new(ModelChoice::Generic).with_chunk_tokens(6);
    let part = codec.encode(&ctx, PartTokens::Grid(&g), &chunked).unwrap();
    let counts: Vec<u32> = part.chunks.iter().map(|c| c.tokens).collect();
    assert_eq!(counts, [6, 6, 4]);
    let dec = codec
        .decoder(&ctx, shape(&g), &chunked, &part.digest, &part.model)
        .unwrap();
    let err = dec.decode_chunk(2, &part.chunks[2].payload).unwrap_err();
    assert_eq!(
        err,
        PartError::ChunkOrder {
            expected: 0,
            got: 2
        }
    );
    let mut ids = Vec::new();
    for (i, c) in part.chunks.iter().enumerate() {
        ids.extend(dec.decode_chunk(i as u64, &c.payload).unwrap());
    }
    assert_eq!(ids, g.ids());
    // A chunk decoded again gives the same tokens (the model runs again up to it); the chunks
    // after it must then follow it again.
    assert_eq!(
        dec.decode_chunk(1, &part.chunks[1].payload).unwrap(),
        &g.ids()[6..12]
    );
    assert_eq!(
        dec.decode_chunk(0, &part.chunks[0].payload).unwrap(),
        &g.ids()[..6]
    );
    assert!(matches!(
        dec.decode_chunk(2, &part.chunks[2].payload),
        Err(PartError::ChunkOrder {
            expected: 1,
            got: 2
        })
    ));
    // A corrupt chunk fails alone: the good one decodes after it.
    let _ = dec.decode_chunk(1, &[0xff; 3]);
    assert_eq!(
        dec.decode_chunk(1, &part.chunks[1].payload).unwrap(),
        &g.ids()[6..12]
    );
    // The same probabilities as the part coded whole: the ideal sizes agree.
    let whole = codec
        .encode(
            &ctx,
            PartTokens::Grid(&g),
            &PartSpec::new(ModelChoice::Generic),
        )
        .unwrap();
    assert_eq!(whole.chunks.len(), 1);
    assert!((whole.cross_entropy_bits - part.cross_entropy_bits).abs() < 1e-9);
    // A chunk size covering the whole part is one chunk, the model's one-shot payload.
    let one = PartSpec::new(ModelChoice::Generic).with_chunk_tokens(16);
    let part = codec.encode(&ctx, PartTokens::Grid(&g), &one).unwrap();
    assert_eq!(part.chunks.len(), 1);
    assert_eq!(part.chunks[0].payload, m.encode(&g).unwrap());

    // Beyond the position tables (tiny: 16 per side).
    let side = m.config().max_side as u32 + 1;
    let big = grid(side, 2, 6);
    let spec = PartSpec::new(ModelChoice::Generic);
    let err = codec
        .encode(&ctx, PartTokens::Grid(&big), &spec)
        .unwrap_err();
    assert!(matches!(err, PartError::Transformer(_)), "{err}");
    let err = codec
        .decoder(&ctx, shape(&big), &spec, &part.digest, &part.model)
        .unwrap_err();
    assert!(matches!(err, PartError::Transformer(_)), "{err}");
}

#[test]
fn corrupt_payloads_give_errors_or_wrong_tokens_never_panics() {
    let ctx = SessionContext::new(1 << 20);
    let m = model(1);
    let mut codec = PartCodec::new(CodecConfig::default().with_generic(m));
    let g = grid(6, 6, 8);
    let spec = PartSpec::new(ModelChoice::Generic);
    let part = codec.encode(&ctx, PartTokens::Grid(&g), &spec).unwrap();
    let dec = codec
        .decoder(&ctx, shape(&g), &spec, &part.digest, &part.model)
        .unwrap();
    let good = &part.chunks[0].payload;
    let mut z = 77u64;
    for i in 0..64 {
        let mut bad = good.clone();
        z = splitmix64(z);
        match i % 3 {
            0 if !bad.is_empty() => {
                let at = (z as usize) % bad.len();
                bad[at] ^= 1 << (z % 8);
            }
            1 => bad.truncate((z as usize) % (good.len() + 1)),
            _ => bad.extend_from_slice(&z.to_be_bytes()),
        }
        if let Ok(ids) = dec.decode_chunk(0, &bad) {
            assert_eq!(ids.len(), g.len());
            assert!(ids.iter().all(|&id| id < K));
        }
    }
    assert!(dec.decode_chunk(1, good).is_err(), "one chunk only");
}

fn hex(b: &[u8; 32]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
