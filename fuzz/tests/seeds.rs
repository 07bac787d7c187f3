//! Runs every fuzz target body over its committed seeds (`seeds/<target>/*`).

use std::path::Path;

#[test]
fn seeds_replay() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    for (name, body) in unimic_fuzz::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no seeds for {name}");
        for file in &files {
            let data = std::fs::read(file).unwrap();
            body(&data);
        }
        println!("{name}: {} seeds", files.len());
    }
}

/// Seeds not named `bad-*` are valid input: messages parse, frame streams decode to the end.
#[test]
fn good_seeds_are_valid() {
    use unimic_protocol::{frame, Decode, Limits, Message};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let good = |dir: &str| {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.starts_with("bad-") {
                out.push((name, std::fs::read(&path).unwrap()));
            }
        }
        assert!(!out.is_empty());
        out
    };
    for (name, data) in good("message") {
        Message::decode_exact(&data, &Limits::default())
            .unwrap_or_else(|e| panic!("message seed {name}: {e}"));
    }
    for (name, data) in good("frame_stream") {
        let k = usize::from(data[1]);
        let mut d = frame::Decoder::new(Limits::default());
        d.push(&data[2 + k..]);
        while d
            .next_frame()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .is_some()
        {}
        d.finish().unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// The handshake seeds reach acceptance, rejection and an established session.
#[test]
fn handshake_seeds_reach_every_outcome() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/handshake");
    let mut total = unimic_fuzz::handshake::Reached::default();
    for entry in std::fs::read_dir(dir).unwrap() {
        let r = unimic_fuzz::handshake::run_reached(&std::fs::read(entry.unwrap().path()).unwrap());
        total.accepted |= r.accepted;
        total.rejected |= r.rejected;
        total.established |= r.established;
    }
    assert_eq!(
        total,
        unimic_fuzz::handshake::Reached {
            accepted: true,
            rejected: true,
            established: true
        }
    );
}

/// The transformer seeds named `ok-*` (honest payloads of generic, masked and text-conditioned
/// parts) decode and round-trip; those named `refused-*` are refused before decoding.
#[test]
fn transformer_seeds_reach_their_outcome() {
    use unimic_fuzz::transformer_decode::{outcome, Outcome};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/transformer_decode");
    let (mut ok, mut refused) = (0, 0);
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let got = outcome(&std::fs::read(&path).unwrap());
        if name.starts_with("ok-") {
            assert_eq!(got, Outcome::RoundTrip, "{name}");
            ok += 1;
        } else if name.starts_with("refused-") {
            assert_eq!(got, Outcome::Refused, "{name}");
            refused += 1;
        }
    }
    assert!(
        ok >= 6 && refused >= 6,
        "{ok} ok and {refused} refused seeds"
    );
}

/// Transformer parts in several chunks (each continuing the model's run): honest payloads of a
/// generic 4×4 part in chunks of 3 tokens and of a masked 6×5 part's region in chunks of 2, made
/// here by the target's own sender and equal to the committed seeds (`UNIMIC_WRITE_SEEDS=1`
/// rewrites them); both decode chunk by chunk and round-trip.
#[test]
fn transformer_chunked_seeds() {
    use unimic_fuzz::transformer_decode::{honest_input, outcome, Outcome};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/transformer_decode");
    // Headers (module docs of the target): flags with bit 3 (a chunk size), height, width,
    // codebook choice 0 (16), the chunk size, no text; the masked one with its region bytes.
    let seeds = [
        ("ok-generic-chunked", vec![0x08, 4, 4, 0, 3, 0]),
        (
            "ok-masked-chunked",
            vec![0x09, 6, 5, 0, 2, 0, 0x00, 0x38, 0x07, 0x00],
        ),
    ];
    for (name, header) in seeds {
        let bytes = honest_input(&header, 7).expect("the sender takes the part");
        assert_eq!(outcome(&bytes), Outcome::RoundTrip, "{name}");
        let path = dir.join(name);
        if std::env::var_os("UNIMIC_WRITE_SEEDS").is_some() {
            std::fs::write(&path, &bytes).unwrap();
        }
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{name} is committed");
    }
}

