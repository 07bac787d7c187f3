//! [`TokenGrid`]: an image as a 2-D grid of codebook indices.

use thiserror::Error;

/// Largest codebook an entropy model can address (alphabet of at most 2^16 symbols).
pub const MAX_CODEBOOK: u32 = 1 << 16;

/// An image as a `height × width` grid of codebook indices, each `< codebook_size`, row-major.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenGrid {
    height: u32,
    width: u32,
    codebook_size: u32,
    ids: Vec<u32>,
}

/// Why a [`TokenGrid`] could not be built.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GridError {
    /// `ids.len()` is not `height * width`.
    #[error("grid {height}x{width} needs {expected} ids, got {got}")]
    WrongLength {
        /// Rows.
        height: u32,
        /// Columns.
        width: u32,
        /// `height * width`.
        expected: u64,
        /// Ids supplied.
        got: usize,
    },
    /// A dimension is zero.
    #[error("grid dimensions must be non-zero, got {height}x{width}")]
    Empty {
        /// Rows.
        height: u32,
        /// Columns.
        width: u32,
    },
    /// The codebook size is 0 or above [`MAX_CODEBOOK`].
    #[error("codebook size {0} is outside 1..={MAX_CODEBOOK}")]
    BadCodebook(u32),
    /// An id is not below the codebook size.
    #[error("id {id} at index {index} is not below the codebook size {codebook_size}")]
    IdOutOfRange {
        /// Position in row-major order.
        index: usize,
        /// The offending id.
        id: u32,
        /// The codebook size.
        codebook_size: u32,
    },
}

impl TokenGrid {
    /// Builds a grid, checking shape and that every id is below `codebook_size`.
    ///
    /// ```
    /// use unimic_codec::grid::TokenGrid;
    /// let g = TokenGrid::new(2, 3, 1024, vec![0, 1, 2, 3, 4, 1023]).unwrap();
    /// assert_eq!(g.get(1, 2), 1023);
    /// assert!(TokenGrid::new(2, 3, 1024, vec![0; 5]).is_err());
    /// ```
    pub fn new(
        height: u32,
        width: u32,
        codebook_size: u32,
        ids: Vec<u32>,
    ) -> Result<Self, GridError> {
        if height == 0 || width == 0 {
            return Err(GridError::Empty { height, width });
        }
        if codebook_size == 0 || codebook_size > MAX_CODEBOOK {
            return Err(GridError::BadCodebook(codebook_size));
        }
        let expected = u64::from(height) * u64::from(width);
        if ids.len() as u64 != expected {
            return Err(GridError::WrongLength {
                height,
                width,
                expected,
                got: ids.len(),
            });
        }
        if let Some((index, &id)) = ids.iter().enumerate().find(|(_, &id)| id >= codebook_size) {
            return Err(GridError::IdOutOfRange {
                index,
                id,
                codebook_size,
            });
        }
        Ok(Self {
            height,
            width,
            codebook_size,
            ids,
        })
    }

    /// Rows.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// Columns.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Number of codebook entries; every id is below it.
    pub fn codebook_size(&self) -> u32 {
        self.codebook_size
    }

    /// The ids, row-major.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Consumes the grid, returning its ids (row-major).
    pub fn into_ids(self) -> Vec<u32> {
        self.ids
    }

    /// Number of tokens (`height * width`).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Always false: grids have at least one token. Present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The id at (`row`, `col`).
    ///
    /// # Panics
    /// If the position is outside the grid.
    pub fn get(&self, row: u32, col: u32) -> u32 {
        assert!(
            row < self.height && col < self.width,
            "position outside the grid"
        );
        self.ids[(row as usize) * (self.width as usize) + col as usize]
    }
}

/// The ids of an edit: `base` (row-major) with the cells where `region` is `true` taken, in
/// row-major order, from `cells`; the other cells keep `base`'s ids. The result is as long as the
/// shorter of `base` and `region` (a prefix of rows gives the edit's rows so far), and region
/// cells past the end of `cells` keep `base`'s ids too (an edit still arriving).
///
/// ```
/// use unimic_codec::grid::fill_region;
/// let base = [1, 2, 3, 4];
/// let region = [false, true, false, true];
/// assert_eq!(fill_region(&base, &region, &[7, 9]), vec![1, 7, 3, 9]);
/// assert_eq!(fill_region(&base, &region, &[7]), vec![1, 7, 3, 4]);
/// assert_eq!(fill_region(&base[..2], &region, &[7, 9]), vec![1, 7]);
/// ```
pub fn fill_region(base: &[u32], region: &[bool], cells: &[u32]) -> Vec<u32> {
    let mut cells = cells.iter();
    base.iter()
        .zip(region)
        .map(|(&b, &r)| {
            if r {
                cells.next().copied().unwrap_or(b)
            } else {
                b
            }
        })
        .collect()
}

/// Magic bytes that start a token-grid file.
pub const GRID_FILE_MAGIC: &[u8; 4] = b"UMTG";
/// The token-grid file version this crate writes.
pub const GRID_FILE_VERSION: u16 = 1;
/// Size of a token-grid file header in bytes.
pub const GRID_FILE_HEADER: usize = 22;

