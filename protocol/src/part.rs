//! Part headers and chunks: what one piece of a message is and how it is coded.
//!
//! A part is text tokens, an image token grid, or a raw attachment. On a message stream it is a
//! [`PartHeader`] frame followed by one or more [`PartChunk`] frames, the last with `fin` set.
//! Each chunk's payload is decodable on its own: for coded parts it is one complete, separately
//! terminated entropy-coded message (docs/CODING.md §4 defines the model state it starts from).
//! Its tokens start at the sum of the token counts of the part's earlier chunks.

use bytes::{Buf, BufMut, Bytes};

use crate::coding::{
    len_bytes_size, len_size, need, put_len, put_len_bytes, read_bounded, read_count, read_hash,
    read_len_bytes, read_string, read_varint, Decode, DecodeError, Encode,
};
use crate::limits::{Limits, MAX_CONTEXT_REFS, MAX_MEDIA_TYPE_LEN, MAX_MODELS, MAX_RECTS};
use crate::varint::VarInt;

/// The domain-separation prefix of the context digest (docs/PROTOCOL.md §8): the 17 ASCII bytes
/// `unimic-context-v1`.
///
/// The digest is `SHA-256(CONTEXT_DIGEST_DOMAIN || varint(N) || for each reference:
/// varint(message_id) || varint(part_index) || varint(kind) || varint(rows) || varint(cols) ||
/// rows × cols token ids as u32 little-endian)`, with kind 0 for text (rows 1) and 1 for an image
/// grid. The codec's session context computes it; this crate only carries the 32 bytes.
pub const CONTEXT_DIGEST_DOMAIN: &[u8; 17] = b"unimic-context-v1";

/// The context digest of an empty context: SHA-256 of `unimic-context-v1` followed by `0x00`.
pub const EMPTY_CONTEXT_DIGEST: [u8; 32] = [
    0x0d, 0x21, 0x1c, 0x00, 0x36, 0x46, 0x88, 0x50, 0x94, 0x96, 0xf5, 0xe8, 0x32, 0x9e, 0x0a, 0x6a,
    0x8b, 0xdb, 0x3d, 0x91, 0xd7, 0xd8, 0x30, 0xea, 0x4a, 0x70, 0xae, 0x11, 0x12, 0x91, 0xab, 0xcb,
];

/// A reference to an earlier part of the session: the context a coded part depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ContextRef {
    /// The id of the message that carried the part.
    pub message_id: VarInt,
    /// The index of the part within that message.
    pub part_index: VarInt,
}

impl Encode for ContextRef {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.message_id.encode(buf);
        self.part_index.encode(buf);
    }

    fn encoded_len(&self) -> usize {
        self.message_id
            .size()
            .saturating_add(self.part_index.size())
    }
}

impl Decode for ContextRef {
    fn decode<B: Buf>(buf: &mut B, _limits: &Limits) -> Result<Self, DecodeError> {
        Ok(ContextRef {
            message_id: read_varint(buf)?,
            part_index: read_varint(buf)?,
        })
    }
}

/// The header of one part: its index in the message and what it holds.
///
/// Its last field, the context digest, may be left out when the context is empty, so a header
/// is decoded from a whole `PART_HEADER` frame payload (as [`Frame`](crate::Frame) does), where
/// the payload's end says whether the digest is there.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct PartHeader {
    /// Position of the part in its message: 0 for the first, then 1, 2, … with no gaps.
    pub index: VarInt,
    /// What the part holds.
    pub body: PartBody,
}

/// What a part holds. Wire value in parentheses.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[non_exhaustive]
pub enum PartBody {
    /// (0) Text token ids, entropy-coded. Shape is 1 × count.
    Text(CodedPart),
    /// (1) An image token grid, entropy-coded. Shape is height × width.
    Image(CodedPart),
    /// (2) An opaque attachment; its chunks carry the raw bytes.
    Raw(RawPart),
}

impl PartBody {
    /// The wire value of the part kind.
    pub fn kind(&self) -> u8 {
        match self {
            PartBody::Text(_) => 0,
            PartBody::Image(_) => 1,
            PartBody::Raw(_) => 2,
        }
    }

    /// The coded description, for text and image parts.
    pub fn coded(&self) -> Option<&CodedPart> {
        match self {
            PartBody::Text(c) | PartBody::Image(c) => Some(c),
            PartBody::Raw(_) => None,
        }
    }
}

