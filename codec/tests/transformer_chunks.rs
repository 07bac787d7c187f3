//! A transformer part in chunks (docs/CODING.md §7.9): the weights a cursor gives chunk by chunk,
//! batched (the encoder's path) or one position at a time (the decoder's), are the whole grid's
//! bit for bit, whatever the chunk size; chunk payloads decode on one cursor back to the grid;
//! and one chunk is exactly the model's one-shot payload.

use proptest::prelude::*;
use unimic_codec::coder::Decoder;
use unimic_codec::entropy::cursor::{code_chunk, Cursor};
use unimic_codec::entropy::generic::{Generic, GenericConfig};
use unimic_codec::entropy::masked::{Masked, MaskedConfig};
use unimic_codec::entropy::text_cond::{TextCond, TextCondConfig};
use unimic_codec::entropy::Dense;
use unimic_codec::grid::TokenGrid;
use unimic_codec::nn::model::ModelError;
use unimic_codec::nn::weights::splitmix64;

const K: u32 = 32;
const PROMPT: [u32; 4] = [3_923, 41, 200_000, 7];

fn grid(h: u32, w: u32, seed: u64) -> TokenGrid {
    let mut z = seed;
    let ids = (0..h * w)
        .map(|i| {
            z = splitmix64(z);
            if z % 4 == 0 {
                (z >> 8) as u32 % K
            } else {
                (i / w + i % w) % K
            }
        })
        .collect();
    TokenGrid::new(h, w, K, ids).unwrap()
}

/// The three models behind one interface, for the checks below.
enum Model {
    Generic(Generic),
    Masked(Masked, Vec<u32>, Vec<bool>),
    Text(TextCond),
}

impl Model {
    fn cursor(&self, g: &TokenGrid) -> Cursor {
        match self {
            Model::Generic(m) => m.cursor(g.height(), g.width()),
            Model::Masked(m, known, unknown) => m.cursor(g.height(), g.width(), known, unknown),
            Model::Text(m) => m.cursor(&PROMPT, g.height(), g.width()),
        }
        .unwrap()
    }

    fn advance_known(&self, c: &mut Cursor, tokens: &[u32]) -> Vec<Vec<u64>> {
        match self {
            Model::Generic(m) => m.advance_known(c, tokens),
            Model::Masked(m, ..) => m.advance_known(c, tokens),
            Model::Text(m) => m.advance_known(c, tokens),
        }
        .unwrap()
    }

    fn advance(
        &self,
        c: &mut Cursor,
        n: usize,
        pick: impl FnMut(usize, &[u64]) -> Result<u32, ModelError>,
    ) -> Result<(), ModelError> {
        match self {
            Model::Generic(m) => m.advance(c, n, pick),
            Model::Masked(m, ..) => m.advance(c, n, pick),
            Model::Text(m) => m.advance(c, n, pick),
        }
    }

    /// The weights of every coded token from the model's whole-grid pass.
    fn whole(&self, g: &TokenGrid) -> Vec<Vec<u64>> {
        match self {
            Model::Generic(m) => m.weights_full(g).unwrap(),
            Model::Masked(m, _, unknown) => m.weights_unknown(g.width() as usize, g.ids(), unknown),
            Model::Text(m) => m.weights_full(&PROMPT, g).unwrap(),
        }
    }

    /// The one-shot payload.
    fn encode(&self, g: &TokenGrid) -> Vec<u8> {
        match self {
            Model::Generic(m) => m.encode(g),
            Model::Masked(m, _, unknown) => m.encode(g, unknown),
            Model::Text(m) => m.encode(&PROMPT, g),
        }
        .unwrap()
    }

    /// The tokens the model codes, in its order.
    fn coded(&self, g: &TokenGrid) -> Vec<u32> {
        match self {
            Model::Masked(_, _, unknown) => g
                .ids()
                .iter()
                .zip(unknown)
                .filter(|(_, &u)| u)
                .map(|(&id, _)| id)
                .collect(),
            _ => g.ids().to_vec(),
        }
    }
}

fn models(g: &TokenGrid, mask_seed: u64) -> Vec<Model> {
    let mut z = mask_seed;
    let unknown: Vec<bool> = (0..g.len())
        .map(|_| {
            z = splitmix64(z);
            z % 3 != 0
        })
        .collect();
    // The receiver's known cells: the grid outside the region, anything inside.
    let known: Vec<u32> = g
        .ids()
        .iter()
        .zip(&unknown)
        .map(|(&id, &u)| if u { (id + 7) % K } else { id })
        .collect();
    vec![
        Model::Generic(Generic::synthetic(&GenericConfig::tiny(K as usize), 11).unwrap()),
        Model::Masked(
            Masked::synthetic(&MaskedConfig::tiny(K as usize), 12).unwrap(),
            known,
            unknown,
        ),
        Model::Text(TextCond::synthetic(&TextCondConfig::tiny(K as usize), 13).unwrap()),
    ]
}

