//! GGUF (v2/v3) container parsing: header, metadata and tensor directory. Tensor data is not
//! read here; [`GgufFile::data_offset`] says where it starts. Every length read from the file is
//! checked against the file's size first, so a corrupt or truncated file gives an error that
//! names the file and what is wrong instead of a huge allocation or a panic.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use super::{AttentionKind, ModelSpec};
use crate::dtype::KvDtype;
use crate::error::KvqError;

const MAGIC: &[u8; 4] = b"GGUF";

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            GgufValue::F32(v) => Some(v),
            GgufValue::F64(v) => Some(v as f32),
            _ => self.as_u64().map(|v| v as f32),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions, innermost (contiguous) first, as GGUF stores them.
    pub dims: Vec<u64>,
    /// ggml type id (0 = F32, 1 = F16, 2 = Q4_0, 3 = Q4_1, 8 = Q8_0, …).
    pub ggml_type: u32,
    /// Offset from [`GgufFile::data_offset`].
    pub offset: u64,
}

impl GgufTensorInfo {
    pub fn num_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// Parsed header of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    /// Absolute file offset of the tensor data section.
    pub data_offset: u64,
    pub file_size: u64,
}

struct Reader<R> {
    inner: R,
    pos: u64,
    size: u64,
    path: String,
}