/// The `codec_decode` seeds: those named `ok-*` are real encodes, of several chunks each, of
/// shipped data (the default tokenizer's tokens in `models/entropy/data/*.val.umtg`, o200k ids
/// of the captions next to them) with the models the target decodes with (uniform, adaptive,
/// the shipped static ladder model); `garbage-*` are mutations of them. They are generated here
/// and must equal the committed files; `UNIMIC_WRITE_SEEDS=1` (re)writes them.
#[test]
fn codec_decode_seeds() {
    use unimic_codec::grid::{read_grid_file, TokenGrid};
    use unimic_codec::part::{ModelChoice, PartTokens};
    use unimic_codec::text::{O200k, TextTokenizer};
    use unimic_fuzz::codec_decode::{honest_input, outcome, Outcome};

    // The data is a local cache (git-ignored: `unimic train entropy --export-data` writes it), so
    // a fresh clone only replays the committed seeds (`seeds_replay`, `good_seeds_are_valid`).
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/entropy/data");
    let find = |suffix: &str| {
        let mut v: Vec<_> = std::fs::read_dir(&data)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect();
        v.sort();
        v.into_iter().next()
    };
    let (Some(val_grids), Some(val_captions)) = (find(".val.umtg"), find(".val.captions.txt"))
    else {
        println!(
            "skipping: codec_decode seed regeneration needs the exported tokens in {} \
             (absent; the committed seeds still run in the replay test)",
            data.display()
        );
        return;
    };
    let grids = read_grid_file(&std::fs::read(val_grids).unwrap(), 1 << 20).unwrap();
    let captions = std::fs::read_to_string(val_captions).unwrap();
    let captions: Vec<&str> = captions.lines().collect();
    let text = |lines: std::ops::Range<usize>| O200k::new().encode(&captions[lines].join("\n"));
    let (g0, g1) = (&grids[0], &grids[1]);
    assert_eq!(
        (g0.height(), g0.width(), g0.codebook_size()),
        (16, 16, 1024)
    );
    let half = TokenGrid::new(8, 16, 1024, grids[2].ids()[..128].to_vec()).unwrap();
    let (t3, t1) = (text(0..3), text(3..4));
    let ok = [
        (
            "ok-adaptive-grid-16x16-3chunks",
            honest_input(ModelChoice::Adaptive, PartTokens::Grid(g0), 100),
        ),
        (
            "ok-static-grid-16x16-2chunks",
            honest_input(ModelChoice::Static, PartTokens::Grid(g1), 128),
        ),
        (
            "ok-uniform-grid-8x16-2chunks",
            honest_input(ModelChoice::Uniform, PartTokens::Grid(&half), 64),
        ),
        (
            "ok-adaptive-text-3chunks",
            honest_input(ModelChoice::Adaptive, PartTokens::Text(&t3), 16),
        ),
        (
            "ok-uniform-text-2chunks",
            honest_input(
                ModelChoice::Uniform,
                PartTokens::Text(&t1),
                t1.len().div_ceil(2) as u16,
            ),
        ),
    ];
    let mut seeds: Vec<(&str, Vec<u8>)> = Vec::new();
    for (name, bytes) in &ok {
        match outcome(bytes) {
            Outcome::RoundTrip {
                chunks,
                honest: true,
            } if chunks >= 2 => {}
            other => panic!("{name}: {other:?}"),
        }
        seeds.push((name, bytes.clone()));
    }
    // Mutations: the adaptive grid's second chunk with bits flipped; the text part cut short
    // (its last chunk loses bytes, the part keeps its shape); a 64×64 grid of 16,384 codes whose
    // chunks get the 16×16 grid's payloads.
    let mut flipped = ok[0].1.clone();
    let n = flipped.len();
    for b in &mut flipped[n / 2..n / 2 + 4] {
        *b ^= 0x5a;
    }
    let cut = ok[3].1[..ok[3].1.len() - 3].to_vec();
    let mut wide = ok[0].1.clone();
    wide[..5].copy_from_slice(&[1 | 4 | (2 << 3), 63, 63, 0x03, 0xe8]);
    seeds.extend([
        ("garbage-adaptive-grid-flipped", flipped),
        ("garbage-adaptive-text-cut", cut),
        ("garbage-adaptive-grid-64x64-16k", wide),
    ]);
    // The flipped chunk no longer decodes to what was coded (it may still decode: a range-coder
    // payload has no redundancy to detect damage with); the wide grid has five chunks, the last
    // two without payload bytes.
    assert_ne!(outcome(&seeds[ok.len()].1), outcome(&ok[0].1));
    assert_eq!(
        outcome(&seeds[ok.len() + 2].1),
        Outcome::RoundTrip {
            chunks: 5,
            honest: false
        }
    );

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/codec_decode");
    if std::env::var_os("UNIMIC_WRITE_SEEDS").is_some() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    let mut committed: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    committed.sort();
    let mut names: Vec<String> = seeds.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    assert_eq!(
        committed, names,
        "run with UNIMIC_WRITE_SEEDS=1 to rewrite the seeds"
    );
    for (name, bytes) in &seeds {
        assert_eq!(
            &std::fs::read(dir.join(name)).unwrap(),
            bytes,
            "seeds/codec_decode/{name} differs from a fresh encode: run with UNIMIC_WRITE_SEEDS=1"
        );
    }
}

