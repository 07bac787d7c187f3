//! Session context: both ends reach the same state, digests refuse mismatches, parts decode
//! chunk by chunk, and corrupt payloads never panic.

use proptest::prelude::*;
use unimic_codec::context::{ContextError, ContextKey, Sequence, SessionContext};
use unimic_codec::grid::TokenGrid;
use unimic_codec::part::{
    CodecConfig, DecodedPart, ModelChoice, PartCodec, PartError, PartShape, PartSpec, PartTokens,
};

#[derive(Debug, Clone)]
enum Op {
    Text(u64, Vec<u32>),
    Grid(u64, u32, Vec<u32>),
    Evict(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..20, prop::collection::vec(0u32..200_019, 0..30)).prop_map(|(m, v)| Op::Text(m, v)),
        (0u64..20, 1u32..5, prop::collection::vec(0u32..1024, 1..5))
            .prop_map(|(m, w, v)| Op::Grid(m, w, v)),
        (0u64..20).prop_map(Op::Evict),
    ]
}

fn apply(ctx: &mut SessionContext, ops: &[Op]) -> Vec<Vec<ContextKey>> {
    let mut evictions = Vec::new();
    for op in ops {
        match op {
            Op::Text(m, ids) => {
                if let Ok(ev) = ctx.insert(ContextKey::new(*m, 0), Sequence::text(ids.clone())) {
                    evictions.push(ev);
                }
            }
            Op::Grid(m, w, ids) => {
                let h = ids.len() as u32;
                let ids: Vec<u32> = (0..h * w).map(|i| ids[(i % h) as usize]).collect();
                let g = TokenGrid::new(h, *w, 1024, ids).unwrap();
                if let Ok(ev) = ctx.insert(ContextKey::new(*m, 1), Sequence::grid(&g)) {
                    evictions.push(ev);
                }
            }
            Op::Evict(m) => {
                ctx.evict(ContextKey::new(*m, 0));
            }
        }
    }
    evictions
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn same_operations_same_state(ops in prop::collection::vec(op(), 0..40), budget in 0u64..400) {
        let mut a = SessionContext::new(budget);
        let mut b = SessionContext::new(budget);
        let ea = apply(&mut a, &ops);
        let eb = apply(&mut b, &ops);
        prop_assert_eq!(ea, eb);
        prop_assert!(a.used_bytes() <= budget);
        prop_assert_eq!(a.keys(), b.keys());
        let keys = a.keys();
        prop_assert_eq!(a.digest(&keys).unwrap(), b.digest(&keys).unwrap());
        prop_assert_eq!(&a, &b);
    }

    #[test]
    fn text_parts_round_trip_through_the_facade(
        turns in prop::collection::vec(prop::collection::vec(0u32..200_019, 0..25), 1..5),
        chunk in 0u32..8,
    ) {
        let mut ctx = SessionContext::new(1 << 20);
        let mut sender = PartCodec::default();
        let mut receiver = PartCodec::default();
        for (i, ids) in turns.iter().enumerate() {
            for model in [ModelChoice::Uniform, ModelChoice::Adaptive] {
                let spec = PartSpec::new(model).with_refs(ctx.keys()).with_chunk_tokens(chunk);
                let part = sender.encode(&ctx, PartTokens::Text(ids), &spec).unwrap();
                let shape = PartShape::Text { count: ids.len() as u64 };
                let dec = receiver.decoder(&ctx, shape, &spec, &part.digest, &part.model).unwrap();
                prop_assert_eq!(dec.chunks(), part.chunks.len() as u64);
                let back = dec.decode_all(part.chunks.iter().map(|c| c.payload.as_slice())).unwrap();
                prop_assert_eq!(back, DecodedPart::Text(ids.clone()));
            }
            ctx.insert(ContextKey::new(i as u64, 0), Sequence::text(ids.clone())).unwrap();
        }
    }

    #[test]
    fn corrupt_payloads_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64), count in 0u64..300) {
        let ctx = SessionContext::new(1 << 16);
        let mut codec = PartCodec::default();
        for model in [ModelChoice::Uniform, ModelChoice::Adaptive] {
            let spec = PartSpec::new(model);
            let id = codec.identity(model, unimic_codec::context::SequenceKind::Text).unwrap();
            let digest = ctx.digest(&[]).unwrap();
            let dec = codec.decoder(&ctx, PartShape::Text { count }, &spec, &digest, &id).unwrap();
            if let Ok(ids) = dec.decode_chunk(0, &bytes) {
                prop_assert_eq!(ids.len() as u64, count);
            }
            let shape = PartShape::Grid { height: 3, width: (count as u32 % 40) + 1, codebook_size: 16_384 };
            let id = codec.identity(model, unimic_codec::context::SequenceKind::Grid).unwrap();
            let dec = codec.decoder(&ctx, shape, &spec, &digest, &id).unwrap();
            let _ = dec.decode_chunk(0, &bytes);
        }
    }
}