impl<R: Read> Reader<R> {
    fn err(&self, reason: impl Into<String>) -> KvqError {
        KvqError::Model {
            path: self.path.clone(),
            reason: format!("{} (at byte {})", reason.into(), self.pos),
        }
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>, KvqError> {
        if n > self.size.saturating_sub(self.pos) {
            return Err(self.err(format!(
                "truncated or corrupt GGUF: {what} needs {n} bytes but only {} remain",
                self.size.saturating_sub(self.pos)
            )));
        }
        let mut buf = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| self.err(format!("read failed in {what}: {e}")))?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], KvqError> {
        let v = self.bytes(N as u64, what)?;
        Ok(v.try_into().expect("length checked"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, KvqError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, KvqError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, KvqError> {
        let len = self.u64(what)?;
        let raw = self.bytes(len, what)?;
        String::from_utf8(raw).map_err(|_| self.err(format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue, KvqError> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(key)?[0]),
            1 => GgufValue::I8(self.array::<1>(key)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => GgufValue::Bool(self.array::<1>(key)?[0] != 0),
            8 => GgufValue::String(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(self.err(format!("metadata `{key}`: arrays nested too deep")));
                }
                let elem_ty = self.u32(key)?;
                let count = self.u64(key)?;
                // Every element takes at least one byte: a larger count is corruption.
                if count > self.size.saturating_sub(self.pos) {
                    return Err(self.err(format!(
                        "truncated or corrupt GGUF: metadata `{key}` claims {count} elements"
                    )));
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(self.err(format!("metadata `{key}` has unknown type {other}"))),
        })
    }
}

impl GgufFile {
    /// Reads the header, metadata and tensor directory of `path`.
    pub fn open(path: &Path) -> Result<Self, KvqError> {
        let file = std::fs::File::open(path).map_err(|source| KvqError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let size = file
            .metadata()
            .map_err(|source| KvqError::Io {
                path: path.display().to_string(),
                source,
            })?
            .len();
        Self::read(BufReader::new(file), size, &path.display().to_string())
    }

    /// Parses a GGUF held in memory (tests, embedded models).
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self, KvqError> {
        Self::read(std::io::Cursor::new(bytes), bytes.len() as u64, origin)
    }

    fn read<R: Read + Seek>(inner: R, size: u64, path: &str) -> Result<Self, KvqError> {
        let mut r = Reader {
            inner,
            pos: 0,
            size,
            path: path.to_string(),
        };
        let magic: [u8; 4] = r.array("magic")?;
        if &magic != MAGIC {
            return Err(r.err(format!(
                "not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"
            )));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(r.err(format!(
                "GGUF version {version} is not supported (2 and 3 are)"
            )));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        if n_tensors > size || n_kv > size {
            return Err(r.err(format!(
                "corrupt GGUF header: {n_tensors} tensors, {n_kv} metadata entries"
            )));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32(&key)?;
            let value = r.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32(&name)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(r.err(format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let dims = (0..n_dims)
                .map(|_| r.u64(&name))
                .collect::<Result<Vec<_>, _>>()?;
            let ggml_type = r.u32(&name)?;
            let offset = r.u64(&name)?;
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .unwrap_or(32);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(r.err(format!(
                "general.alignment {alignment} is not a power of two"
            )));
        }
        let data_offset = r.pos.div_ceil(alignment) * alignment;
        Ok(Self {
            version,
            metadata,
            tensors,
            data_offset,
            file_size: size,
        })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(GgufValue::as_str)
    }
}

/// Reads only the header of a GGUF file and derives its [`ModelSpec`].
pub fn spec_from_gguf_file(path: &Path) -> Result<ModelSpec, KvqError> {
    let f = GgufFile::open(path)?;
    spec_from_gguf(&f, &path.display().to_string())
}

/// Derives a [`ModelSpec`] from parsed GGUF metadata.
pub fn spec_from_gguf(f: &GgufFile, origin: &str) -> Result<ModelSpec, KvqError> {
    let missing = |key: &str| KvqError::Model {
        path: origin.to_string(),
        reason: format!("metadata key `{key}` is missing or has the wrong type"),
    };
    let arch = f
        .architecture()
        .ok_or_else(|| missing("general.architecture"))?
        .to_string();
    let uint = |k: &str| -> Result<usize, KvqError> {
        let key = format!("{arch}.{k}");
        f.get(&key)
            .and_then(GgufValue::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| missing(&key))
    };
    let opt_uint = |k: &str| {
        f.get(&format!("{arch}.{k}"))
            .and_then(GgufValue::as_u64)
            .map(|v| v as usize)
    };
    let opt_f32 = |k: &str| f.get(&format!("{arch}.{k}")).and_then(GgufValue::as_f32);

    let num_heads = uint("attention.head_count")?;
    let num_kv_heads = opt_uint("attention.head_count_kv").unwrap_or(num_heads);
    let hidden_size = uint("embedding_length")?;
    let default_dim = hidden_size.checked_div(num_heads).unwrap_or(0);
    let mla = opt_uint("attention.kv_lora_rank").is_some();
    let head_dim_k = opt_uint("attention.key_length").unwrap_or(default_dim);
    let head_dim_v = opt_uint("attention.value_length").unwrap_or(head_dim_k);
    let vocab_size = opt_uint("vocab_size")
        .or_else(|| {
            f.get("tokenizer.ggml.tokens")
                .and_then(GgufValue::as_array)
                .map(<[_]>::len)
        })
        .ok_or_else(|| missing("tokenizer.ggml.tokens"))?;
    let attention = if mla {
        AttentionKind::Mla
    } else {
        ModelSpec::attention_kind_for(num_heads, num_kv_heads)
    };
    ModelSpec {
        num_layers: uint("block_count")?,
        num_heads,
        num_kv_heads,
        head_dim_k,
        head_dim_v,
        hidden_size,
        intermediate_size: opt_uint("feed_forward_length").unwrap_or(0),
        vocab_size,
        max_position_embeddings: opt_uint("context_length").unwrap_or(2048),
        rope_theta: opt_f32("rope.freq_base").unwrap_or(10000.0),
        rms_norm_eps: opt_f32("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        tie_word_embeddings: f.tensor("output.weight").is_none(),
        attention,
        dtype: KvDtype::F16,
        architecture: arch,
    }
    .check(origin)
}

/// Writes a GGUF v3 header with the given metadata and tensor directory (tests and tools).
pub mod writer {
    use super::GgufValue;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn type_id(v: &GgufValue) -> u32 {
        match v {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    fn value(out: &mut Vec<u8>, v: &GgufValue) {
        match v {
            GgufValue::U8(x) => out.push(*x),
            GgufValue::I8(x) => out.push(*x as u8),
            GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::Bool(x) => out.push(*x as u8),
            GgufValue::String(s) => string(out, s),
            GgufValue::Array(items) => {
                let elem = items.first().map(type_id).unwrap_or(0);
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                items.iter().for_each(|i| value(out, i));
            }
        }
    }

    /// A header with `metadata` and tensors `(name, dims, ggml_type, offset)`, padded to 32.
    pub fn header(
        metadata: &[(&str, GgufValue)],
        tensors: &[(&str, Vec<u64>, u32, u64)],
    ) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            string(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            value(&mut out, v);
        }
        for (name, dims, ty, offset) in tensors {
            string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            dims.iter()
                .for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::writer::header;
    use super::*;

    fn smollm_like() -> Vec<u8> {
        let tokens = GgufValue::Array(vec![GgufValue::String("a".into()); 10]);
        header(
            &[
                ("general.architecture", GgufValue::String("llama".into())),
                ("llama.block_count", GgufValue::U32(30)),
                ("llama.attention.head_count", GgufValue::U32(9)),
                ("llama.attention.head_count_kv", GgufValue::U32(3)),
                ("llama.embedding_length", GgufValue::U32(576)),
                ("llama.feed_forward_length", GgufValue::U32(1536)),
                ("llama.rope.freq_base", GgufValue::F32(100000.0)),
                ("tokenizer.ggml.tokens", tokens),
            ],
            &[("token_embd.weight", vec![576, 10], 1, 0)],
        )
    }

    #[test]
    fn reads_spec_from_metadata() {
        let f = GgufFile::from_bytes(&smollm_like(), "m.gguf").unwrap();
        let s = spec_from_gguf(&f, "m.gguf").unwrap();
        assert_eq!(
            (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim_k),
            (30, 9, 3, 64)
        );
        assert_eq!(s.vocab_size, 10);
        assert!(s.tie_word_embeddings);
        assert_eq!(s.rope_theta, 100000.0);
        assert_eq!(f.tensors[0].dims, vec![576, 10]);
        assert_eq!(f.data_offset % 32, 0);
    }

    #[test]
    fn every_truncation_is_an_error_naming_the_file() {
        let bytes = smollm_like();
        // Cut anywhere inside the header (the padding at the end is not needed to parse).
        let header_len = bytes.len() - bytes.iter().rev().take_while(|b| **b == 0).count();
        for cut in 0..header_len - 8 {
            let err = GgufFile::from_bytes(&bytes[..cut], "cut.gguf")
                .unwrap_err()
                .to_string();
            assert!(err.contains("cut.gguf"), "{err}");
        }
    }

    #[test]
    fn wrong_magic_and_version_are_named() {
        let mut b = smollm_like();
        b[0] = b'X';
        assert!(GgufFile::from_bytes(&b, "f")
            .unwrap_err()
            .to_string()
            .contains("not a GGUF"));
        let mut b = smollm_like();
        b[4] = 9;
        assert!(GgufFile::from_bytes(&b, "f")
            .unwrap_err()
            .to_string()
            .contains("version 9"));
    }

    #[test]
    fn absurd_lengths_do_not_allocate() {
        let mut b = smollm_like();
        // The first key's length field: make it huge.
        b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = GgufFile::from_bytes(&b, "f").unwrap_err().to_string();
        assert!(err.contains("truncated or corrupt"), "{err}");
    }

    #[test]
    fn missing_key_is_named() {
        let b = header(
            &[("general.architecture", GgufValue::String("llama".into()))],
            &[],
        );
        let f = GgufFile::from_bytes(&b, "f").unwrap();
        let err = spec_from_gguf(&f, "f").unwrap_err().to_string();
        assert!(err.contains("llama.attention.head_count"), "{err}");
    }
}
