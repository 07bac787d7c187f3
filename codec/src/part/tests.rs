//! The masked and text-conditioned transformers through the facade, with tiny synthetic
//! models: round trips, identity by weights hash, and the typed refusals.
use super::*;
use crate::context::Sequence;
use crate::entropy::masked::MaskedConfig;
use crate::entropy::text_cond::TextCondConfig;
use crate::nn::weights::splitmix64;

const K: u32 = 16;

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

fn masked(seed: u64) -> Arc<Masked> {
    Arc::new(Masked::synthetic(&MaskedConfig::tiny(K as usize), seed).unwrap())
}

fn text_cond(seed: u64) -> Arc<TextCond> {
    Arc::new(TextCond::synthetic(&TextCondConfig::tiny(K as usize), seed).unwrap())
}

fn hex(h: &[u8; 32]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// The reference 6 × 5 image as (0, 0), and an edit of it: the 2 × 3 block at row 2, column
/// 1 replaced. Returns (context, edited grid, region).
fn edit_setup() -> (SessionContext, TokenGrid, Vec<bool>) {
    let mut ctx = SessionContext::new(1 << 20);
    let original = grid(6, 5, 7);
    ctx.insert(ContextKey::new(0, 0), Sequence::grid(&original))
        .unwrap();
    let region: Vec<bool> = (0..30)
        .map(|i| (2..4).contains(&(i / 5)) && (1..4).contains(&(i % 5)))
        .collect();
    let fresh = grid(6, 5, 99);
    let ids = original
        .ids()
        .iter()
        .zip(fresh.ids())
        .zip(&region)
        .map(|((&o, &f), &r)| if r { f } else { o })
        .collect();
    (ctx, TokenGrid::new(6, 5, K, ids).unwrap(), region)
}

#[test]
fn masked_part_codes_only_the_region_and_decodes_to_the_full_grid() {
    let m = masked(12);
    let (ctx, edited, region) = edit_setup();
    let spec = PartSpec::new(ModelChoice::Masked)
        .with_refs(vec![ContextKey::new(0, 0)])
        .with_region(region.clone());
    let mut sender = PartCodec::new(CodecConfig::default().with_masked(m.clone()));
    let part = sender
        .encode(&ctx, PartTokens::Grid(&edited), &spec)
        .unwrap();
    assert_eq!(part.chunks.len(), 1);
    assert_eq!(part.tokens, 6);
    assert_eq!(part.chunks[0].tokens, 6);
    assert_eq!(part.model.id, model_id::MASKED_GRID);
    assert_eq!(hex(&part.model.hash), m.content_hash());
    // The facade's payload is the model's own payload for this split.
    assert_eq!(part.chunks[0].payload, m.encode(&edited, &region).unwrap());
    assert!(part.cross_entropy_bits > 0.0);

    let mut receiver = PartCodec::new(CodecConfig::default().with_masked(m));
    let dec = receiver
        .decoder(&ctx, shape(&edited), &spec, &part.digest, &part.model)
        .unwrap();
    assert_eq!((dec.chunks(), dec.tokens()), (1, 6));
    assert_eq!(dec.chunk_range(0).unwrap(), (0, 6));
    let inside: Vec<u32> = edited
        .ids()
        .iter()
        .zip(&region)
        .filter(|(_, &r)| r)
        .map(|(&id, _)| id)
        .collect();
    assert_eq!(
        dec.decode_chunk(0, &part.chunks[0].payload).unwrap(),
        inside
    );
    let back = dec.decode_all([part.chunks[0].payload.as_slice()]).unwrap();
    assert_eq!(back, DecodedPart::Grid(edited));
    assert_eq!(
        dec.assemble(vec![0; 5]),
        Err(PartError::TokenCount {
            got: 5,
            expected: 6
        })
    );
}

fn ladder() -> Arc<Ladder> {
    use crate::entropy::ladder::LadderModel;
    let l2 = LadderModel::new(2, 1, Static::from_counts((1..=K).collect()).unwrap());
    let l3 = LadderModel::new(3, 1, Static::from_counts(vec![1; K as usize]).unwrap());
    Arc::new(Ladder::new(vec![l2, l3]).unwrap())
}

#[test]
fn ladder_parts_refine_the_level_below_and_round_trip() {
    let ladder = ladder();
    let mut ctx = SessionContext::new(1 << 20);
    let base = grid(4, 5, 3);
    ctx.insert(ContextKey::new(0, 0), Sequence::grid(&base))
        .unwrap();
    let mut sender = PartCodec::new(CodecConfig::default().with_ladder(ladder.clone()));
    let mut receiver = PartCodec::new(CodecConfig::default().with_ladder(ladder.clone()));
    let mut below = ContextKey::new(0, 0);
    for level in 2..=3u32 {
        let g = grid(4, 5, 10 + u64::from(level));
        let spec = PartSpec::new(ModelChoice::Ladder)
            .with_refs(vec![below])
            .with_level(level)
            .with_chunk_tokens(7);
        let part = sender.encode(&ctx, PartTokens::Grid(&g), &spec).unwrap();
        assert_eq!(part.model.id, model_id::LADDER_GRID);
        assert_eq!(part.model.hash, ladder.content_hash());
        assert_eq!(part.chunks.len(), 3);
        let dec = receiver
            .decoder(&ctx, shape(&g), &spec, &part.digest, &part.model)
            .unwrap();
        let back = dec
            .decode_all(part.chunks.iter().map(|c| c.payload.as_slice()))
            .unwrap();
        assert_eq!(back, DecodedPart::Grid(g.clone()));
        let key = ContextKey::new(1, u64::from(level));
        ctx.insert(key, Sequence::refinement(&g, level)).unwrap();
        below = key;
    }
    // Each level is coded by its own model: level 2's skewed counts make the common ids
    // cheaper than level 3's flat model does.
    let common = TokenGrid::new(4, 5, K, vec![K - 1; 20]).unwrap();
    let cost = |level: u32, base: ContextKey| {
        let spec = PartSpec::new(ModelChoice::Ladder)
            .with_refs(vec![base])
            .with_level(level);
        let mut c = PartCodec::new(CodecConfig::default().with_ladder(ladder.clone()));
        c.encode(&ctx, PartTokens::Grid(&common), &spec)
            .unwrap()
            .cross_entropy_bits
    };
    assert!(cost(2, ContextKey::new(0, 0)) < cost(3, ContextKey::new(1, 2)));
}

#[test]
fn a_masked_edit_of_a_refinement_level_is_refused() {
    let mut ctx = SessionContext::new(1 << 20);
    let level2 = grid(6, 5, 7);
    ctx.insert(ContextKey::new(0, 1), Sequence::refinement(&level2, 2))
        .unwrap();
    let mut codec = PartCodec::new(CodecConfig::default().with_masked(masked(12)));
    let spec = PartSpec::new(ModelChoice::Masked)
        .with_refs(vec![ContextKey::new(0, 1)])
        .with_region(vec![true; 30]);
    assert!(matches!(
        codec.encode(&ctx, PartTokens::Grid(&grid(6, 5, 9)), &spec),
        Err(PartError::ReferenceShape { .. })
    ));
}

#[test]
fn ladder_refusals_are_typed() {
    let mut ctx = SessionContext::new(1 << 20);
    ctx.insert(ContextKey::new(0, 0), Sequence::grid(&grid(4, 5, 3)))
        .unwrap();
    ctx.insert(ContextKey::new(0, 1), Sequence::grid(&grid(5, 4, 3)))
        .unwrap();
    ctx.insert(ContextKey::new(0, 2), Sequence::text(vec![1, 2]))
        .unwrap();
    let g = grid(4, 5, 9);
    let mut codec = PartCodec::new(CodecConfig::default().with_ladder(ladder()));
    let mut enc = |spec: PartSpec| codec.encode(&ctx, PartTokens::Grid(&g), &spec).err();
    let on = |refs: Vec<ContextKey>| PartSpec::new(ModelChoice::Ladder).with_refs(refs);
    let base = vec![ContextKey::new(0, 0)];
    assert!(matches!(
        enc(on(base.clone())),
        Some(PartError::Level {
            level: None,
            top: 3
        })
    ));
    for l in [0, 1, 4] {
        assert!(matches!(
            enc(on(base.clone()).with_level(l)),
            Some(PartError::Level { .. })
        ));
    }
    // The level below must be level 1 for level 2, and of the same shape.
    assert!(matches!(
        enc(on(base.clone()).with_level(3)),
        Some(PartError::LadderBase {
            base_level: 1,
            level: 3,
            ..
        })
    ));
    assert!(matches!(
        enc(on(vec![ContextKey::new(0, 1)]).with_level(2)),
        Some(PartError::LadderBase {
            rows: 5,
            cols: 4,
            ..
        })
    ));
    assert!(matches!(
        enc(on(vec![ContextKey::new(0, 2)]).with_level(2)),
        Some(PartError::MissingReference { .. })
    ));
    // A level on another model; the ladder on text; no ladder configured.
    assert!(matches!(
        enc(PartSpec::new(ModelChoice::Adaptive).with_level(2)),
        Some(PartError::LevelNotAllowed { .. })
    ));
    assert!(matches!(
        codec.encode(
            &ctx,
            PartTokens::Text(&[1]),
            &on(base.clone()).with_level(2)
        ),
        Err(PartError::ModelUnavailable { .. })
    ));
    let mut none = PartCodec::new(CodecConfig::default());
    assert!(matches!(
        none.encode(&ctx, PartTokens::Grid(&g), &on(base).with_level(2)),
        Err(PartError::ModelUnavailable { .. })
    ));
}

#[test]
fn a_masked_edit_of_no_cell_decodes_to_the_reference() {
    let (ctx, _, _) = edit_setup();
    let reference = match ctx.get(ContextKey::new(0, 0)) {
        Some(s) => TokenGrid::new(s.rows(), s.cols(), K, s.ids().to_vec()).unwrap(),
        None => unreachable!(),
    };
    let spec = PartSpec::new(ModelChoice::Masked)
        .with_refs(vec![ContextKey::new(0, 0)])
        .with_region(vec![false; 30]);
    let mut codec = PartCodec::new(CodecConfig::default().with_masked(masked(12)));
    let part = codec
        .encode(&ctx, PartTokens::Grid(&reference), &spec)
        .unwrap();
    assert_eq!(part.tokens, 0);
    let dec = codec
        .decoder(&ctx, shape(&reference), &spec, &part.digest, &part.model)
        .unwrap();
    assert_eq!(dec.tokens(), 0);
    let back = dec
        .decode_all(part.chunks.iter().map(|c| c.payload.as_slice()))
        .unwrap();
    assert_eq!(back, DecodedPart::Grid(reference));
}

#[test]
fn masked_part_in_chunks_decodes_in_order() {
    let (ctx, edited, region) = edit_setup();
    let spec = PartSpec::new(ModelChoice::Masked)
        .with_refs(vec![ContextKey::new(0, 0)])
        .with_region(region)
        .with_chunk_tokens(4);
    let mut codec = PartCodec::new(CodecConfig::default().with_masked(masked(12)));
    let part = codec
        .encode(&ctx, PartTokens::Grid(&edited), &spec)
        .unwrap();
    assert_eq!(part.tokens, 6);
    assert_eq!(
        part.chunks.iter().map(|c| c.tokens).collect::<Vec<_>>(),
        [4, 2]
    );
    let dec = PartCodec::new(codec.config().clone())
        .decoder(&ctx, shape(&edited), &spec, &part.digest, &part.model)
        .unwrap();
    assert_eq!(dec.chunks(), 2);
    assert_eq!(
        dec.decode_chunk(1, &part.chunks[1].payload),
        Err(PartError::ChunkOrder {
            expected: 0,
            got: 1
        })
    );
    let payloads = part.chunks.iter().map(|c| c.payload.as_slice());
    assert_eq!(dec.decode_all(payloads).unwrap(), DecodedPart::Grid(edited));
}

#[test]
fn masked_part_refusals_are_typed() {
    let (mut ctx, edited, region) = edit_setup();
    ctx.insert(ContextKey::new(0, 1), Sequence::text(vec![1, 2, 3]))
        .unwrap();
    ctx.insert(ContextKey::new(0, 2), Sequence::grid(&grid(5, 6, 1)))
        .unwrap();
    let mut codec = PartCodec::new(
        CodecConfig::default()
            .with_masked(masked(12))
            .with_generic(Arc::new(
                Generic::synthetic(&crate::entropy::generic::GenericConfig::tiny(K as usize), 1)
                    .unwrap(),
            )),
    );
    let refs = vec![ContextKey::new(0, 0)];
    let base = PartSpec::new(ModelChoice::Masked).with_refs(refs.clone());
    let mut enc = |spec: &PartSpec, g: &TokenGrid| {
        codec
            .encode(&ctx, PartTokens::Grid(g), spec)
            .map(|p| p.tokens)
    };
    assert_eq!(enc(&base, &edited), Err(PartError::RegionRequired));
    assert_eq!(
        enc(&base.clone().with_region(vec![true; 29]), &edited),
        Err(PartError::RegionSize {
            cells: 29,
            expected: 30
        })
    );
    for model in [ModelChoice::Adaptive, ModelChoice::Generic] {
        let spec = PartSpec::new(model)
            .with_refs(refs.clone())
            .with_region(region.clone());
        assert_eq!(
            enc(&spec, &edited),
            Err(PartError::RegionNotAllowed { model })
        );
    }
    // Only a text reference: no image to take the known cells from.
    let text_only = PartSpec::new(ModelChoice::Masked)
        .with_refs(vec![ContextKey::new(0, 1)])
        .with_region(region.clone());
    assert_eq!(
        enc(&text_only, &edited),
        Err(PartError::MissingReference {
            model: ModelChoice::Masked,
            kind: SequenceKind::Grid
        })
    );
    // The first image reference is 5 × 6, the part 6 × 5.
    let other_shape = PartSpec::new(ModelChoice::Masked)
        .with_refs(vec![ContextKey::new(0, 1), ContextKey::new(0, 2)])
        .with_region(region.clone());
    assert!(matches!(
        enc(&other_shape, &edited),
        Err(PartError::ReferenceShape { key, rows: 5, cols: 6, .. }) if key == ContextKey::new(0, 2)
    ));
    // A grid that differs from the reference outside the region.
    let mut ids = edited.ids().to_vec();
    ids[29] = (ids[29] + 1) % K;
    let off = TokenGrid::new(6, 5, K, ids).unwrap();
    let spec = base.clone().with_region(region.clone());
    assert_eq!(enc(&spec, &off), Err(PartError::OutsideRegion { cell: 29 }));
    // A reference the context does not hold.
    let unknown_ref = PartSpec::new(ModelChoice::Masked)
        .with_refs(vec![ContextKey::new(8, 0)])
        .with_region(region.clone());
    assert!(matches!(
        enc(&unknown_ref, &edited),
        Err(PartError::Context(ContextError::Missing(_)))
    ));
    // A codec without the masked model, and one with other weights.
    let part = codec
        .encode(&ctx, PartTokens::Grid(&edited), &spec)
        .unwrap();
    assert_eq!(
        PartCodec::default()
            .encode(&ctx, PartTokens::Grid(&edited), &spec)
            .map(|p| p.tokens),
        Err(PartError::ModelUnavailable {
            model: ModelChoice::Masked,
            kind: SequenceKind::Grid
        })
    );
    let mut other = PartCodec::new(CodecConfig::default().with_masked(masked(13)));
    assert!(matches!(
        other.decoder(&ctx, shape(&edited), &spec, &part.digest, &part.model),
        Err(PartError::ModelMismatch { .. })
    ));
}

#[test]
fn text_conditioned_part_reads_the_text_references_in_order() {
    let t = text_cond(13);
    let mut ctx = SessionContext::new(1 << 20);
    let (a, b) = (vec![3923u32, 41, 200_000], vec![7u32, 12_345]);
    ctx.insert(ContextKey::new(0, 0), Sequence::text(a.clone()))
        .unwrap();
    ctx.insert(ContextKey::new(0, 1), Sequence::grid(&grid(3, 3, 4)))
        .unwrap();
    ctx.insert(ContextKey::new(2, 0), Sequence::text(b.clone()))
        .unwrap();
    let g = grid(5, 4, 21);
    let refs = vec![
        ContextKey::new(0, 0),
        ContextKey::new(0, 1),
        ContextKey::new(2, 0),
    ];
    let spec = PartSpec::new(ModelChoice::TextCond).with_refs(refs);
    let mut sender = PartCodec::new(CodecConfig::default().with_text_cond(t.clone()));
    let part = sender.encode(&ctx, PartTokens::Grid(&g), &spec).unwrap();
    assert_eq!(part.model.id, model_id::TEXT_COND_GRID);
    assert_eq!(hex(&part.model.hash), t.content_hash());
    assert_eq!((part.chunks.len(), part.tokens), (1, 20));
    // The prompt is the text references concatenated in the order listed.
    let prompt: Vec<u32> = a.iter().chain(&b).copied().collect();
    assert_eq!(part.chunks[0].payload, t.encode(&prompt, &g).unwrap());
    let swapped = PartSpec::new(ModelChoice::TextCond)
        .with_refs(vec![ContextKey::new(2, 0), ContextKey::new(0, 0)]);
    let prompt2: Vec<u32> = b.iter().chain(&a).copied().collect();
    let part2 = sender.encode(&ctx, PartTokens::Grid(&g), &swapped).unwrap();
    assert_eq!(part2.chunks[0].payload, t.encode(&prompt2, &g).unwrap());

    let mut receiver = PartCodec::new(CodecConfig::default().with_text_cond(t));
    let dec = receiver
        .decoder(&ctx, shape(&g), &spec, &part.digest, &part.model)
        .unwrap();
    let back = dec.decode_all([part.chunks[0].payload.as_slice()]).unwrap();
    assert_eq!(back, DecodedPart::Grid(g));
}

#[test]
fn text_conditioned_prompt_beyond_max_text_matches_the_model() {
    let t = text_cond(13);
    let mut ctx = SessionContext::new(1 << 20);
    let long: Vec<u32> = (0..6).map(|i| 1000 + i).collect();
    ctx.insert(ContextKey::new(0, 0), Sequence::text(long.clone()))
        .unwrap();
    ctx.insert(ContextKey::new(0, 1), Sequence::text(long.clone()))
        .unwrap();
    let g = grid(4, 4, 5);
    let spec = PartSpec::new(ModelChoice::TextCond)
        .with_refs(vec![ContextKey::new(0, 0), ContextKey::new(0, 1)]);
    let mut codec = PartCodec::new(CodecConfig::default().with_text_cond(t.clone()));
    let part = codec.encode(&ctx, PartTokens::Grid(&g), &spec).unwrap();
    let all: Vec<u32> = long.iter().chain(&long).copied().collect();
    assert_eq!(part.chunks[0].payload, t.encode(&all, &g).unwrap());
}

#[test]
fn text_conditioned_refusals_are_typed() {
    let mut ctx = SessionContext::new(1 << 20);
    ctx.insert(ContextKey::new(0, 0), Sequence::grid(&grid(3, 3, 4)))
        .unwrap();
    let mut codec = PartCodec::new(CodecConfig::default().with_text_cond(text_cond(13)));
    let g = grid(4, 4, 5);
    let no_text = PartSpec::new(ModelChoice::TextCond).with_refs(vec![ContextKey::new(0, 0)]);
    assert_eq!(
        codec
            .encode(&ctx, PartTokens::Grid(&g), &no_text)
            .map(|p| p.tokens),
        Err(PartError::MissingReference {
            model: ModelChoice::TextCond,
            kind: SequenceKind::Text
        })
    );
    assert_eq!(
        codec
            .encode(
                &ctx,
                PartTokens::Text(&[1, 2]),
                &PartSpec::new(ModelChoice::TextCond)
            )
            .map(|p| p.tokens),
        Err(PartError::ModelUnavailable {
            model: ModelChoice::TextCond,
            kind: SequenceKind::Text
        })
    );
    // Larger than the model's position tables (tiny: 16).
    let big = grid(17, 2, 1);
    ctx.insert(ContextKey::new(0, 1), Sequence::text(vec![5]))
        .unwrap();
    let spec = PartSpec::new(ModelChoice::TextCond).with_refs(vec![ContextKey::new(0, 1)]);
    assert!(matches!(
        codec.encode(&ctx, PartTokens::Grid(&big), &spec),
        Err(PartError::Transformer(_))
    ));
    assert!(ModelChoice::TextCond.is_transformer() && !ModelChoice::Adaptive.is_transformer());
}