fn check(h: u32, w: u32, seed: u64, chunk: usize) {
    let g = grid(h, w, seed);
    for model in models(&g, seed ^ 0x5eed) {
        let coded = model.coded(&g);
        let whole = model.whole(&g);
        // The encoder's path: batched chunk by chunk.
        let mut tx = model.cursor(&g);
        let mut weights = Vec::new();
        let mut payloads = Vec::new();
        for part in coded.chunks(chunk.max(1)) {
            let w = model.advance_known(&mut tx, part);
            payloads.push(code_chunk(w.clone(), part).unwrap().0);
            weights.extend(w);
        }
        assert!(tx.is_done());
        assert_eq!(weights, whole, "batched chunks of {chunk}");
        if coded.len() <= chunk {
            assert_eq!(payloads.len().max(1), 1);
            if let Some(p) = payloads.first() {
                assert_eq!(p, &model.encode(&g), "one chunk is the one-shot payload");
            }
        }
        // The decoder's path: one position at a time, chunk after chunk on one cursor.
        let mut rx = model.cursor(&g);
        let mut stepped = Vec::new();
        for (payload, part) in payloads.iter().zip(coded.chunks(chunk.max(1))) {
            let mut dec = Decoder::new(payload);
            model
                .advance(&mut rx, part.len(), |_, w| {
                    stepped.push(w.to_vec());
                    Ok(dec.decode(&Dense::from_weights(w.iter().copied()))?)
                })
                .unwrap();
        }
        assert_eq!(stepped, whole, "stepped chunks of {chunk}");
        assert_eq!(rx.into_grid().unwrap(), g);
    }
}

#[test]
fn chunks_of_every_size_on_a_small_grid() {
    for chunk in 1..=13 {
        check(3, 4, 7, chunk);
    }
}

#[test]
fn a_cursor_refuses_tokens_past_the_grid_and_outside_the_codebook() {
    let g = grid(2, 3, 1);
    for model in models(&g, 2) {
        let mut c = model.cursor(&g);
        let n = c.total();
        let mut over = vec![0u32; n + 1];
        let err = match &model {
            Model::Generic(m) => m.advance_known(&mut c, &over),
            Model::Masked(m, ..) => m.advance_known(&mut c, &over),
            Model::Text(m) => m.advance_known(&mut c, &over),
        };
        assert!(matches!(err, Err(ModelError::Grid(_))), "{err:?}");
        over.truncate(1);
        over[0] = K;
        let err = match &model {
            Model::Generic(m) => m.advance_known(&mut c, &over),
            Model::Masked(m, ..) => m.advance_known(&mut c, &over),
            Model::Text(m) => m.advance_known(&mut c, &over),
        };
        assert!(matches!(err, Err(ModelError::Grid(_))), "{err:?}");
        assert_eq!(c.coded(), 0, "a refused call moves nothing");
        assert!(model.advance(&mut c, n + 1, |_, _| Ok(0)).is_err());
        assert!(
            c.clone().into_grid().is_err(),
            "an unfinished grid is not a grid"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn chunked_weights_are_the_whole_grids(
        h in 1u32..=8,
        w in 1u32..=8,
        seed in any::<u64>(),
        chunk in 1usize..=70,
    ) {
        check(h, w, seed, chunk);
    }
}

/// The default sizes take the fast kernels' other paths (several heads per tile, long rows).
#[test]
fn chunks_with_the_default_sizes() {
    let g = grid(6, 7, 3);
    let generic = Generic::synthetic(&GenericConfig::small(K as usize), 21).unwrap();
    let whole = generic.weights_full(&g).unwrap();
    for chunk in [1, 7, 19] {
        let mut c = generic.cursor(6, 7).unwrap();
        let mut weights = Vec::new();
        for part in g.ids().chunks(chunk) {
            weights.extend(generic.advance_known(&mut c, part).unwrap());
        }
        assert_eq!(weights, whole, "chunks of {chunk}");
    }
    let mut c = generic.cursor(6, 7).unwrap();
    let mut stepped = Vec::new();
    let mut ids = g.ids().iter();
    generic
        .advance(&mut c, 20, |_, w| {
            stepped.push(w.to_vec());
            Ok(*ids.next().unwrap())
        })
        .unwrap();
    let rest: Vec<u32> = ids.copied().collect();
    stepped.extend(generic.advance_known(&mut c, &rest).unwrap());
    assert_eq!(stepped, whole, "stepped, then batched on the same cursor");
}