/// How a text or image part is coded, and what it depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct CodedPart {
    /// Index into the tokenizer table of the server hello.
    pub tokenizer: VarInt,
    /// Index into the entropy model table of the server hello.
    pub entropy_model: VarInt,
    /// Rows × columns: `1 × n` for text (`n` = 0 when the total is not yet known), grid
    /// height × width for images.
    pub shape: Shape,
    /// Number of tokens the chunks carry in total. Text: equal to `shape.cols` (0 = not yet
    /// known). Image: `rows × cols`, except masked mode, where it is the number of cells in the
    /// region.
    pub token_count: VarInt,
    /// The coding mode.
    pub mode: CodingMode,
    /// The earlier parts the coding conditions on, in the order the model reads them.
    pub context: Vec<ContextRef>,
    /// The context digest (docs/PROTOCOL.md §8) of `context`, computed by the sender. On the
    /// wire it is left out when `context` is empty and the digest is the constant
    /// [`EMPTY_CONTEXT_DIGEST`] (a parsed header without it holds that constant); see
    /// [`CodedPart::digest_on_wire`].
    pub context_digest: [u8; 32],
}

/// Rows × columns of a part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Shape {
    /// Rows (grid height; 1 for text).
    pub rows: VarInt,
    /// Columns (grid width; token count for text).
    pub cols: VarInt,
}

/// How the tokens of a part are entropy-coded. Wire value in parentheses. The probability models
/// behind each mode are specified in docs/CODING.md.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[non_exhaustive]
pub enum CodingMode {
    /// (0) Every token id equally likely (no model inference).
    Uniform,
    /// (1) The entropy model's unconditional (autoregressive) prediction.
    Generic,
    /// (2) Only the cells inside the region are coded, conditioned on the image in the context
    /// (the cells outside are taken from it). Image parts only, with a masked model only: the
    /// first image part in the context is the reference, the region's tokens are coded in the
    /// model's order in one chunk, and the decoded part is the whole grid (docs/PROTOCOL.md §6.3).
    Masked(Region),
    /// (3) Conditioned on the text parts in the context (for the text-conditioned model: their
    /// ids concatenated in the order the context lists them, docs/PROTOCOL.md §6.3).
    TextConditioned,
    /// (4) Conditioned on an earlier image in the context.
    ImageConditioned,
    /// (5) Refinement level `level` (2 …= [`MAX_LADDER_LEVEL`]) of a quality ladder: the residual
    /// codes that refine the first image part in the context (the level below, same shape and
    /// tokenizer), coded with the ladder model. Image parts only (docs/PROTOCOL.md §6.3).
    Refinement {
        /// The ladder level this part carries: 2 for the first refinement of a base image.
        level: VarInt,
    },
}

/// The highest quality-ladder level a refinement part may carry (levels 2 …= 16; level 1 is the
/// base image).
pub const MAX_LADDER_LEVEL: u64 = 16;

impl CodingMode {
    /// The wire value of the mode.
    pub fn wire_value(&self) -> u8 {
        match self {
            CodingMode::Uniform => 0,
            CodingMode::Generic => 1,
            CodingMode::Masked(_) => 2,
            CodingMode::TextConditioned => 3,
            CodingMode::ImageConditioned => 4,
            CodingMode::Refinement { .. } => 5,
        }
    }
}

/// A set of grid cells. Wire value in parentheses.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[non_exhaustive]
pub enum Region {
    /// (0) One bit per cell in row-major order; cell `i` is bit `i % 8` (least significant first)
    /// of byte `i / 8`. Exactly `ceil(rows × cols / 8)` bytes; padding bits are zero.
    Bitmap(#[cfg_attr(feature = "arbitrary", arbitrary(with = arbitrary_bytes))] Bytes),
    /// (1) The union of rectangles, each inside the grid.
    Rects(Vec<Rect>),
}

/// A rectangle of grid cells: rows `top..top+height`, columns `left..left+width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Rect {
    /// First row.
    pub top: VarInt,
    /// First column.
    pub left: VarInt,
    /// Number of rows, at least 1.
    pub height: VarInt,
    /// Number of columns, at least 1.
    pub width: VarInt,
}

/// An opaque attachment (a file, a pixel fallback).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct RawPart {
    /// The media type, for example `image/png` (1 to 127 bytes).
    pub media_type: String,
}

