//! Property-tested round trips of every built-in model, and the adversarial sequences.

use proptest::prelude::*;
use unimic_codec::coder::{Decoder, Encoder};
use unimic_codec::entropy::{AdaptiveGrid, AdaptiveText, Dense, Distribution, Static, Uniform};

fn roundtrip_grid(ids: &[u32], width: u32, k: u32) -> (usize, f64) {
    let n = ids.len();
    let stat = Static::train(k, [ids]).unwrap();
    let mut enc = Encoder::new();
    for &s in ids {
        enc.encode(s, &Uniform::new(k)).unwrap();
    }
    for &s in ids {
        enc.encode(s, stat.distribution()).unwrap();
    }
    AdaptiveGrid::new(k)
        .encode(&mut enc, ids, width, 0..n)
        .unwrap();
    let ce = enc.cross_entropy_bits();
    let bytes = enc.finish();
    let mut dec = Decoder::new(&bytes);
    for &s in ids {
        assert_eq!(dec.decode(&Uniform::new(k)).unwrap(), s);
    }
    for &s in ids {
        assert_eq!(dec.decode(stat.distribution()).unwrap(), s);
    }
    let mut back = Vec::new();
    AdaptiveGrid::new(k)
        .decode(&mut dec, &mut back, width, 0..n)
        .unwrap();
    assert_eq!(back, ids);
    (bytes.len(), ce)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_grids_round_trip(
        k in prop_oneof![Just(2u32), Just(17), Just(1024), Just(16_384), Just(65_536)],
        width in 1u32..20,
        rows in 1u32..12,
        seed in any::<u64>(),
    ) {
        let mut x = seed | 1;
        let ids: Vec<u32> = (0..width * rows)
            .map(|_| {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                // Mix small repeated values with arbitrary ones.
                if x % 3 == 0 { (x >> 20) as u32 % 4 } else { (x >> 11) as u32 % k }
            })
            .map(|s| s % k)
            .collect();
        let (bytes, ce) = roundtrip_grid(&ids, width, k);
        prop_assert!((bytes as f64) * 8.0 <= ce + 16.0);
    }

    #[test]
    fn random_text_round_trips(seqs in prop::collection::vec(prop::collection::vec(0u32..200_019, 0..40), 1..5)) {
        let mut enc_model = AdaptiveText::new(200_019);
        let mut payloads = Vec::new();
        for s in &seqs {
            let mut enc = Encoder::new();
            enc_model.encode(&mut enc, s).unwrap();
            payloads.push(enc.finish());
        }
        let mut dec_model = AdaptiveText::new(200_019);
        for (s, p) in seqs.iter().zip(&payloads) {
            prop_assert_eq!(&dec_model.decode(&mut Decoder::new(p), s.len()).unwrap(), s);
        }
    }

    #[test]
    fn dense_weights_round_trip(weights in prop::collection::vec(0u64..1 << 40, 2..300), picks in prop::collection::vec(any::<prop::sample::Index>(), 1..200)) {
        let d = Dense::from_weights(weights.iter().copied());
        let syms: Vec<u32> = picks.iter().map(|i| i.index(weights.len()) as u32).collect();
        let mut enc = Encoder::new();
        for &s in &syms { enc.encode(s, &d).unwrap(); }
        let bytes = enc.finish();
        let mut dec = Decoder::new(&bytes);
        for &s in &syms { prop_assert_eq!(dec.decode(&d).unwrap(), s); }
    }
}

#[test]
fn adversarial_sequences_round_trip() {
    for k in [2u32, 1024, 16_384, 65_536] {
        let skew: Vec<u32> = (0..4096u32).map(|i| (i * i) % (k - 1).max(1)).collect();
        let stat = Static::train(k, [&skew[..]]).unwrap();
        let d = stat.distribution();
        let least = (0..k)
            .min_by_key(|&s| d.cumulative(s + 1) - d.cumulative(s))
            .unwrap();
        let sets: Vec<Vec<u32>> = vec![
            vec![5 % k; 256],
            (0..256)
                .map(|i| if i % 2 == 0 { 0 } else { k - 1 })
                .collect(),
            vec![k - 1; 256],
            vec![least; 256],
        ];
        for ids in sets {
            let mut enc = Encoder::new();
            for &s in &ids {
                enc.encode(s, d).unwrap();
            }
            AdaptiveGrid::new(k)
                .encode(&mut enc, &ids, 16, 0..256)
                .unwrap();
            let bytes = enc.finish();
            let mut dec = Decoder::new(&bytes);
            for &s in &ids {
                assert_eq!(dec.decode(d).unwrap(), s, "k={k}");
            }
            let mut back = Vec::new();
            AdaptiveGrid::new(k)
                .decode(&mut dec, &mut back, 16, 0..256)
                .unwrap();
            assert_eq!(back, ids, "k={k}");
            roundtrip_grid(&ids, 16, k);
        }
    }
}

#[test]
fn adaptive_grid_learns_repetition() {
    let k = 16_384;
    let ids: Vec<u32> = (0..256).map(|i| [3, 9000, 77][i % 3]).collect();
    let mut enc = Encoder::new();
    AdaptiveGrid::new(k)
        .encode(&mut enc, &ids, 16, 0..256)
        .unwrap();
    let bits = enc.finish().len() * 8;
    assert!(bits < 256 * 2, "{bits} bits for a 3-symbol pattern");
}

#[test]
fn least_likely_symbol_everywhere_costs_at_most_24_bits_each() {
    let stat = Static::train(1024, [&[0u32; 5000][..]]).unwrap();
    let mut enc = Encoder::new();
    for _ in 0..256 {
        enc.encode(1023, stat.distribution()).unwrap();
    }
    let ce = enc.cross_entropy_bits();
    assert!(ce <= 256.0 * 24.0);
    let bytes = enc.finish();
    assert!((bytes.len() * 8) as f64 <= ce + 16.0);
}