/// The part-header seeds named `ok-*` are accepted by the receiver's checks, those named
/// `refused-*` parse and are refused (with a documented code).
#[test]
fn part_header_seeds_reach_acceptance_and_refusal() {
    use unimic_protocol::{Decode, PartBody, PartHeader};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/part_header");
    let checker = unimic_fuzz::part_header::checker_for_tests();
    let (mut ok, mut refused) = (0, 0);
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let data = std::fs::read(&path).unwrap();
        let mut buf = &data[..];
        let Ok(h) = PartHeader::decode(&mut buf, &unimic_fuzz::part_header::limits()) else {
            assert!(name.starts_with("bad-"), "{name} does not parse");
            continue;
        };
        let (image, c) = match &h.body {
            PartBody::Text(c) => (false, c),
            PartBody::Image(c) => (true, c),
            _ => panic!("{name}: not a coded part"),
        };
        let outcome = checker.check(image, c);
        if name.starts_with("ok-") {
            outcome.unwrap_or_else(|e| panic!("{name}: {e:?}"));
            ok += 1;
        } else if name.starts_with("refused-") {
            assert!(outcome.is_err(), "{name} was accepted");
            refused += 1;
        }
    }
    assert!(ok >= 5 && refused >= 2, "{ok} accepted, {refused} refused");
}

