//! The `.umic` file: one image as entropy-coded tokens, self-describing enough to be decoded on
//! another machine that holds the same models (`unimic encode` / `unimic decode`).
//!
//! The format is specified in `docs/UMIC_FILE.md`. In short, all integers are QUIC varints
//! (RFC 9000 §16, shortest form) unless stated:
//!
//! ```text
//! magic "UMIC" | version u8 (=1) | tokenizer name (len, UTF-8) | tokenizer hash (8 bytes)
//! | entropy model id (len, UTF-8) | model version | model hash (8 bytes)
//! | image width | image height | grid height | grid width (height × width ≤ 4096) | codebook size
//! | chunk count | per chunk: tokens, payload length, payload bytes
//! [version 2 only: refinement level count (1..=15)
//!   | per level: entropy model id | model version | model hash | chunk count | chunks]
//! | checksum (4 bytes: the first 4 bytes of SHA-256 over everything before it)
//! ```
//!
//! Version 2 carries a quality ladder: the grid above is level 1, and each refinement level is
//! one more grid of the same shape and codebook (a residual code the tokenizer adds on top of the
//! levels below). A file without refinement levels is always written as version 1.
//!
//! Hashes are truncated to 8 bytes: a file only has to detect that the decoder holds different
//! weights, not prove it to an adversary (the session handshake uses full 32-byte hashes).
//!
//! ```
//! use unimic_codec::umic::{UmicFile, ModelTag};
//! let file = UmicFile {
//!     tokenizer: ModelTag { name: "vq".into(), version: 1, hash: [1; 8] },
//!     model: ModelTag { name: "unimic-entropy/adaptive-grid".into(), version: 1, hash: [2; 8] },
//!     image_width: 250,
//!     image_height: 240,
//!     grid_height: 15,
//!     grid_width: 16,
//!     codebook_size: 1024,
//!     chunks: vec![(240, vec![0xde, 0xad])],
//!     levels: vec![],
//! };
//! let bytes = file.to_bytes();
//! assert_eq!(UmicFile::from_bytes(&bytes).unwrap(), file);
//! ```

#[cfg(feature = "vq")]
mod image;

#[cfg(feature = "vq")]
pub use image::{
    builtin_choice, builtin_model_name, check_against, check_file, check_names, decode_grids,
    decode_image, encode_image, EncodeOptions, Encoded, ImageError, Level1Model,
};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The four bytes every `.umic` file starts with.
pub const MAGIC: [u8; 4] = *b"UMIC";
/// The format version of a file without refinement levels.
pub const VERSION: u8 = 1;
/// The format version of a file with refinement levels (a quality ladder).
pub const VERSION_LADDER: u8 = 2;
/// Most refinement levels a file may carry (levels 2..=16 of a ladder).
pub const MAX_REFINEMENTS: u64 = 15;
/// Longest model name accepted.
pub const MAX_NAME: usize = 128;
/// Most chunks accepted in one file.
pub const MAX_CHUNKS: u64 = 1 << 16;
/// Largest grid side accepted (tokens).
pub const MAX_GRID_SIDE: u64 = 4096;
/// Most tokens a grid may hold (height × width): the image tokenizers' limit
/// (`tokenizer::MAX_TOKENS`), so that a few header bytes cannot ask for more decoding work
/// than any tokenizer could have produced.
pub const MAX_GRID_TOKENS: u64 = 4096;

/// A model named in a file: name, version and an 8-byte prefix of its content hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelTag {
    /// Model name or id.
    pub name: String,
    /// Model version.
    pub version: u64,
    /// First 8 bytes of the model's SHA-256 content hash.
    pub hash: [u8; 8],
}

/// A parsed `.umic` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UmicFile {
    /// The image tokenizer (version is not stored for tokenizers: always read as 1).
    pub tokenizer: ModelTag,
    /// The entropy model.
    pub model: ModelTag,
    /// Width of the original image in pixels (the decoder crops to it).
    pub image_width: u64,
    /// Height of the original image in pixels.
    pub image_height: u64,
    /// Token grid rows.
    pub grid_height: u64,
    /// Token grid columns.
    pub grid_width: u64,
    /// Codebook size of the tokenizer.
    pub codebook_size: u64,
    /// Independently decodable chunks: (tokens, range-coder payload).
    pub chunks: Vec<(u64, Vec<u8>)>,
    /// Refinement levels 2, 3, … of a quality ladder, in order (empty: level 1 only).
    pub levels: Vec<Level>,
}

/// One refinement level of a quality ladder: a grid of the same shape and codebook as level 1,
/// coded with its own entropy model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Level {
    /// The entropy model of this level.
    pub model: ModelTag,
    /// Independently decodable chunks: (tokens, range-coder payload), as for level 1.
    pub chunks: Vec<(u64, Vec<u8>)>,
}

