//! An independent implementation of docs/CODING.md §1–§2, written from the text alone: the
//! quantization rule, the range encoder (with its carry handling and unimic's termination) and
//! the range decoder. It shares no code with `unimic_codec::coder` (which runs the `constriction`
//! crate), and must agree with it byte for byte and symbol for symbol:
//!
//! * the spec encoder writes the same payload as `coder::Encoder`;
//! * the spec decoder decodes the library's payloads to the symbols encoded;
//! * on arbitrary (corrupt) payloads both decoders return the same symbols and fail at the same
//!   symbol with the same outcome;
//!
//! for random distributions and symbol sequences (proptest), and for a seeded sweep that is
//! checked to reach every branch of the carry handling.

use proptest::prelude::*;
use unimic_codec::coder::{CodeError, Decoder, Encoder};
use unimic_codec::entropy::{Dense, Distribution};

// ------------------------------------------------------------------------------------------
// §1: integer weights to cumulative frequencies.

const PRECISION: u32 = 24;
const TOTAL: u32 = 1 << PRECISION;

/// `C(0) ..= C(K)` of §1 for the weights `w` (`1 <= K <= 65536`, `Σw < 2^64`).
fn spec_cumulative(w: &[u64]) -> Vec<u32> {
    let k = w.len() as u128;
    let ones;
    let w = if w.iter().all(|&x| x == 0) {
        ones = vec![1u64; w.len()];
        &ones[..]
    } else {
        w
    };
    let total: u128 = w.iter().map(|&x| u128::from(x)).sum();
    let m = u128::from(TOTAL) - k;
    let mut c = Vec::with_capacity(w.len() + 1);
    let mut p: u128 = 0;
    for (i, &x) in w.iter().enumerate() {
        c.push((i as u128 + p * m / total) as u32);
        p += u128::from(x);
    }
    c.push(TOTAL);
    c
}

// ------------------------------------------------------------------------------------------
// §2: the range encoder.

/// Which branches of the carry handling a run went through.
#[derive(Debug, Default, Clone, Copy)]
struct Branches {
    /// Entered the inverted (straddling) situation.
    inverted: u64,
    /// Left it with a carry (`first + 1`, then zero words).
    resolved_carry: u64,
    /// Left it without a carry (`first`, then `0xFFFFFFFF` words).
    resolved_plain: u64,
    /// Held back more than one word at once.
    held_several: u64,
    /// Finished while inverted, without and with the final carry.
    finished_inverted: u64,
    finished_inverted_carry: u64,
}

struct SpecEncoder {
    lower: u64,
    range: u64,
    /// Emitted 32-bit words.
    words: Vec<u32>,
    /// Inverted situation: the held-back word `first` and how many words are held (`n >= 1`).
    held: Option<(u32, u32)>,
    seen: Branches,
}

impl SpecEncoder {
    fn new() -> Self {
        Self {
            lower: 0,
            range: u64::MAX,
            words: Vec::new(),
            held: None,
            seen: Branches::default(),
        }
    }

    /// Encodes the symbol whose interval is `[c, c + f)` of `[0, 2^24)`.
    fn encode(&mut self, c: u32, f: u32) {
        let scale = self.range >> PRECISION;
        let new_lower = self.lower.wrapping_add(scale * u64::from(c));
        let carry = new_lower < self.lower;
        self.range = scale * u64::from(f);
        if let Some((first, n)) = self.held {
            if u128::from(new_lower) + u128::from(self.range) < 1 << 64 {
                // The interval no longer straddles 2^64: the held words are known.
                let (head, tail) = if carry {
                    self.seen.resolved_carry += 1;
                    (first.wrapping_add(1), 0)
                } else {
                    self.seen.resolved_plain += 1;
                    (first, u32::MAX)
                };
                self.words.push(head);
                self.words.extend(std::iter::repeat_n(tail, n as usize - 1));
                self.held = None;
            }
        }
        self.lower = new_lower;
        if self.range < 1 << 32 {
            let word = (self.lower >> 32) as u32;
            self.lower <<= 32;
            self.range <<= 32;
            match &mut self.held {
                Some((_, n)) => {
                    *n += 1;
                    self.seen.held_several += 1;
                }
                None if u128::from(self.lower) + u128::from(self.range) < 1 << 64 => {
                    self.words.push(word)
                }
                None => {
                    self.seen.inverted += 1;
                    self.held = Some((word, 1));
                }
            }
        }
    }