/// A piece of a part's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct PartChunk {
    /// The index of the part this chunk belongs to (the part whose header came last).
    pub part_index: VarInt,
    /// Sequence number within the part: 0, 1, 2, …
    pub seq: VarInt,
    /// Set on the last chunk of the part.
    pub fin: bool,
    /// How many tokens the payload codes (0 for raw parts).
    pub token_count: VarInt,
    /// The entropy-coded tokens (docs/CODING.md) or, for raw parts, the attachment bytes.
    /// It runs to the end of the frame.
    #[cfg_attr(feature = "arbitrary", arbitrary(with = arbitrary_bytes))]
    pub payload: Bytes,
}

#[cfg(feature = "arbitrary")]
pub(crate) fn arbitrary_bytes(u: &mut arbitrary::Unstructured<'_>) -> arbitrary::Result<Bytes> {
    let v: Vec<u8> = u.arbitrary()?;
    Ok(Bytes::from(v))
}

fn malformed(what: &'static str, reason: &'static str) -> DecodeError {
    DecodeError::Malformed { what, reason }
}

impl Encode for PartHeader {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.index.encode(buf);
        VarInt::from(self.body.kind()).encode(buf);
        match &self.body {
            PartBody::Text(c) | PartBody::Image(c) => c.encode(buf),
            PartBody::Raw(r) => put_len_bytes(buf, r.media_type.as_bytes()),
        }
    }

    fn encoded_len(&self) -> usize {
        let body = match &self.body {
            PartBody::Text(c) | PartBody::Image(c) => c.encoded_len(),
            PartBody::Raw(r) => len_bytes_size(r.media_type.len()),
        };
        self.index
            .size()
            .saturating_add(VarInt::from(self.body.kind()).size())
            .saturating_add(body)
    }
}

impl Encode for CodedPart {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.tokenizer.encode(buf);
        self.entropy_model.encode(buf);
        self.shape.rows.encode(buf);
        self.shape.cols.encode(buf);
        self.token_count.encode(buf);
        VarInt::from(self.mode.wire_value()).encode(buf);
        if let CodingMode::Masked(region) = &self.mode {
            match region {
                Region::Bitmap(bits) => {
                    VarInt::ZERO.encode(buf);
                    put_len_bytes(buf, bits);
                }
                Region::Rects(rects) => {
                    VarInt::from_u32(1).encode(buf);
                    put_len(buf, rects.len());
                    for r in rects {
                        r.top.encode(buf);
                        r.left.encode(buf);
                        r.height.encode(buf);
                        r.width.encode(buf);
                    }
                }
            }
        }
        if let CodingMode::Refinement { level } = &self.mode {
            level.encode(buf);
        }
        put_len(buf, self.context.len());
        for r in &self.context {
            r.encode(buf);
        }
        if self.digest_on_wire() {
            buf.put_slice(&self.context_digest);
        }
    }

    fn encoded_len(&self) -> usize {
        let fixed = [
            self.tokenizer,
            self.entropy_model,
            self.shape.rows,
            self.shape.cols,
            self.token_count,
            VarInt::from(self.mode.wire_value()),
        ]
        .iter()
        .fold(0usize, |n, v| n.saturating_add(v.size()));
        let region = match &self.mode {
            CodingMode::Masked(Region::Bitmap(bits)) => VarInt::ZERO
                .size()
                .saturating_add(len_bytes_size(bits.len())),
            CodingMode::Masked(Region::Rects(rects)) => rects.iter().fold(
                VarInt::from_u32(1)
                    .size()
                    .saturating_add(len_size(rects.len())),
                |n, r| {
                    [r.top, r.left, r.height, r.width]
                        .iter()
                        .fold(n, |n, v| n.saturating_add(v.size()))
                },
            ),
            CodingMode::Refinement { level } => level.size(),
            _ => 0,
        };
        let context = self
            .context
            .iter()
            .fold(len_size(self.context.len()), |n, r| {
                n.saturating_add(r.encoded_len())
            });
        let digest = if self.digest_on_wire() {
            self.context_digest.len()
        } else {
            0
        };
        fixed
            .saturating_add(region)
            .saturating_add(context)
            .saturating_add(digest)
    }
}

/// Parses a header from a whole `PART_HEADER` payload: after an empty context, the end of `buf`
/// means the digest was left out (PROTOCOL.md §6.2), so `buf` must end where the payload does
/// ([`Frame`](crate::Frame) decoding gives it so); a header at the front of a longer buffer would
/// take the next 32 bytes as its digest.
impl Decode for PartHeader {
    fn decode<B: Buf>(buf: &mut B, limits: &Limits) -> Result<Self, DecodeError> {
        let index = read_varint(buf)?;
        let kind = read_varint(buf)?.into_inner();
        let body = match kind {
            0 => PartBody::Text(CodedPart::decode_kind(buf, limits, false)?),
            1 => PartBody::Image(CodedPart::decode_kind(buf, limits, true)?),
            2 => {
                let media_type = read_string(buf, "media type length", MAX_MEDIA_TYPE_LEN)?;
                if media_type.is_empty() {
                    return Err(malformed("media type", "empty"));
                }
                PartBody::Raw(RawPart { media_type })
            }
            other => {
                return Err(DecodeError::Unsupported {
                    what: "part kind",
                    value: other,
                })
            }
        };
        Ok(PartHeader { index, body })
    }
}

