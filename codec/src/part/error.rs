//! Why a part could not be coded or decoded.

use super::*;

/// Why a part could not be coded.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum PartError {
    /// Context reference missing or digest mismatch (refused before decoding).
    #[error(transparent)]
    Context(#[from] ContextError),
    /// The range coder or model failed (a corrupt payload when decoding).
    #[error(transparent)]
    Code(#[from] CodeError),
    /// This codec has no such model for this kind of part (e.g. no static model configured).
    #[error("model {model:?} is not available for {kind:?} parts")]
    ModelUnavailable {
        /// Requested model.
        model: ModelChoice,
        /// Kind of part.
        kind: SequenceKind,
    },
    /// The sender's model identity differs from ours.
    #[error("model identity mismatch: the part names {theirs:?}, we hold {ours:?}")]
    ModelMismatch {
        /// The identity in the part.
        theirs: ModelIdentity,
        /// Our identity for the same choice.
        ours: ModelIdentity,
    },
    /// The part exceeds this codec's token limit.
    #[error("part of {tokens} tokens exceeds the limit of {limit}")]
    TooLarge {
        /// Tokens in the part.
        tokens: u64,
        /// The limit.
        limit: u64,
    },
    /// A chunk index beyond the part.
    #[error("chunk {index} does not exist (the part has {chunks} chunks)")]
    NoSuchChunk {
        /// The index asked for.
        index: u64,
        /// Number of chunks.
        chunks: u64,
    },
    /// Decoded ids do not form a valid grid.
    #[error(transparent)]
    Grid(#[from] GridError),
    /// A chunk of a transformer part came before the chunks it follows: each one continues the
    /// model's run over the part, so they decode in order.
    #[error("chunk {got} of a transformer part decoded before chunk {expected}")]
    ChunkOrder {
        /// The chunk due next.
        expected: u64,
        /// The chunk given.
        got: u64,
    },
    /// A transformer model refused the part or the payload (shape beyond its position tables,
    /// codebook mismatch, corrupt payload).
    #[error("transformer model: {0}")]
    Transformer(String),
    /// A text id is not below the id space.
    #[error("text id {id} is not below the id space {space}")]
    TextId {
        /// The id.
        id: u32,
        /// The id space.
        space: u32,
    },
    /// The spec has a region, and the model is not the masked model.
    #[error("model {model:?} codes whole grids, not a region")]
    RegionNotAllowed {
        /// The model.
        model: ModelChoice,
    },
    /// The masked model needs a region, and the spec has none.
    #[error("the masked model needs a region")]
    RegionRequired,
    /// The region does not have one entry per grid cell.
    #[error("region of {cells} cells for a grid of {expected}")]
    RegionSize {
        /// Entries in the region.
        cells: u64,
        /// Cells in the grid.
        expected: u64,
    },
    /// The model conditions on a part of this kind, and the references hold none.
    #[error("model {model:?} needs a {kind:?} part among the references")]
    MissingReference {
        /// The model.
        model: ModelChoice,
        /// The kind of part it needs.
        kind: SequenceKind,
    },
    /// The reference image of a masked part does not fit the part (other shape, ids beyond the
    /// codebook, or a refinement level rather than an image).
    #[error("reference {key:?} ({rows}x{cols}) does not fit a {height}x{width} grid of codebook {codebook_size}")]
    ReferenceShape {
        /// The reference.
        key: ContextKey,
        /// Its rows.
        rows: u32,
        /// Its columns.
        cols: u32,
        /// The part's height.
        height: u32,
        /// The part's width.
        width: u32,
        /// The part's codebook size.
        codebook_size: u32,
    },
    /// A masked part's grid differs from its reference image outside the region (the receiver
    /// would decode another grid).
    #[error("the grid differs from the reference at cell {cell}, outside the region")]
    OutsideRegion {
        /// The first differing cell (row-major).
        cell: u64,
    },
    /// The spec has a ladder level, and the model is not the ladder model.
    #[error("model {model:?} does not code ladder levels")]
    LevelNotAllowed {
        /// The model.
        model: ModelChoice,
    },
    /// A ladder part without a level, or with one the ladder has no model for.
    #[error("ladder level {level:?}: the ladder codes levels 2 ..= {top}")]
    Level {
        /// The level asked for.
        level: Option<u32>,
        /// The highest level the ladder codes.
        top: u32,
    },
    /// The image a ladder part refines is not the level below it: another shape, or another
    /// level than `level - 1`.
    #[error("reference {key:?} (level {base_level}, {rows}x{cols}) is not the level below a level-{level} {height}x{width} refinement")]
    LadderBase {
        /// The reference.
        key: ContextKey,
        /// Its level.
        base_level: u32,
        /// Its rows.
        rows: u32,
        /// Its columns.
        cols: u32,
        /// The part's level.
        level: u32,
        /// The part's height.
        height: u32,
        /// The part's width.
        width: u32,
    },
    /// Decoded tokens handed to [`PartDecoder::assemble`] are not as many as the part codes.
    #[error("{got} decoded tokens for a part that codes {expected}")]
    TokenCount {
        /// Tokens given.
        got: u64,
        /// Tokens the part codes.
        expected: u64,
    },
}
