//! Golden coded bytes of the adaptive models (docs/CODING.md): their algorithms are normative, so
//! an independent implementation must produce these very bytes, and any change to a formula (or
//! to how the implementation computes it) fails here.

use sha2::{Digest, Sha256};
use unimic_codec::coder::Encoder;
use unimic_codec::entropy::{AdaptiveGrid, AdaptiveText, TextPrior};

/// A deterministic pseudo-random sequence (64-bit LCG, high bits).
fn lcg(seed: u64, n: usize, below: u32) -> Vec<u32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((x >> 33) % u64::from(below)) as u32
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Three turns of text through one model (learning across turns): the first all new ids
/// (escapes, ids above 2^16 included), the second repeating most of the first, the third
/// a mix; then a frozen model over a prior.
fn text_streams() -> Vec<Vec<u8>> {
    let first: Vec<u32> = vec![
        7_456, 382, 6_153, 591, 290, 25_214, 402, 922, 200_018, 13, 65_536, 0,
    ];
    let mut second = first.clone();
    second.reverse();
    second.extend([382, 6_153, 591, 382, 6_153, 591]);
    let mut third = lcg(7, 40, 300);
    third.extend(&first[..6]);
    let mut model = AdaptiveText::new(200_019);
    let mut out = Vec::new();
    for turn in [&first, &second, &third] {
        let mut enc = Encoder::new();
        model.encode(&mut enc, turn).unwrap();
        out.push(enc.finish());
    }
    let prior = TextPrior::train(200_019, [first.as_slice(), third.as_slice()]);
    let mut frozen = AdaptiveText::frozen(&prior);
    let mut enc = Encoder::new();
    frozen.encode(&mut enc, &second).unwrap();
    out.push(enc.finish());
    out
}

#[test]
fn adaptive_text_golden_bytes() {
    let streams = text_streams();
    let got: Vec<(usize, String)> = streams.iter().map(|b| (b.len(), sha(b))).collect();
    let want: Vec<(usize, String)> = TEXT_GOLDEN
        .iter()
        .map(|(n, h)| (*n, (*h).to_owned()))
        .collect();
    assert_eq!(got, want, "first three bytes: {}", hex(&streams[0][..3]));
}

#[test]
fn adaptive_grid_golden_bytes() {
    // A 24x20 grid over K = 1024 with runs and repeats, coded whole and in two chunks.
    let mut ids = lcg(11, 480, 1024);
    for (i, id) in ids.iter_mut().enumerate() {
        if i % 5 != 0 {
            *id %= 16;
        }
    }
    let mut whole = Encoder::new();
    AdaptiveGrid::new(1024)
        .encode(&mut whole, &ids, 20, 0..480)
        .unwrap();
    let mut learned = AdaptiveGrid::new(1024);
    learned.learn(&ids[..200], 20);
    let mut tail = Encoder::new();
    learned.encode(&mut tail, &ids, 20, 200..480).unwrap();
    let got: Vec<(usize, String)> = [whole.finish(), tail.finish()]
        .iter()
        .map(|b| (b.len(), sha(b)))
        .collect();
    let want: Vec<(usize, String)> = GRID_GOLDEN
        .iter()
        .map(|(n, h)| (*n, (*h).to_owned()))
        .collect();
    assert_eq!(got, want);
}

/// `(bytes, SHA-256)` of each text stream.
const TEXT_GOLDEN: [(usize, &str); 4] = [
    (
        24,
        "c40e880a889e2420c95d761c775945859696ca400deb4ed55d4f7185622a6184",
    ),
    (
        10,
        "c0b572ea1351ed9cb8b0cda3f66f79b254fdca9c021b70d723de6ead4d91d6ce",
    ),
    (
        56,
        "89dcc6f183afb945dc18ed9e76c11d852aba20098dbd76f2c1f185dec5939c77",
    ),
    (
        14,
        "322991b57eeb8a3b7d1d7161818d6ba6e1189644d2987d31f000b7136c9f4e7d",
    ),
];

/// `(bytes, SHA-256)` of the whole grid and of its tail after learning the head.
const GRID_GOLDEN: [(usize, &str); 2] = [
    (
        421,
        "9655df67eee8a07207574f69128b0383ce846748caa9adcdd635ed3ff1732067",
    ),
    (
        233,
        "aa4dbbd92e98919c95b6add3cb86d6e38e9189f01963967f4de1c6d24e351035",
    ),
];