/// Why a token-grid file could not be read or written.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GridFileError {
    /// The file does not start with `UMTG` or has an unknown version.
    #[error("not a token-grid file (magic UMTG, version 1)")]
    BadHeader,
    /// The header is inconsistent (zero dimension, bad codebook, or a size over the limit).
    #[error("token-grid file header is invalid: {0}")]
    BadShape(GridError),
    /// The file length does not match the header.
    #[error("token-grid file has {got} bytes, its header implies {expected}")]
    BadLength {
        /// Bytes implied by the header.
        expected: u64,
        /// Bytes present.
        got: usize,
    },
    /// The header implies more tokens than the caller allows.
    #[error("token-grid file holds {tokens} tokens, above the limit of {limit}")]
    TooLarge {
        /// Tokens implied by the header.
        tokens: u64,
        /// The caller's limit.
        limit: u64,
    },
    /// Grids written together must share height, width and codebook size.
    #[error("grids in one file must share height, width and codebook size")]
    Mixed,
}

/// Writes grids as one token-grid file (a dataset written once, benchmarked many times).
///
/// Format (little-endian): `"UMTG"` (4 bytes), version `u16` (= 1), height `u32`, width `u32`,
/// codebook size `K` `u32` (`1..=65536`), grid count `u32`; then for each grid its `height *
/// width` ids in row-major order, each as `u16` (every id is below `K <= 65536`). All grids of a
/// file share the header's shape. An empty list writes a header with zero shape and count.
///
/// ```
/// use unimic_codec::grid::{read_grid_file, write_grid_file, TokenGrid};
/// let g = TokenGrid::new(2, 2, 16384, vec![0, 1, 16383, 7]).unwrap();
/// let bytes = write_grid_file(&[g.clone(), g.clone()]).unwrap();
/// assert_eq!(bytes.len(), 22 + 2 * 4 * 2);
/// assert_eq!(read_grid_file(&bytes, 1 << 20).unwrap(), vec![g.clone(), g]);
/// ```
pub fn write_grid_file(grids: &[TokenGrid]) -> Result<Vec<u8>, GridFileError> {
    let (h, w, k) = grids
        .first()
        .map_or((0, 0, 0), |g| (g.height, g.width, g.codebook_size));
    if grids
        .iter()
        .any(|g| (g.height, g.width, g.codebook_size) != (h, w, k))
    {
        return Err(GridFileError::Mixed);
    }
    let tokens: usize = grids.iter().map(TokenGrid::len).sum();
    let mut out = Vec::with_capacity(GRID_FILE_HEADER + 2 * tokens);
    out.extend_from_slice(GRID_FILE_MAGIC);
    out.extend_from_slice(&GRID_FILE_VERSION.to_le_bytes());
    for v in [h, w, k, grids.len() as u32] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for g in grids {
        for &id in &g.ids {
            // id < K <= 65536, so it fits 16 bits.
            out.extend_from_slice(&(id as u16).to_le_bytes());
        }
    }
    Ok(out)
}

/// Reads a token-grid file written by [`write_grid_file`], refusing files that hold more than
/// `max_tokens` tokens before allocating for them.
pub fn read_grid_file(bytes: &[u8], max_tokens: u64) -> Result<Vec<TokenGrid>, GridFileError> {
    if bytes.len() < GRID_FILE_HEADER || &bytes[..4] != GRID_FILE_MAGIC {
        return Err(GridFileError::BadHeader);
    }
    if u16::from_le_bytes([bytes[4], bytes[5]]) != GRID_FILE_VERSION {
        return Err(GridFileError::BadHeader);
    }
    let word = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let (h, w, k, count) = (word(6), word(10), word(14), word(18));
    if count == 0 {
        return if bytes.len() == GRID_FILE_HEADER {
            Ok(Vec::new())
        } else {
            Err(GridFileError::BadLength {
                expected: GRID_FILE_HEADER as u64,
                got: bytes.len(),
            })
        };
    }
    if h == 0 || w == 0 {
        return Err(GridFileError::BadShape(GridError::Empty {
            height: h,
            width: w,
        }));
    }
    if k == 0 || k > MAX_CODEBOOK {
        return Err(GridFileError::BadShape(GridError::BadCodebook(k)));
    }
    let per_grid = u64::from(h) * u64::from(w);
    let tokens = per_grid * u64::from(count);
    if tokens > max_tokens {
        return Err(GridFileError::TooLarge {
            tokens,
            limit: max_tokens,
        });
    }
    let expected = GRID_FILE_HEADER as u64 + 2 * tokens;
    if bytes.len() as u64 != expected {
        return Err(GridFileError::BadLength {
            expected,
            got: bytes.len(),
        });
    }
    bytes[GRID_FILE_HEADER..]
        .chunks_exact(2 * per_grid as usize)
        .map(|chunk| {
            let ids = chunk
                .chunks_exact(2)
                .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]])))
                .collect();
            TokenGrid::new(h, w, k, ids).map_err(GridFileError::BadShape)
        })
        .collect()
}