/// Why a `.umic` file could not be read.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UmicError {
    /// The file does not start with `UMIC`.
    #[error("not a .umic file (bad magic)")]
    BadMagic,
    /// The file has a version this code does not read.
    #[error("unsupported .umic version {0}")]
    UnsupportedVersion(u8),
    /// The file ends early.
    #[error("truncated .umic file")]
    Truncated,
    /// The checksum does not match the contents.
    #[error("checksum mismatch: the file is corrupt")]
    Checksum,
    /// A field is invalid.
    #[error("malformed .umic file: {0}")]
    Malformed(&'static str),
    /// Bytes follow the checksum.
    #[error("{0} trailing bytes after the checksum")]
    TrailingBytes(usize),
}

fn put_varint(out: &mut Vec<u8>, v: u64) {
    if v < 1 << 6 {
        out.push(v as u8);
    } else if v < 1 << 14 {
        out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes());
    } else if v < 1 << 30 {
        out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes());
    } else {
        // Values above 2^62 - 1 cannot be written; every caller stays far below.
        out.extend_from_slice(&((v & ((1 << 62) - 1)) | 0xc000_0000_0000_0000).to_be_bytes());
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], UmicError> {
        if self.buf.len() < n {
            return Err(UmicError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn varint(&mut self) -> Result<u64, UmicError> {
        let first = *self.take(1)?.first().ok_or(UmicError::Truncated)?;
        let len = 1usize << (first >> 6);
        let mut v = u64::from(first & 0x3f);
        for &b in self.take(len - 1)? {
            v = (v << 8) | u64::from(b);
        }
        let min = match len {
            1 => 0,
            2 => 1 << 6,
            4 => 1 << 14,
            _ => 1 << 30,
        };
        if v < min {
            return Err(UmicError::Malformed("varint not in shortest form"));
        }
        Ok(v)
    }

    fn bounded(&mut self, max: u64, what: &'static str) -> Result<u64, UmicError> {
        let v = self.varint()?;
        if v > max {
            return Err(UmicError::Malformed(what));
        }
        Ok(v)
    }

    fn hash8(&mut self) -> Result<[u8; 8], UmicError> {
        let mut h = [0; 8];
        h.copy_from_slice(self.take(8)?);
        Ok(h)
    }

    /// A chunk count and its chunks, whose token counts must add up to `total`.
    fn chunks(&mut self, total: u64, file_len: usize) -> Result<Vec<(u64, Vec<u8>)>, UmicError> {
        let count = self.bounded(MAX_CHUNKS, "too many chunks")?;
        let mut chunks = Vec::new();
        let mut tokens_seen = 0u64;
        for _ in 0..count {
            let tokens = self.bounded(total, "chunk larger than the grid")?;
            tokens_seen += tokens;
            let len = self.bounded(file_len as u64, "chunk payload longer than the file")? as usize;
            chunks.push((tokens, self.take(len)?.to_vec()));
        }
        if tokens_seen != total {
            return Err(UmicError::Malformed(
                "chunk token counts do not add up to the grid",
            ));
        }
        Ok(chunks)
    }

    fn name(&mut self) -> Result<String, UmicError> {
        let len = self.bounded(MAX_NAME as u64, "model name too long")? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| UmicError::Malformed("model name is not UTF-8"))
    }
}

fn checksum(bytes: &[u8]) -> [u8; 4] {
    let d = Sha256::digest(bytes);
    [d[0], d[1], d[2], d[3]]
}

impl UmicFile {
    /// Total payload bytes over all chunks of every level.
    pub fn payload_bytes(&self) -> usize {
        self.chunks.iter().map(|(_, p)| p.len()).sum::<usize>()
            + self
                .levels
                .iter()
                .flat_map(|l| l.chunks.iter())
                .map(|(_, p)| p.len())
                .sum::<usize>()
    }

    /// Payload bytes of level 1 alone.
    pub fn level1_payload_bytes(&self) -> usize {
        self.chunks.iter().map(|(_, p)| p.len()).sum()
    }

    /// Serializes the file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96 + self.payload_bytes());
        out.extend_from_slice(&MAGIC);
        out.push(if self.levels.is_empty() {
            VERSION
        } else {
            VERSION_LADDER
        });
        put_varint(&mut out, self.tokenizer.name.len() as u64);
        out.extend_from_slice(self.tokenizer.name.as_bytes());
        out.extend_from_slice(&self.tokenizer.hash);
        put_varint(&mut out, self.model.name.len() as u64);
        out.extend_from_slice(self.model.name.as_bytes());
        put_varint(&mut out, self.model.version);
        out.extend_from_slice(&self.model.hash);
        for v in [
            self.image_width,
            self.image_height,
            self.grid_height,
            self.grid_width,
            self.codebook_size,
            self.chunks.len() as u64,
        ] {
            put_varint(&mut out, v);
        }
        put_chunks(&mut out, &self.chunks);
        if !self.levels.is_empty() {
            put_varint(&mut out, self.levels.len() as u64);
            for level in &self.levels {
                put_varint(&mut out, level.model.name.len() as u64);
                out.extend_from_slice(level.model.name.as_bytes());
                put_varint(&mut out, level.model.version);
                out.extend_from_slice(&level.model.hash);
                put_varint(&mut out, level.chunks.len() as u64);
                put_chunks(&mut out, &level.chunks);
            }
        }
        let sum = checksum(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Parses a file, checking magic, version, checksum, bounds and that the chunks' token
    /// counts add up to the grid size. Never panics and never allocates more than the input size.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, UmicError> {
        if bytes.len() < 4 || bytes[..4] != MAGIC {
            return Err(UmicError::BadMagic);
        }
        if bytes.len() < 9 {
            return Err(UmicError::Truncated);
        }
        let version = bytes[4];
        if version != VERSION && version != VERSION_LADDER {
            return Err(UmicError::UnsupportedVersion(version));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 4);
        let mut r = Reader { buf: &body[5..] };
        let tokenizer_name = r.name()?;
        let tokenizer = ModelTag {
            name: tokenizer_name,
            version: 1,
            hash: r.hash8()?,
        };
        let model_name = r.name()?;
        let model_version = r.varint()?;
        let model = ModelTag {
            name: model_name,
            version: model_version,
            hash: r.hash8()?,
        };
        let image_width = r.bounded(MAX_GRID_SIDE * 64, "image width too large")?;
        let image_height = r.bounded(MAX_GRID_SIDE * 64, "image height too large")?;
        let grid_height = r.bounded(MAX_GRID_SIDE, "grid height too large")?;
        let grid_width = r.bounded(MAX_GRID_SIDE, "grid width too large")?;
        let codebook_size = r.bounded(1 << 16, "codebook larger than 65536")?;
        if grid_height == 0 || grid_width == 0 || codebook_size == 0 {
            return Err(UmicError::Malformed("empty grid or codebook"));
        }
        if image_width == 0 || image_height == 0 {
            return Err(UmicError::Malformed("empty image"));
        }
        let total = grid_height * grid_width;
        if total > MAX_GRID_TOKENS {
            return Err(UmicError::Malformed("grid of more than 4096 tokens"));
        }
        let chunks = r.chunks(total, body.len())?;
        let mut levels = Vec::new();
        if version == VERSION_LADDER {
            let n = r.bounded(MAX_REFINEMENTS, "too many refinement levels")?;
            if n == 0 {
                return Err(UmicError::Malformed(
                    "a version 2 file without refinement levels",
                ));
            }
            for _ in 0..n {
                let name = r.name()?;
                let version = r.varint()?;
                let model = ModelTag {
                    name,
                    version,
                    hash: r.hash8()?,
                };
                levels.push(Level {
                    model,
                    chunks: r.chunks(total, body.len())?,
                });
            }
        }
        if !r.buf.is_empty() {
            // Bytes between the last chunk and the checksum: either a truncated file whose tail
            // happens to parse, or garbage. The checksum decides which error is clearer.
            if checksum(body) != sum {
                return Err(UmicError::Checksum);
            }
            return Err(UmicError::TrailingBytes(r.buf.len()));
        }
        if checksum(body) != sum {
            return Err(UmicError::Checksum);
        }
        Ok(Self {
            tokenizer,
            model,
            image_width,
            image_height,
            grid_height,
            grid_width,
            codebook_size,
            chunks,
            levels,
        })
    }
}

fn put_chunks(out: &mut Vec<u8>, chunks: &[(u64, Vec<u8>)]) {
    for (tokens, payload) in chunks {
        put_varint(out, *tokens);
        put_varint(out, payload.len() as u64);
        out.extend_from_slice(payload);
    }
}

/// The first 8 bytes of a 32-byte hash.
pub fn hash8(hash: &[u8; 32]) -> [u8; 8] {
    let mut h = [0; 8];
    h.copy_from_slice(&hash[..8]);
    h
}

/// Whether `id` has the form of a transformer entropy model's id, `unimic-entropy-<kind>-v<n>`
/// (`kind` lower-case ASCII letters, `n` decimal digits): nothing in it can name a folder.
pub fn is_model_id(id: &str) -> bool {
    model_kind(id).is_some()
}

/// The transformer kind (`generic`, `masked`, `text`, …) a model id names, if it is one
/// ([`is_model_id`]).
pub fn model_kind(id: &str) -> Option<&str> {
    let (kind, n) = id.strip_prefix("unimic-entropy-")?.rsplit_once("-v")?;
    let ok = !kind.is_empty()
        && kind.bytes().all(|b| b.is_ascii_lowercase())
        && !n.is_empty()
        && n.len() <= 9
        && n.bytes().all(|b| b.is_ascii_digit());
    ok.then_some(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> UmicFile {
        UmicFile {
            tokenizer: ModelTag {
                name: "unimic-vq16".into(),
                version: 1,
                hash: [7; 8],
            },
            model: ModelTag {
                name: "adaptive-grid".into(),
                version: 3,
                hash: [9; 8],
            },
            image_width: 768,
            image_height: 512,
            grid_height: 32,
            grid_width: 48,
            codebook_size: 1024,
            chunks: vec![(1000, vec![1, 2, 3]), (536, (0..=255).collect())],
            levels: vec![],
        }
    }

    fn ladder() -> UmicFile {
        let mut f = sample();
        f.levels = vec![
            Level {
                model: ModelTag {
                    name: "static-l2".into(),
                    version: 1,
                    hash: [3; 8],
                },
                chunks: vec![(1536, vec![4, 5])],
            },
            Level {
                model: ModelTag {
                    name: "static-l3".into(),
                    version: 1,
                    hash: [4; 8],
                },
                chunks: vec![(1000, vec![6]), (536, vec![])],
            },
        ];
        f
    }

    #[test]
    fn ladder_round_trip_and_version() {
        let f = ladder();
        let bytes = f.to_bytes();
        assert_eq!(bytes[4], VERSION_LADDER);
        assert_eq!(sample().to_bytes()[4], VERSION);
        assert_eq!(UmicFile::from_bytes(&bytes).unwrap(), f);
        assert_eq!(f.payload_bytes(), 3 + 256 + 2 + 1);
        assert_eq!(f.level1_payload_bytes(), 3 + 256);
        for n in 0..bytes.len() {
            assert!(
                UmicFile::from_bytes(&bytes[..n]).is_err(),
                "prefix {n} parsed"
            );
        }
        // A refinement level whose chunks do not cover the grid is refused.
        let mut bad = ladder();
        bad.levels[1].chunks[1].0 = 535;
        assert_eq!(
            UmicFile::from_bytes(&bad.to_bytes()),
            Err(UmicError::Malformed(
                "chunk token counts do not add up to the grid"
            ))
        );
    }

    /// A file of a hundred bytes could declare a 4096×4096 grid (16 M tokens to decode, one
    /// chunk of an empty payload): the reader refuses every grid above the tokenizers' limit.
    #[test]
    fn grids_above_the_tokenizers_limit_are_refused() {
        let mut f = sample();
        f.chunks = vec![(4096 * 4096, vec![0; 16])];
        (f.grid_height, f.grid_width) = (4096, 4096);
        let bytes = f.to_bytes();
        assert!(bytes.len() < 100, "{} bytes", bytes.len());
        assert_eq!(
            UmicFile::from_bytes(&bytes),
            Err(UmicError::Malformed("grid of more than 4096 tokens"))
        );
        for (h, w, ok) in [
            (64, 64, true),
            (1, 4096, true),
            (64, 65, false),
            (2, 4096, false),
        ] {
            let mut f = sample();
            (f.grid_height, f.grid_width) = (h, w);
            f.chunks = vec![(h * w, vec![1])];
            assert_eq!(UmicFile::from_bytes(&f.to_bytes()).is_ok(), ok, "{h}x{w}");
        }
    }

    #[cfg(feature = "vq")]
    #[test]
    fn the_grid_limit_is_the_tokenizers() {
        assert_eq!(MAX_GRID_TOKENS, crate::tokenizer::MAX_TOKENS as u64);
    }

    #[test]
    fn round_trip() {
        let f = sample();
        assert_eq!(UmicFile::from_bytes(&f.to_bytes()).unwrap(), f);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().to_bytes();
        for n in 0..bytes.len() {
            assert!(
                UmicFile::from_bytes(&bytes[..n]).is_err(),
                "prefix of {n} bytes parsed"
            );
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = sample().to_bytes();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(
                    UmicFile::from_bytes(&b).is_err(),
                    "flip at byte {i} bit {bit} parsed"
                );
            }
        }
    }

    #[test]
    fn specific_errors() {
        let bytes = sample().to_bytes();
        assert_eq!(UmicFile::from_bytes(b"JPEG....."), Err(UmicError::BadMagic));
        let mut v3 = bytes.clone();
        v3[4] = 3;
        assert_eq!(
            UmicFile::from_bytes(&v3),
            Err(UmicError::UnsupportedVersion(3))
        );
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(UmicFile::from_bytes(&extra).is_err());
        let mut bad_counts = sample();
        bad_counts.chunks[0].0 = 999;
        assert_eq!(
            UmicFile::from_bytes(&bad_counts.to_bytes()),
            Err(UmicError::Malformed(
                "chunk token counts do not add up to the grid"
            ))
        );
    }
}