impl CodedPart {
    /// Whether the encoding carries `context_digest`: always, except for an empty context
    /// whose digest is [`EMPTY_CONTEXT_DIGEST`] (docs/PROTOCOL.md §6.2: senders omit that
    /// constant).
    pub fn digest_on_wire(&self) -> bool {
        !(self.context.is_empty() && self.context_digest == EMPTY_CONTEXT_DIGEST)
    }

    /// The largest token count a text part may announce under `limits`: what fits in the
    /// receiver's context memory at 4 bytes per token.
    pub fn max_text_tokens(limits: &Limits) -> u64 {
        limits.max_context_bytes.into_inner() / 4
    }

    fn decode_kind<B: Buf>(buf: &mut B, limits: &Limits, image: bool) -> Result<Self, DecodeError> {
        let tokenizer = read_bounded(buf, "tokenizer index", MAX_MODELS - 1)?;
        let entropy_model = read_bounded(buf, "entropy model index", MAX_MODELS - 1)?;
        let (shape, token_count) = if image {
            let rows = read_bounded(buf, "grid height", limits.max_grid_height.into_inner())?;
            let cols = read_bounded(buf, "grid width", limits.max_grid_width.into_inner())?;
            if rows == VarInt::ZERO || cols == VarInt::ZERO {
                return Err(malformed("image shape", "zero height or width"));
            }
            let cells = rows
                .into_inner()
                .checked_mul(cols.into_inner())
                .ok_or(malformed("image shape", "cell count overflows"))?;
            let token_count = read_bounded(buf, "image token count", cells)?;
            (Shape { rows, cols }, token_count)
        } else {
            let rows = read_varint(buf)?;
            if rows.into_inner() != 1 {
                return Err(malformed("text shape", "rows must be 1"));
            }
            let max = Self::max_text_tokens(limits);
            let cols = read_bounded(buf, "text token count", max)?;
            let token_count = read_bounded(buf, "text token count", max)?;
            if token_count != cols {
                return Err(malformed("text shape", "token count differs from columns"));
            }
            (Shape { rows, cols }, token_count)
        };
        let cells = shape
            .rows
            .into_inner()
            .saturating_mul(shape.cols.into_inner());
        let mode = match read_varint(buf)?.into_inner() {
            0 => CodingMode::Uniform,
            1 => CodingMode::Generic,
            2 => {
                if !image {
                    return Err(malformed("coding mode", "masked mode on a text part"));
                }
                CodingMode::Masked(decode_region(buf, shape, token_count)?)
            }
            3 => CodingMode::TextConditioned,
            4 => CodingMode::ImageConditioned,
            5 => {
                if !image {
                    return Err(malformed("coding mode", "refinement mode on a text part"));
                }
                let level = read_varint(buf)?;
                if !(2..=MAX_LADDER_LEVEL).contains(&level.into_inner()) {
                    return Err(malformed("refinement level", "outside 2 ..= 16"));
                }
                CodingMode::Refinement { level }
            }
            other => {
                return Err(DecodeError::Unsupported {
                    what: "coding mode",
                    value: other,
                })
            }
        };
        if image && !matches!(mode, CodingMode::Masked(_)) && token_count.into_inner() != cells {
            return Err(malformed(
                "image token count",
                "differs from height × width outside masked mode",
            ));
        }
        // Each reference takes at least 2 bytes.
        let n = read_count(buf, "context reference count", MAX_CONTEXT_REFS, 2)?;
        let mut context = Vec::with_capacity(n);
        for _ in 0..n {
            context.push(ContextRef::decode(buf, limits)?);
        }
        // With an empty context the digest may be left out (it is then the constant of the
        // empty context): the end of the payload says which, since it is the header's last
        // field.
        let context_digest = if context.is_empty() && !buf.has_remaining() {
            EMPTY_CONTEXT_DIGEST
        } else {
            read_hash(buf)?
        };
        Ok(CodedPart {
            tokenizer,
            entropy_model,
            shape,
            token_count,
            mode,
            context,
            context_digest,
        })
    }
}