/// The `session` seeds, written from their operations (`UNIMIC_WRITE_SEEDS=1` rewrites them);
/// each reaches what its name says: `ok-*` honest messages delivered intact, `refused-*` an
/// ERROR from the server, and the good client's turn goes through beside every one of them.
#[test]
fn session_seeds_reach_delivery_and_refusal() {
    use unimic_fuzz::session::{encode, run_reached, Op};
    let text = |slot, ids: &[u16], model, chunk, refs: &[u8]| Op::Text {
        slot,
        ids: ids.to_vec(),
        model,
        chunk,
        refs: refs.to_vec(),
    };
    let image = |slot, rows, cols, model, refs: &[u8]| Op::Image {
        slot,
        rows,
        cols,
        ids: (0..u16::from(rows) * u16::from(cols))
            .map(|i| (i * 7 % 16) as u8)
            .collect(),
        model,
        chunk: 0,
        refs: refs.to_vec(),
    };
    let message = |slot, id, parts: Vec<Op>| {
        let mut ops = vec![Op::Open { slot }, Op::Header { slot, id, role: 0 }];
        ops.extend(parts);
        ops.extend([Op::End { slot, count: 0xff }, Op::Finish { slot }]);
        ops
    };
    let words: Vec<u16> = (0..20).map(|i| 100 + i * 37).collect();
    let cases: Vec<(&str, Vec<Op>, usize, Option<&str>)> = vec![
        (
            "ok-one-text-part",
            message(0, 2, vec![text(0, &words, 0, 0, &[])]),
            1,
            None,
        ),
        (
            "ok-context-reuse",
            [
                message(0, 2, vec![text(0, &words, 1, 0, &[])]),
                message(
                    1,
                    4,
                    vec![image(1, 4, 5, 1, &[]), text(1, &words, 1, 6, &[0])],
                ),
                message(
                    2,
                    6,
                    vec![image(2, 4, 5, 1, &[0, 1]), image(2, 3, 3, 3, &[])],
                ),
                message(
                    3,
                    8,
                    vec![
                        Op::Raw {
                            slot: 3,
                            bytes: b"attachment".to_vec(),
                        },
                        text(3, &words[..5], 2, 0, &[]),
                    ],
                ),
            ]
            .concat(),
            4,
            None,
        ),
        (
            "ok-interleaved-streams",
            vec![
                Op::Open { slot: 0 },
                Op::Open { slot: 1 },
                Op::Header {
                    slot: 0,
                    id: 2,
                    role: 0,
                },
                Op::Header {
                    slot: 1,
                    id: 4,
                    role: 1,
                },
                text(1, &words, 0, 4, &[]),
                image(0, 6, 6, 2, &[]),
                text(0, &words[..3], 1, 0, &[]),
                Op::End {
                    slot: 1,
                    count: 0xff,
                },
                Op::End {
                    slot: 0,
                    count: 0xff,
                },
                Op::Finish { slot: 0 },
                Op::Finish { slot: 1 },
            ],
            2,
            None,
        ),
        (
            "ok-corrupt-payload",
            message(
                0,
                2,
                vec![Op::Corrupt { slot: 0 }, text(0, &words, 1, 0, &[])],
            ),
            0,
            None,
        ),
        (
            "refused-wrong-part-count",
            vec![
                Op::Open { slot: 0 },
                Op::Header {
                    slot: 0,
                    id: 2,
                    role: 0,
                },
                text(0, &words, 0, 0, &[]),
                Op::End { slot: 0, count: 3 },
                Op::Finish { slot: 0 },
            ],
            0,
            Some("PROTOCOL_VIOLATION"),
        ),
        (
            "refused-unknown-context",
            message(0, 2, vec![text(0, &words, 1, 0, &[0xf0])]),
            0,
            Some("CONTEXT_UNKNOWN"),
        ),
        (
            "refused-reused-id",
            [
                message(0, 2, vec![text(0, &words, 0, 0, &[])]),
                message(1, 2, vec![text(1, &words[..4], 1, 0, &[])]),
            ]
            .concat(),
            0,
            Some("PROTOCOL_VIOLATION"),
        ),
        (
            "refused-decreasing-id",
            [
                message(0, 4, vec![text(0, &words, 0, 0, &[])]),
                message(1, 2, vec![text(1, &words[..4], 1, 0, &[])]),
            ]
            .concat(),
            1,
            Some("PROTOCOL_VIOLATION"),
        ),
        (
            "refused-garbage-and-reset",
            vec![
                Op::Open { slot: 0 },
                Op::Bytes {
                    slot: 0,
                    bytes: vec![0x04, 0x02, 0x00, 0x07, 0xff, 0x00],
                },
                Op::Finish { slot: 0 },
                Op::Open { slot: 1 },
                Op::Header {
                    slot: 1,
                    id: 6,
                    role: 0,
                },
                text(1, &words, 0, 2, &[]),
                Op::Reset { slot: 1, code: 9 },
            ],
            0,
            None,
        ),
        (
            "ok-control-garbage",
            [
                vec![Op::Control {
                    seed: vec![3, 1, 2, 3, 4, 5, 6, 7],
                }],
                message(0, 2, vec![text(0, &words, 0, 0, &[])]),
            ]
            .concat(),
            0,
            None,
        ),
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/session");
    let write = std::env::var_os("UNIMIC_WRITE_SEEDS").is_some();
    for (name, ops, delivered, error) in cases {
        let bytes = encode(&ops);
        assert_eq!(
            unimic_fuzz::session::parse(&bytes),
            ops,
            "{name}: grammar round trip"
        );
        let path = dir.join(name);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        } else {
            let committed = std::fs::read(&path).unwrap_or_else(|e| {
                panic!("{}: {e} (UNIMIC_WRITE_SEEDS=1 writes it)", path.display())
            });
            assert_eq!(
                committed, bytes,
                "{name}: committed seed differs from its operations"
            );
        }
        let reached = run_reached(&bytes);
        println!("{name}: {reached:?}");
        assert!(
            reached.delivered >= delivered,
            "{name}: {} honest messages delivered, expected {delivered}: {reached:?}",
            reached.delivered
        );
        if let Some(code) = error {
            assert!(
                reached.errors.contains(&code),
                "{name}: no {code}: {reached:?}"
            );
        }
    }
}