fn grid(h: u32, w: u32, seed: u32) -> TokenGrid {
    let ids = (0..h * w)
        .map(|i| ((i / 3).wrapping_mul(2654435761u32.wrapping_mul(seed + 1)) >> 7) % 64)
        .collect();
    TokenGrid::new(h, w, 16_384, ids).unwrap()
}

#[test]
fn digest_mismatch_is_refused_before_decoding() {
    let mut sender_ctx = SessionContext::new(1 << 20);
    let mut receiver_ctx = SessionContext::new(1 << 20);
    let key = ContextKey::new(7, 0);
    sender_ctx
        .insert(key, Sequence::text(vec![1, 2, 3]))
        .unwrap();
    receiver_ctx
        .insert(key, Sequence::text(vec![1, 2, 4]))
        .unwrap();
    let spec = PartSpec::new(ModelChoice::Adaptive).with_refs(vec![key]);
    let mut codec = PartCodec::default();
    let part = codec
        .encode(&sender_ctx, PartTokens::Text(&[1, 2, 3]), &spec)
        .unwrap();
    let err = codec
        .decoder(
            &receiver_ctx,
            PartShape::Text { count: 3 },
            &spec,
            &part.digest,
            &part.model,
        )
        .unwrap_err();
    assert!(matches!(
        err,
        PartError::Context(ContextError::DigestMismatch { .. })
    ));
    // A reference the receiver evicted is refused too.
    receiver_ctx.evict(key);
    let err = codec
        .decoder(
            &receiver_ctx,
            PartShape::Text { count: 3 },
            &spec,
            &part.digest,
            &part.model,
        )
        .unwrap_err();
    assert!(matches!(err, PartError::Context(ContextError::Missing(_))));
}

#[test]
fn model_identity_mismatch_is_refused() {
    let ctx = SessionContext::new(1 << 20);
    let mut codec = PartCodec::default();
    let spec = PartSpec::new(ModelChoice::Adaptive);
    let part = codec
        .encode(&ctx, PartTokens::Text(&[5, 6]), &spec)
        .unwrap();
    let mut wrong = part.model;
    wrong.hash[0] ^= 1;
    assert!(matches!(
        codec.decoder(
            &ctx,
            PartShape::Text { count: 2 },
            &spec,
            &part.digest,
            &wrong
        ),
        Err(PartError::ModelMismatch { .. })
    ));
}