    /// The termination of §2 and the big-endian serialization.
    fn finish(mut self) -> (Vec<u8>, Branches) {
        let (l, r) = (u128::from(self.lower), u128::from(self.range));
        let (m, v) = (0..=8u32)
            .map(|m| {
                let g = 1u128 << (64 - 8 * m);
                (m, l.div_ceil(g) * g)
            })
            .find(|&(_, v)| v < l + r)
            .expect("m = 8 always works");
        let mut out: Vec<u8> = self.words.iter().flat_map(|w| w.to_be_bytes()).collect();
        if let Some((first, n)) = self.held {
            self.seen.finished_inverted += 1;
            out.extend(first.to_be_bytes());
            for _ in 1..n {
                out.extend(u32::MAX.to_be_bytes());
            }
        }
        if v >> 64 != 0 {
            if self.held.is_some() {
                self.seen.finished_inverted_carry += 1;
            }
            for b in out.iter_mut().rev() {
                let (sum, overflow) = b.overflowing_add(1);
                *b = sum;
                if !overflow {
                    break;
                }
            }
        }
        out.extend_from_slice(&(v as u64).to_be_bytes()[..m as usize]);
        while out.last() == Some(&0) {
            out.pop();
        }
        (out, self.seen)
    }
}

// ------------------------------------------------------------------------------------------
// §2: the range decoder.

struct SpecDecoder<'a> {
    payload: &'a [u8],
    /// Next byte of the payload to read.
    pos: usize,
    lower: u64,
    range: u64,
    point: u64,
}

#[derive(Debug, PartialEq, Eq)]
struct InvalidData;

impl<'a> SpecDecoder<'a> {
    fn new(payload: &'a [u8]) -> Self {
        let mut d = Self {
            payload,
            pos: 0,
            lower: 0,
            range: u64::MAX,
            point: 0,
        };
        d.point = (u64::from(d.word()) << 32) | u64::from(d.word());
        d
    }

    /// The next big-endian 32-bit word; bytes past the end of the payload read as zero.
    fn word(&mut self) -> u32 {
        let mut w = [0u8; 4];
        for b in &mut w {
            *b = self.payload.get(self.pos).copied().unwrap_or(0);
            self.pos += 1;
        }
        u32::from_be_bytes(w)
    }

    /// Decodes one symbol of the distribution with cumulative frequencies `c` (`C(0..=K)`).
    fn decode(&mut self, c: &[u32]) -> Result<u32, InvalidData> {
        let scale = self.range >> PRECISION;
        let q = self.point.wrapping_sub(self.lower) / scale;
        if q >= u64::from(TOTAL) {
            return Err(InvalidData);
        }
        let q = q as u32;
        // The unique s with C(s) <= q < C(s+1).
        let s = c.partition_point(|&x| x <= q) - 1;
        self.lower = self.lower.wrapping_add(scale * u64::from(c[s]));
        self.range = scale * u64::from(c[s + 1] - c[s]);
        if self.range < 1 << 32 {
            self.lower <<= 32;
            self.range <<= 32;
            self.point = (self.point << 32) | u64::from(self.word());
        }
        Ok(s as u32)
    }
}

// ------------------------------------------------------------------------------------------
// Running both.

/// One coded message: for each symbol, the index of its distribution and the symbol.
type Message = Vec<(usize, u32)>;

fn library_encode(dists: &[Dense], msg: &Message) -> Vec<u8> {
    let mut enc = Encoder::new();
    for &(d, s) in msg {
        enc.encode(s, &dists[d]).unwrap();
    }
    enc.finish()
}

fn spec_encode(cums: &[Vec<u32>], msg: &Message) -> (Vec<u8>, Branches) {
    let mut enc = SpecEncoder::new();
    for &(d, s) in msg {
        let c = &cums[d];
        if c.len() == 2 {
            // K = 1: not coded.
            continue;
        }
        enc.encode(c[s as usize], c[s as usize + 1] - c[s as usize]);
    }
    enc.finish()
}

/// What a decoder returned for each symbol, up to and including the first error.
type Decoded = Vec<Result<u32, ()>>;

/// Decodes with both decoders the symbols of `dists[i]` for each `i` of `order`; returns
/// the library's results and the spec decoder's (each up to and including the first error).
fn decode_both(
    dists: &[Dense],
    cums: &[Vec<u32>],
    order: &[usize],
    payload: &[u8],
) -> (Decoded, Decoded) {
    let mut lib = Decoder::new(payload);
    let mut spec = SpecDecoder::new(payload);
    let mut a = Vec::new();
    let mut b = Vec::new();
    for &d in order {
        let x = lib.decode(&dists[d]).map_err(|e| {
            assert_eq!(e, CodeError::InvalidData);
        });
        a.push(x);
        if x.is_err() {
            break;
        }
    }
    for &d in order {
        let c = &cums[d];
        let y = if c.len() == 2 {
            Ok(0)
        } else {
            spec.decode(c).map_err(|_| ())
        };
        b.push(y);
        if y.is_err() {
            break;
        }
    }
    (a, b)
}