fn decode_region<B: Buf>(
    buf: &mut B,
    shape: Shape,
    token_count: VarInt,
) -> Result<Region, DecodeError> {
    let rows = shape.rows.into_inner();
    let cols = shape.cols.into_inner();
    match read_varint(buf)?.into_inner() {
        0 => {
            // rows and cols are bounded by the grid limits, but those may be large: compute the
            // bitmap size with checked arithmetic before comparing it with what arrives.
            let cells = rows
                .checked_mul(cols)
                .ok_or(malformed("image shape", "cell count overflows"))?;
            let expected = cells.div_ceil(8);
            let bits = read_len_bytes(buf, "region bitmap length", expected)?;
            if bits.len() as u64 != expected {
                return Err(malformed(
                    "region bitmap",
                    "length is not ceil(rows × cols / 8)",
                ));
            }
            // 0..=7 padding bits at the top of the last byte.
            let pad = expected.saturating_mul(8).saturating_sub(cells);
            if pad > 0 {
                if let Some(last) = bits.last() {
                    if last
                        .checked_shr(8u32.saturating_sub(pad as u32))
                        .unwrap_or(0)
                        != 0
                    {
                        return Err(malformed("region bitmap", "padding bits are not zero"));
                    }
                }
            }
            let set: u64 = bits.iter().map(|b| u64::from(b.count_ones())).sum();
            if set != token_count.into_inner() {
                return Err(malformed(
                    "image token count",
                    "differs from the number of cells in the bitmap",
                ));
            }
            Ok(Region::Bitmap(bits))
        }
        1 => {
            // Each rectangle takes at least 4 bytes.
            let n = read_count(buf, "region rectangle count", MAX_RECTS, 4)?;
            if n == 0 {
                return Err(malformed("region", "no rectangles"));
            }
            let mut rects = Vec::with_capacity(n);
            for _ in 0..n {
                let r = Rect {
                    top: read_varint(buf)?,
                    left: read_varint(buf)?,
                    height: read_varint(buf)?,
                    width: read_varint(buf)?,
                };
                if r.height == VarInt::ZERO || r.width == VarInt::ZERO {
                    return Err(malformed("region rectangle", "empty"));
                }
                let bottom = r.top.into_inner().checked_add(r.height.into_inner());
                let right = r.left.into_inner().checked_add(r.width.into_inner());
                match (bottom, right) {
                    (Some(b), Some(rt)) if b <= rows && rt <= cols => {}
                    _ => return Err(malformed("region rectangle", "outside the grid")),
                }
                rects.push(r);
            }
            Ok(Region::Rects(rects))
        }
        other => Err(DecodeError::Unsupported {
            what: "region kind",
            value: other,
        }),
    }
}

impl Encode for PartChunk {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.encode_head(buf);
        buf.put_slice(&self.payload);
    }

    fn encoded_len(&self) -> usize {
        self.head_len().saturating_add(self.payload.len())
    }
}

impl PartChunk {
    /// Encodes every field but the payload (the payload follows to the end of the frame).
    pub(crate) fn encode_head<B: BufMut>(&self, buf: &mut B) {
        self.part_index.encode(buf);
        self.seq.encode(buf);
        buf.put_u8(u8::from(self.fin));
        self.token_count.encode(buf);
    }

    /// The size of what [`encode_head`](Self::encode_head) writes.
    fn head_len(&self) -> usize {
        self.part_index
            .size()
            .saturating_add(self.seq.size())
            .saturating_add(1)
            .saturating_add(self.token_count.size())
    }

    /// Decodes a chunk whose payload is everything left in `buf` (a frame payload).
    pub(crate) fn decode_rest(buf: &mut Bytes, limits: &Limits) -> Result<Self, DecodeError> {
        let part_index = read_varint(buf)?;
        let seq = read_varint(buf)?;
        need(buf, 1)?;
        let flags = buf.get_u8();
        if flags & !1 != 0 {
            return Err(malformed("chunk flags", "reserved bits set"));
        }
        let limit = limits
            .max_grid_height
            .into_inner()
            .saturating_mul(limits.max_grid_width.into_inner())
            .max(CodedPart::max_text_tokens(limits));
        let token_count = read_bounded(buf, "chunk token count", limit)?;
        let payload = buf.split_off(0);
        Ok(PartChunk {
            part_index,
            seq,
            fin: flags & 1 == 1,
            token_count,
            payload,
        })
    }
}