#[test]
fn grid_chunks_decode_independently_and_corruption_stays_local() {
    let mut ctx = SessionContext::new(1 << 20);
    ctx.insert(ContextKey::new(0, 0), Sequence::grid(&grid(16, 16, 1)))
        .unwrap();
    let g = grid(16, 16, 1);
    let spec = PartSpec::new(ModelChoice::Adaptive)
        .with_refs(ctx.keys())
        .with_chunk_tokens(64);
    let mut sender = PartCodec::default();
    let part = sender.encode(&ctx, PartTokens::Grid(&g), &spec).unwrap();
    assert_eq!(part.chunks.len(), 4);
    let mut receiver = PartCodec::default();
    let shape = PartShape::Grid {
        height: 16,
        width: 16,
        codebook_size: 16_384,
    };
    let dec = receiver
        .decoder(&ctx, shape, &spec, &part.digest, &part.model)
        .unwrap();
    // Out of order, one at a time.
    for i in [3u64, 0, 2, 1] {
        let got = dec
            .decode_chunk(i, &part.chunks[i as usize].payload)
            .unwrap();
        let (s, e) = dec.chunk_range(i).unwrap();
        assert_eq!(got, g.ids()[s as usize..e as usize]);
    }
    // Corrupt chunk 1: chunks 0, 2, 3 still decode exactly.
    let mut bad = part.chunks[1].payload.clone();
    for b in &mut bad {
        *b ^= 0x5A;
    }
    let _ = dec.decode_chunk(1, &bad);
    for i in [0u64, 2, 3] {
        let got = dec
            .decode_chunk(i, &part.chunks[i as usize].payload)
            .unwrap();
        let (s, e) = dec.chunk_range(i).unwrap();
        assert_eq!(got, g.ids()[s as usize..e as usize]);
    }
    assert!(matches!(
        dec.decode_chunk(4, &[]),
        Err(PartError::NoSuchChunk { .. })
    ));
}

#[test]
fn context_makes_the_second_image_cheaper() {
    let mut ctx = SessionContext::new(1 << 20);
    let g = grid(16, 16, 3);
    let mut codec = PartCodec::default();
    let spec = PartSpec::new(ModelChoice::Adaptive);
    let cold = codec.encode(&ctx, PartTokens::Grid(&g), &spec).unwrap();
    ctx.insert(ContextKey::new(0, 0), Sequence::grid(&g))
        .unwrap();
    let spec = spec.with_refs(ctx.keys());
    let warm = codec.encode(&ctx, PartTokens::Grid(&g), &spec).unwrap();
    assert!(warm.bits * 2 < cold.bits, "{} vs {}", warm.bits, cold.bits);
}

#[test]
fn static_model_needs_configuration_and_matching_codebook() {
    let ctx = SessionContext::new(1 << 20);
    let g = grid(4, 4, 0);
    let mut codec = PartCodec::default();
    let spec = PartSpec::new(ModelChoice::Static);
    assert!(matches!(
        codec.encode(&ctx, PartTokens::Grid(&g), &spec),
        Err(PartError::ModelUnavailable { .. })
    ));
    let st = unimic_codec::entropy::Static::train(16_384, [g.ids()]).unwrap();
    let mut codec = PartCodec::new(CodecConfig::default().with_static_grid(st.into()));
    let part = codec.encode(&ctx, PartTokens::Grid(&g), &spec).unwrap();
    let shape = PartShape::Grid {
        height: 4,
        width: 4,
        codebook_size: 16_384,
    };
    let dec = codec
        .decoder(&ctx, shape, &spec, &part.digest, &part.model)
        .unwrap();
    assert_eq!(
        dec.decode_all([part.chunks[0].payload.as_slice()]).unwrap(),
        DecodedPart::Grid(g)
    );
}

#[test]
fn empty_digest_matches_the_protocol_constant() {
    // unimic_protocol::EMPTY_CONTEXT_DIGEST (docs/PROTOCOL.md), copied: codec does not depend on
    // the protocol crate.
    let want: [u8; 32] = [
        0x0d, 0x21, 0x1c, 0x00, 0x36, 0x46, 0x88, 0x50, 0x94, 0x96, 0xf5, 0xe8, 0x32, 0x9e, 0x0a,
        0x6a, 0x8b, 0xdb, 0x3d, 0x91, 0xd7, 0xd8, 0x30, 0xea, 0x4a, 0x70, 0xae, 0x11, 0x12, 0x91,
        0xab, 0xcb,
    ];
    assert_eq!(SessionContext::new(0).digest(&[]).unwrap(), want);
}