fn check(weights: &[Vec<u64>], msg: &Message, garbage: &[u8]) -> Branches {
    let dists: Vec<Dense> = weights
        .iter()
        .map(|w| Dense::from_weights(w.iter().copied()))
        .collect();
    let cums: Vec<Vec<u32>> = weights.iter().map(|w| spec_cumulative(w)).collect();
    // §1: the spec's frequencies are the library's.
    for (d, c) in dists.iter().zip(&cums) {
        let k = c.len() - 1;
        let step = (k / 64).max(1);
        for i in (0..=k).step_by(step).chain([k]) {
            assert_eq!(d.cumulative(i as u32), c[i], "C({i}) of K = {k}");
        }
    }
    let payload = library_encode(&dists, msg);
    let (ours, seen) = spec_encode(&cums, msg);
    assert_eq!(
        ours, payload,
        "the spec encoder writes the library's payload"
    );
    let order: Vec<usize> = msg.iter().map(|&(d, _)| d).collect();
    let (lib, spec) = decode_both(&dists, &cums, &order, &payload);
    let want: Decoded = msg
        .iter()
        .map(|&(d, s)| Ok(if cums[d].len() == 2 { 0 } else { s }))
        .collect();
    assert_eq!(lib, want, "the library decodes its payload");
    assert_eq!(spec, want, "the spec decoder decodes the library's payload");
    // Corrupt payloads: the same symbols, and the same failure at the same place.
    for bad in [garbage, &payload[..payload.len() / 2]] {
        let (lib, spec) = decode_both(&dists, &cums, &order, bad);
        assert_eq!(lib, spec, "decoders differ on payload {bad:02x?}");
    }
    seen
}

