//! Tensor data of a GGUF file: memory-mapped, bounds-checked once when the file is opened, then
//! handed out as raw quantized bytes ([`RawTensor`]) or dequantized to f32.
//!
//! Every tensor's extent is validated up front (known type, whole blocks, aligned offset, inside
//! the file), so a truncated or corrupt file fails at open with an error naming the file and the
//! tensor, and every later access is a plain slice that cannot go out of bounds.

use std::collections::HashMap;
use std::ops::{Deref, Range};
use std::path::Path;

use super::ggml::{self, GgmlType};
use crate::error::KvqError;
use crate::model_spec::gguf::{GgufFile, GgufTensorInfo, GgufValue};

/// The bytes behind a [`GgufTensors`]: a read-only map of the file, or a buffer (tests, embedded).
enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file together with its tensor data.
pub struct GgufTensors {
    gguf: GgufFile,
    storage: Storage,
    origin: String,
    /// Per tensor (same order as `gguf.tensors`): its type and absolute byte range in `storage`.
    extents: Vec<(GgmlType, Range<usize>)>,
    by_name: HashMap<String, usize>,
}

/// One tensor's bytes exactly as stored, with what is needed to interpret them.
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    pub name: &'a str,
    pub ggml_type: GgmlType,
    /// Dimensions, innermost (contiguous) first, as GGUF stores them.
    pub dims: &'a [u64],
    pub data: &'a [u8],
    origin: &'a str,
}

impl<'a> RawTensor<'a> {
    pub fn num_elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    /// Elements in one row (the innermost dimension).
    pub fn row_len(&self) -> usize {
        self.dims[0] as usize
    }

    pub fn num_rows(&self) -> usize {
        self.num_elements() / self.row_len().max(1)
    }

    /// The stored bytes of row `i` (rows are whole blocks: checked at open).
    pub fn row(&self, i: usize) -> Option<&'a [u8]> {
        let bytes = self.data.len() / self.num_rows().max(1);
        self.data.get(i * bytes..(i + 1) * bytes)
    }

    /// Dequantizes the whole tensor to f32, in storage order.
    pub fn to_f32(&self) -> Result<Vec<f32>, KvqError> {
        let mut out = vec![0.0; self.num_elements()];
        self.dequantize_into(&mut out)?;
        Ok(out)
    }

    /// Dequantizes the whole tensor into `out`, which must hold [`Self::num_elements`] values.
    pub fn dequantize_into(&self, out: &mut [f32]) -> Result<(), KvqError> {
        if !self.ggml_type.can_dequantize() {
            return Err(KvqError::Model {
                path: self.origin.to_string(),
                reason: format!(
                    "tensor `{}` has ggml type {}, which kvq cannot dequantize yet",
                    self.name, self.ggml_type
                ),
            });
        }
        ggml::dequantize(self.ggml_type, self.data, out)
    }
}

impl GgufTensors {
    /// Parses and memory-maps `path`, validating every tensor's extent.
    pub fn open(path: &Path) -> Result<Self, KvqError> {
        let gguf = GgufFile::open(path)?;
        let origin = path.display().to_string();
        let io = |source| KvqError::Io {
            path: origin.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process. Like every mmap-based model
        // loader we rely on the file not being truncated or rewritten while it is mapped; its size
        // is re-checked against the parsed header below, and every slice is bounds-checked.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        if map.len() as u64 != gguf.file_size {
            return Err(KvqError::Model {
                path: origin,
                reason: format!(
                    "file changed while opening ({} bytes, then {})",
                    gguf.file_size,
                    map.len()
                ),
            });
        }
        Self::new(gguf, Storage::Mapped(map), origin)
    }

    /// Parses a GGUF held in memory.
    pub fn from_bytes(bytes: Vec<u8>, origin: &str) -> Result<Self, KvqError> {
        let gguf = GgufFile::from_bytes(&bytes, origin)?;
        Self::new(gguf, Storage::Owned(bytes), origin.to_string())
    }

