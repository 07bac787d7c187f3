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