/// Weight vectors of every kind: tiny and large alphabets, zeros, huge weights, all-zero.
fn weights_strategy() -> impl Strategy<Value = Vec<u64>> {
    let weight = prop_oneof![
        4 => 0u64..4,
        4 => 0u64..1_000,
        2 => 0u64..(1 << 40),
        1 => Just(1u64 << 47),
    ];
    prop_oneof![
        8 => prop::collection::vec(weight.clone(), 1..40),
        2 => prop::collection::vec(weight, 1000..3000),
        1 => (60_000usize..=65_536).prop_map(|k| (0..k as u64).map(|i| (i * 7919) % 13).collect()),
        1 => (1usize..20).prop_map(|k| vec![0; k]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn spec_coder_matches_the_library(
        weights in prop::collection::vec(weights_strategy(), 1..5),
        picks in prop::collection::vec((any::<prop::sample::Index>(), any::<u32>()), 0..600),
        garbage in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let msg: Message = picks
            .iter()
            .map(|(i, r)| {
                let d = i.index(weights.len());
                (d, r % weights[d].len() as u32)
            })
            .collect();
        check(&weights, &msg, &garbage);
    }
}

/// A seeded sweep that must pass through every branch of the carry handling: skewed and
/// near-uniform distributions, symbols drawn towards both ends of the alphabet.
#[test]
fn spec_coder_covers_every_carry_branch() {
    let mut x: u64 = 0x243F_6A88_85A3_08D3;
    let mut next = move || {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        x >> 11
    };
    let weights = vec![
        vec![1u64, 1],
        vec![1u64; 1000],
        vec![1_000_000u64, 1, 1, 1_000_000],
        vec![1u64, 0, 0, 0, 0, 0, 1 << 40, 3],
        vec![5u64, 1 << 30, 7, 1 << 33, 2, 9, 11],
    ];
    let mut total = Branches::default();
    for _ in 0..400 {
        let n = (next() % 300) as usize;
        let msg: Message = (0..n)
            .map(|_| {
                let d = (next() % weights.len() as u64) as usize;
                let k = weights[d].len() as u64;
                let s = match next() % 4 {
                    0 => 0,
                    1 => k - 1,
                    _ => next() % k,
                };
                (d, s as u32)
            })
            .collect();
        let garbage: Vec<u8> = (0..(next() % 40)).map(|_| next() as u8).collect();
        let seen = check(&weights, &msg, &garbage);
        total.inverted += seen.inverted;
        total.resolved_carry += seen.resolved_carry;
        total.resolved_plain += seen.resolved_plain;
        total.held_several += seen.held_several;
        total.finished_inverted += seen.finished_inverted;
        total.finished_inverted_carry += seen.finished_inverted_carry;
    }
    assert!(
        total.inverted > 0
            && total.resolved_carry > 0
            && total.resolved_plain > 0
            && total.held_several > 0
            && total.finished_inverted > 0
            && total.finished_inverted_carry > 0,
        "branches not reached: {total:?}"
    );
}

#[test]
fn spec_decoder_reads_an_empty_payload_as_zeros() {
    // An empty payload is the number 0: the first symbol of every distribution.
    let c = spec_cumulative(&[3, 1, 4]);
    let mut d = SpecDecoder::new(&[]);
    assert_eq!(d.decode(&c), Ok(0));
    assert_eq!(d.decode(&c), Ok(0));
    // One symbol of probability 1/2: one byte at most (CODING.md §2, termination).
    let half = spec_cumulative(&[1, 1]);
    let mut e = SpecEncoder::new();
    e.encode(half[1], half[2] - half[1]);
    let (bytes, _) = e.finish();
    assert_eq!(bytes, [0x80]);
    assert_eq!(SpecDecoder::new(&bytes).decode(&half), Ok(1));
}

// ------------------------------------------------------------------------------------------
// The worked example of CODING.md §2.4.

const SPEC: &str = include_str!("../../docs/CODING.md");

/// The bytes of the golden block `name` of CODING.md (hex; text after `#` is a comment).
fn golden(name: &str) -> Vec<u8> {
    let marker = format!("<!-- golden: {name} -->");
    let start = SPEC
        .find(&marker)
        .unwrap_or_else(|| panic!("CODING.md has no {marker}"))
        + marker.len();
    let rest = &SPEC[start..];
    let open = rest.find("```").unwrap();
    let body = open + rest[open..].find('\n').unwrap() + 1;
    let len = rest[body..].find("```").unwrap();
    let digits: String = rest[body..body + len]
        .lines()
        .flat_map(|l| l.split('#').next().unwrap_or("").chars())
        .filter(|c| !c.is_whitespace())
        .collect();
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn spec_worked_example_of_coding_md() {
    let weights = [1u64, 30_000, 3, 5_000];
    let symbols = [0u32, 3, 0, 0, 3, 0, 2];
    let c = spec_cumulative(&weights);
    assert!(
        SPEC.contains(&format!(
            "`C = [{}]`",
            c.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        "CODING.md §2.4 lacks the cumulative frequencies {c:?}"
    );
    let mut enc = SpecEncoder::new();
    let mut dec_states = Vec::new();
    let mut missing = Vec::new();
    for (i, &s) in symbols.iter().enumerate() {
        let before = enc.words.len();
        let (cs, f) = (c[s as usize], c[s as usize + 1] - c[s as usize]);
        enc.encode(cs, f);
        let written: Vec<String> = enc.words[before..]
            .iter()
            .map(|w| format!("`{w:08x}`"))
            .collect();
        let held = match enc.held {
            Some((first, n)) => format!("`{first:08x}`, n = {n}"),
            None => "–".into(),
        };
        let row = format!(
            "| {} | {s} | {cs} | {f} | `{:016x}` | `{:016x}` | {} | {held} |",
            i + 1,
            enc.lower,
            enc.range,
            if written.is_empty() {
                "–".into()
            } else {
                written.join(" ")
            }
        );
        if !SPEC.contains(&row) {
            missing.push(row);
        }
        dec_states.push((enc.lower, enc.range));
    }
    assert!(
        missing.is_empty(),
        "CODING.md §2.4 lacks the rows\n{}",
        missing.join("\n")
    );
    let (payload, _) = enc.finish();
    assert_eq!(golden("coder_example"), payload, "the spec encoder");
    let dist = Dense::from_weights(weights);
    let mut lib = Encoder::new();
    for &s in &symbols {
        lib.encode(s, &dist).unwrap();
    }
    assert_eq!(lib.finish(), payload, "the library encoder");
    // The decoder's lower and range follow the encoder's, symbol by symbol.
    let mut dec = SpecDecoder::new(&payload);
    for (&s, &(lower, range)) in symbols.iter().zip(&dec_states) {
        assert_eq!(dec.decode(&c), Ok(s));
        assert_eq!((dec.lower, dec.range), (lower, range));
    }
}
