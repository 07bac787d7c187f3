//! A grid part coded as its tokens arrive (`PartCodec::grid_stream`): for every model, the
//! chunks equal those of the whole grid coded at once, whatever the pushes' sizes; they decode
//! back through the part decoder; and bad pushes are refused without losing what was pushed.

use std::sync::Arc;

use proptest::prelude::*;
use unimic_codec::context::{ContextKey, Sequence, SessionContext};
use unimic_codec::entropy::generic::{Generic, GenericConfig};
use unimic_codec::entropy::masked::{Masked, MaskedConfig};
use unimic_codec::entropy::text_cond::{TextCond, TextCondConfig};
use unimic_codec::grid::{GridError, TokenGrid};
use unimic_codec::nn::weights::splitmix64;
use unimic_codec::part::{
    CodecConfig, DecodedPart, ModelChoice, PartCodec, PartError, PartShape, PartSpec, PartTokens,
};

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

fn codec() -> PartCodec {
    PartCodec::new(
        CodecConfig::default()
            .with_generic(Arc::new(
                Generic::synthetic(&GenericConfig::tiny(K as usize), 1).unwrap(),
            ))
            .with_masked(Arc::new(
                Masked::synthetic(&MaskedConfig::tiny(K as usize), 2).unwrap(),
            ))
            .with_text_cond(Arc::new(
                TextCond::synthetic(&TextCondConfig::tiny(K as usize), 3).unwrap(),
            )),
    )
}

/// The context (a text part and a reference image), the grid to send, and the spec per model.
fn setup(h: u32, w: u32, seed: u64, model: ModelChoice) -> (SessionContext, TokenGrid, PartSpec) {
    let mut ctx = SessionContext::new(1 << 20);
    let text = ContextKey::new(0, 0);
    let image = ContextKey::new(0, 1);
    ctx.insert(text, Sequence::text(vec![5, 17, 200_000]))
        .unwrap();
    let reference = grid(h, w, seed ^ 1);
    ctx.insert(image, Sequence::grid(&reference)).unwrap();
    let g = grid(h, w, seed);
    let spec = PartSpec::new(model).with_refs(vec![text, image]);
    if model != ModelChoice::Masked {
        return (ctx, g, spec);
    }
    // An edit: the reference outside a region, the new grid inside.
    let mut z = seed;
    let region: Vec<bool> = (0..h * w)
        .map(|_| {
            z = splitmix64(z);
            z % 2 == 0
        })
        .collect();
    let ids = reference
        .ids()
        .iter()
        .zip(g.ids())
        .zip(&region)
        .map(|((&r, &n), &inside)| if inside { n } else { r })
        .collect();
    let edited = TokenGrid::new(h, w, K, ids).unwrap();
    (ctx, edited, spec.with_region(region))
}

const MODELS: [ModelChoice; 6] = [
    ModelChoice::Generic,
    ModelChoice::Masked,
    ModelChoice::TextCond,
    ModelChoice::Adaptive,
    ModelChoice::Uniform,
    ModelChoice::Static,
];

fn check(h: u32, w: u32, seed: u64, chunk: u32, push: usize) {
    for model in MODELS {
        let (ctx, g, spec) = setup(h, w, seed, model);
        let spec = spec.with_chunk_tokens(chunk);
        let mut codec = codec();
        let whole = match codec.encode(&ctx, PartTokens::Grid(&g), &spec) {
            Ok(p) => p,
            // The default codec has no static grid model.
            Err(PartError::ModelUnavailable { .. }) if model == ModelChoice::Static => continue,
            Err(e) => panic!("{model:?}: {e}"),
        };
        let coded: Vec<u32> = match &spec.region {
            Some(r) => g
                .ids()
                .iter()
                .zip(r)
                .filter(|(_, &i)| i)
                .map(|(&id, _)| id)
                .collect(),
            None => g.ids().to_vec(),
        };
        let mut stream = codec
            .grid_stream(&ctx, h, w, K, &spec)
            .unwrap_or_else(|e| panic!("{model:?}: {e}"));
        assert_eq!(stream.digest(), whole.digest);
        assert_eq!(stream.model(), whole.model);
        assert_eq!(stream.total(), whole.tokens);
        let mut chunks = Vec::new();
        for piece in coded.chunks(push.max(1)) {
            chunks.extend(stream.push(piece).unwrap());
        }
        if coded.is_empty() {
            chunks.extend(stream.push(&[]).unwrap());
        }
        assert!(stream.is_done(), "{model:?}");
        assert_eq!(
            chunks, whole.chunks,
            "{model:?}, chunks of {chunk}, pushes of {push}"
        );
        assert_eq!(stream.into_grid().unwrap(), g, "{model:?}");

        let shape = PartShape::Grid {
            height: h,
            width: w,
            codebook_size: K,
        };
        let dec = codec
            .decoder(&ctx, shape, &spec, &whole.digest, &whole.model)
            .unwrap();
        let back = dec
            .decode_all(chunks.iter().map(|c| c.payload.as_slice()))
            .unwrap();
        assert_eq!(back, DecodedPart::Grid(g), "{model:?}");
    }
}

#[test]
fn rows_as_they_come() {
    check(5, 6, 3, 12, 6);
    check(5, 6, 4, 7, 1);
    check(5, 6, 5, 0, 6);
    check(1, 1, 6, 1, 1);
}

#[test]
fn bad_pushes_are_refused_and_lose_nothing() {
    let (ctx, g, spec) = setup(3, 4, 9, ModelChoice::Generic);
    let spec = spec.with_chunk_tokens(4);
    let mut codec = codec();
    let mut stream = codec.grid_stream(&ctx, 3, 4, K, &spec).unwrap();
    assert_eq!(stream.push(&g.ids()[..3]).unwrap(), []);
    assert!(matches!(
        stream.push(&[1, K]),
        Err(PartError::Grid(GridError::IdOutOfRange { index: 4, id, .. })) if id == K
    ));
    assert!(matches!(
        stream.push(&[0; 10]),
        Err(PartError::TokenCount {
            got: 13,
            expected: 12
        })
    ));
    assert_eq!(stream.pushed(), 3);
    let mut chunks = stream.push(&g.ids()[3..]).unwrap();
    assert_eq!(chunks.len(), 3);
    assert!(
        stream.push(&[]).unwrap().is_empty(),
        "nothing after the end"
    );
    let whole = codec.encode(&ctx, PartTokens::Grid(&g), &spec).unwrap();
    assert_eq!(chunks, whole.chunks);
    assert_eq!(stream.into_grid().unwrap(), g);

    // An unfinished stream is no grid; an empty shape and a missing reference are refused.
    let mut stream = codec.grid_stream(&ctx, 3, 4, K, &spec).unwrap();
    chunks = stream.push(&g.ids()[..5]).unwrap();
    assert_eq!(chunks.len(), 1);
    assert!(matches!(
        stream.into_grid(),
        Err(PartError::TokenCount {
            got: 5,
            expected: 12
        })
    ));
    assert!(matches!(
        codec.grid_stream(&ctx, 0, 4, K, &spec),
        Err(PartError::Grid(GridError::Empty { .. }))
    ));
    let missing = PartSpec::new(ModelChoice::Generic).with_refs(vec![ContextKey::new(7, 0)]);
    assert!(matches!(
        codec.grid_stream(&ctx, 3, 4, K, &missing),
        Err(PartError::Context(_))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn any_chunking_and_pushes(
        h in 1u32..=6,
        w in 1u32..=6,
        seed in any::<u64>(),
        chunk in 0u32..=40,
        push in 1usize..=40,
    ) {
        check(h, w, seed, chunk, push);
    }
}