    fn new(gguf: GgufFile, storage: Storage, origin: String) -> Result<Self, KvqError> {
        let alignment = gguf
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .unwrap_or(32);
        let mut extents = Vec::with_capacity(gguf.tensors.len());
        let mut by_name = HashMap::with_capacity(gguf.tensors.len());
        for (i, t) in gguf.tensors.iter().enumerate() {
            let extent =
                extent(t, gguf.data_offset, alignment, storage.len() as u64).map_err(|reason| {
                    KvqError::Model {
                        path: origin.clone(),
                        reason: format!("tensor `{}`: {reason}", t.name),
                    }
                })?;
            extents.push(extent);
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(KvqError::Model {
                    path: origin,
                    reason: format!("tensor `{}` appears twice in the tensor directory", t.name),
                });
            }
        }
        Ok(Self {
            gguf,
            storage,
            origin,
            extents,
            by_name,
        })
    }

    /// The parsed header, metadata and tensor directory.
    pub fn gguf(&self) -> &GgufFile {
        &self.gguf
    }

    /// The file path (or in-memory origin) used in error messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Tensor names in directory order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.gguf.tensors.iter().map(|t| t.name.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The stored bytes of tensor `name`, for a fast path that consumes quantized weights as they are.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>, KvqError> {
        let &i = self.by_name.get(name).ok_or_else(|| KvqError::Model {
            path: self.origin.clone(),
            reason: format!("tensor `{name}` is missing"),
        })?;
        let (ggml_type, range) = &self.extents[i];
        let info = &self.gguf.tensors[i];
        Ok(RawTensor {
            name: &info.name,
            ggml_type: *ggml_type,
            dims: &info.dims,
            data: &self.storage[range.clone()],
            origin: &self.origin,
        })
    }

    /// Tensor `name` dequantized to f32, in storage order (innermost dimension contiguous).
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>, KvqError> {
        self.raw(name)?.to_f32()
    }
}

/// Checks one directory entry and returns its type and absolute byte range.
fn extent(
    t: &GgufTensorInfo,
    data_offset: u64,
    alignment: u64,
    file_len: u64,
) -> Result<(GgmlType, Range<usize>), String> {
    let ty = GgmlType::from_id(t.ggml_type)
        .ok_or_else(|| format!("unknown or unsupported ggml type {}", t.ggml_type))?;
    let n = t
        .dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("dimensions {:?} overflow", t.dims))?;
    if t.dims[0] % ty.block_elems() != 0 {
        return Err(format!(
            "row length {} is not a multiple of the {} block size {}",
            t.dims[0],
            ty.name(),
            ty.block_elems()
        ));
    }
    let len = ty
        .bytes_for(n)
        .ok_or_else(|| format!("dimensions {:?} overflow", t.dims))?;
    if t.offset % alignment != 0 {
        return Err(format!(
            "data offset {} is not aligned to {alignment}",
            t.offset
        ));
    }
    let start = data_offset
        .checked_add(t.offset)
        .ok_or_else(|| format!("data offset {} overflows", t.offset))?;
    let end = start
        .checked_add(len)
        .ok_or_else(|| format!("data offset {} overflows", t.offset))?;
    if end > file_len {
        return Err(format!(
            "truncated or corrupt GGUF: data spans bytes {start}..{end} ({len} bytes of {}) but the file has {file_len}",
            ty.name()
        ));
    }
    Ok((ty, start as usize..end as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_spec::gguf::writer::header;
    use half::f16;

    /// A GGUF with an F32 tensor `a` [4], a Q8_0 tensor `b` [32, 2] and an F16 tensor `c` [2].
    fn small_file() -> Vec<u8> {
        let meta = [("general.architecture", GgufValue::String("llama".into()))];
        let tensors = [
            ("a", vec![4], 0, 0),
            ("b", vec![32, 2], 8, 32),
            ("c", vec![2], 1, 128),
        ];
        let mut bytes = header(&meta, &tensors);
        let mut data = vec![0u8; 132];
        for (i, x) in [1.0f32, -2.0, 3.5, 0.0].iter().enumerate() {
            data[i * 4..i * 4 + 4].copy_from_slice(&x.to_le_bytes());
        }
        for (row, d) in [(0usize, 0.5f32), (1, -1.0)] {
            let at = 32 + row * 34;
            data[at..at + 2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            for j in 0..32 {
                data[at + 2 + j] = (j as i8 - 16) as u8;
            }
        }
        data[128..130].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        data[130..132].copy_from_slice(&f16::from_f32(-8.0).to_le_bytes());
        bytes.extend(data);
        bytes
    }

    #[test]
    fn reads_and_dequantizes() {
        let t = GgufTensors::from_bytes(small_file(), "small.gguf").unwrap();
        assert_eq!(t.names().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(t.to_f32("a").unwrap(), vec![1.0, -2.0, 3.5, 0.0]);
        let b = t.raw("b").unwrap();
        assert_eq!(
            (b.ggml_type, b.data.len(), b.num_rows(), b.row_len()),
            (GgmlType::Q8_0, 68, 2, 32)
        );
        assert_eq!(b.row(1).unwrap().len(), 34);
        assert!(b.row(2).is_none());
        let v = b.to_f32().unwrap();
        assert_eq!(v[0], -8.0);
        assert_eq!(v[31], 7.5);
        assert_eq!(v[32], 16.0);
        assert_eq!(t.to_f32("c").unwrap(), vec![0.25, -8.0]);
        let err = t.to_f32("nope").unwrap_err().to_string();
        assert!(
            err.contains("small.gguf") && err.contains("`nope` is missing"),
            "{err}"
        );
    }

    #[test]
    fn every_truncation_of_the_data_names_file_and_tensor() {
        let bytes = small_file();
        let data_start = GgufFile::from_bytes(&bytes, "x").unwrap().data_offset as usize;
        for cut in data_start..bytes.len() {
            let err = GgufTensors::from_bytes(bytes[..cut].to_vec(), "cut.gguf")
                .err()
                .unwrap()
                .to_string();
            assert!(
                err.contains("cut.gguf") && err.contains("truncated"),
                "cut {cut}: {err}"
            );
            let expected = if cut < data_start + 4 * 4 {
                "`a`"
            } else if cut < data_start + 32 + 68 {
                "`b`"
            } else {
                "`c`"
            };
            assert!(err.contains(expected), "cut {cut}: {err}");
        }
    }

    #[test]
    fn truncated_file_on_disk_is_an_error_not_a_panic() {
        let dir = std::env::temp_dir().join(format!("kvq-gguf-tensors-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("truncated.gguf");
        let bytes = small_file();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let err = GgufTensors::open(&path).err().unwrap().to_string();
        std::fs::write(&path, &bytes).unwrap();
        let ok = GgufTensors::open(&path).map(|t| t.to_f32("c").unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            err.contains("truncated.gguf") && err.contains("tensor `c`"),
            "{err}"
        );
        assert_eq!(ok.unwrap(), vec![0.25, -8.0]);
    }

    #[test]
    fn corrupt_directory_entries_are_named() {
        let meta = [("general.architecture", GgufValue::String("llama".into()))];
        type Entry = (&'static str, Vec<u64>, u32, u64);
        let cases: [(&str, Entry); 4] = [
            (
                "unknown or unsupported ggml type 99",
                ("w", vec![32], 99, 0),
            ),
            (
                "not a multiple of the Q4_0 block size 32",
                ("w", vec![31], 2, 0),
            ),
            ("not aligned to 32", ("w", vec![4], 0, 4)),
            ("overflow", ("w", vec![u64::MAX, 2], 0, 0)),
        ];
        for (expected, tensor) in cases {
            let mut bytes = header(&meta, &[tensor]);
            bytes.extend([0u8; 64]);
            let err = GgufTensors::from_bytes(bytes, "bad.gguf")
                .err()
                .unwrap()
                .to_string();
            assert!(
                err.contains("bad.gguf") && err.contains("tensor `w`") && err.contains(expected),
                "{err}"
            );
        }
        let mut dup = header(&meta, &[("w", vec![4], 0, 0), ("w", vec![4], 0, 32)]);
        dup.extend([0u8; 64]);
        let err = GgufTensors::from_bytes(dup, "dup.gguf")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("appears twice"), "{err}");
    }

    #[test]
    fn types_kvq_cannot_dequantize_still_give_raw_bytes() {
        let meta = [("general.architecture", GgufValue::String("llama".into()))];
        let mut bytes = header(&meta, &[("k", vec![256], 14, 0)]);
        bytes.extend([0u8; 210]);
        let t = GgufTensors::from_bytes(bytes, "k.gguf").unwrap();
        assert_eq!(t.raw("k").unwrap().data.len(), 210);
        let err = t.to_f32("k").unwrap_err().to_string();
        assert!(err.contains("k.gguf") && err.contains("Q6_K (14)"), "{err}");
    }
}
