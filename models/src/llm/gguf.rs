//! GGUF v2/v3 reader: metadata of every type and tensor descriptors, over a
//! memory-mapped file; tensor data is borrowed from the map, never copied.
//!
//! Every count, length, dimension and offset read from the file is checked
//! against the bytes that are actually there before anything is allocated,
//! so a truncated or lying file is a typed error, never a panic and never a
//! huge allocation.

use std::collections::BTreeMap;
use std::path::Path;

use osprey_kernels::quant::QuantType;

use super::LlmError;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `u8`.
    U8(u8),
    /// `i8`.
    I8(i8),
    /// `u16`.
    U16(u16),
    /// `i16`.
    I16(i16),
    /// `u32`.
    U32(u32),
    /// `i32`.
    I32(i32),
    /// `u64`.
    U64(u64),
    /// `i64`.
    I64(i64),
    /// `f32`.
    F32(f32),
    /// `f64`.
    F64(f64),
    /// `bool`.
    Bool(bool),
    /// UTF-8 string (invalid sequences replaced).
    String(String),
    /// Array of values of one type.
    Array(Vec<Value>),
}

impl Value {
    /// Any integer type as `u64` (negative values: `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer as `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Float or integer as `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// A string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// A bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// An array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One tensor's descriptor; its bytes are `[offset, offset + bytes)` of
/// the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost (contiguous) first, as GGUF stores them.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: QuantType,
    /// Absolute byte offset in the file.
    pub offset: usize,
    /// Byte size.
    pub bytes: usize,
}

impl TensorInfo {
    /// Element count.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The bytes a [`Gguf`] reads: a memory map or an owned buffer.
#[derive(Debug)]
enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file.
#[derive(Debug)]
pub struct Gguf {
    storage: Storage,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    index: BTreeMap<String, usize>,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

const MAX_DIMS: u32 = 4;
const MAX_NESTING: u32 = 2;

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], LlmError> {
        if n > self.remaining() {
            return Err(LlmError::Gguf(format!(
                "truncated: {what} needs {n} bytes at offset {}, {} left",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N], LlmError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32, LlmError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, LlmError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    /// A count of items each at least `min_item` bytes: refused when the
    /// rest of the file could not hold them.
    fn count(&mut self, min_item: usize, what: &str) -> Result<usize, LlmError> {
        let n = self.u64(what)?;
        let max = self.remaining() / min_item.max(1);
        if n > max as u64 {
            return Err(LlmError::Gguf(format!(
                "{what} is {n}, but only {} bytes remain (offset {})",
                self.remaining(),
                self.pos
            )));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String, LlmError> {
        let n = self.count(1, what)?;
        let s = self.take(n, what)?;
        Ok(String::from_utf8_lossy(s).into_owned())
    }
    fn value(&mut self, ty: u32, depth: u32, key: &str) -> Result<Value, LlmError> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(key)?[0]),
            1 => Value::I8(self.arr::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => Value::Bool(self.arr::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(LlmError::Gguf(format!("'{key}': arrays nested too deeply")));
                }
                let et = self.u32(key)?;
                let min = match et {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => {
                        return Err(LlmError::Gguf(format!(
                            "'{key}': unknown array element type {other}"
                        )))
                    }
                };
                let n = self.count(min, key)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(et, depth + 1, key)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(key)?)),
            other => {
                return Err(LlmError::Gguf(format!(
                    "'{key}': unknown metadata type {other}"
                )))
            }
        })
    }
}

impl Gguf {
    /// Maps and parses a file.
    pub fn open(path: &Path) -> Result<Gguf, LlmError> {
        let io = |e: std::io::Error| LlmError::Io {
            path: path.display().to_string(),
            error: e.to_string(),
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: FFI mapping of a read-only file. The map is only read;
        // a model file changed by another process while mapped is outside
        // what the daemon supports (deployment replaces files atomically).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Gguf::parse(Storage::Mapped(map))
            .map_err(|e| LlmError::Gguf(format!("{}: {e}", path.display())))
    }

    /// Parses bytes held in memory (tests, fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Gguf, LlmError> {
        Gguf::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<Gguf, LlmError> {
        let b = storage.bytes();
        let mut c = Cursor { b, pos: 0 };
        let magic = c.arr::<4>("magic")?;
        if &magic != b"GGUF" {
            return Err(LlmError::Gguf(format!(
                "not a GGUF file (magic {magic:02x?})"
            )));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(LlmError::Gguf(format!(
                "GGUF version {version} is not supported (2 and 3 are)"
            )));
        }
        // A tensor info is at least 8 + 4 + 4 + 8 bytes; a key/value 8 + 4 + 1.
        let n_tensors = c.count(24, "tensor count")?;
        let n_kv = c.count(13, "metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, 0, &key)?;
            metadata.insert(key, v);
        }
        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let nd = c.u32(&name)?;
            if nd == 0 || nd > MAX_DIMS {
                return Err(LlmError::Gguf(format!(
                    "tensor '{name}': {nd} dimensions (1 to {MAX_DIMS} allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                dims.push(c.u64(&name)?);
            }
            let ty_id = c.u32(&name)?;
            let ty = QuantType::from_ggml(ty_id).ok_or_else(|| {
                LlmError::Gguf(format!(
                    "tensor '{name}': type {ty_id} is not supported (F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K are)"
                ))
            })?;
            let off = c.u64(&name)?;
            raw.push((name, dims, ty, off));
        }
        let align = match metadata.get("general.alignment") {
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two() && *a <= 1 << 16)
                .ok_or_else(|| LlmError::Gguf(format!("general.alignment {v:?} is invalid")))?
                as usize,
            None => 32,
        };
        let data_start = c.pos.div_ceil(align) * align;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut index = BTreeMap::new();
        for (name, dims, ty, off) in raw {
            let numel = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    LlmError::Gguf(format!("tensor '{name}': dimensions {dims:?} are invalid"))
                })?;
            let row = dims[0];
            if row % ty.block_elems() as u64 != 0 {
                return Err(LlmError::Gguf(format!(
                    "tensor '{name}': row of {row} is not a multiple of the {ty:?} block ({})",
                    ty.block_elems()
                )));
            }
            let bytes = (numel / ty.block_elems() as u64)
                .checked_mul(ty.block_bytes() as u64)
                .ok_or_else(|| LlmError::Gguf(format!("tensor '{name}': size overflows")))?;
            let start = (data_start as u64).checked_add(off);
            let end = start.and_then(|s| s.checked_add(bytes));
            let (Some(start), Some(end)) = (start, end) else {
                return Err(LlmError::Gguf(format!("tensor '{name}': offset overflows")));
            };
            if end > b.len() as u64 {
                return Err(LlmError::Gguf(format!(
                    "tensor '{name}': data [{start}, {end}) lies past the end of the file ({} bytes)",
                    b.len()
                )));
            }
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(LlmError::Gguf(format!("tensor '{name}' appears twice")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset: start as usize,
                bytes: bytes as usize,
            });
        }
        Ok(Gguf {
            storage,
            version,
            metadata,
            tensors,
            index,
        })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// A tensor's descriptor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// A tensor's raw bytes (quantized blocks as stored).
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.storage.bytes()[t.offset..t.offset + t.bytes]
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required unsigned integer.
    pub fn get_u64(&self, key: &str) -> Result<u64, LlmError> {
        self.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| LlmError::Gguf(format!("metadata '{key}' missing or not an integer")))
    }

    /// A required float.
    pub fn get_f64(&self, key: &str) -> Result<f64, LlmError> {
        self.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| LlmError::Gguf(format!("metadata '{key}' missing or not a number")))
    }

    /// A required string.
    pub fn get_str(&self, key: &str) -> Result<&str, LlmError> {
        self.get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| LlmError::Gguf(format!("metadata '{key}' missing or not a string")))
    }
}

/// Builds GGUF files in memory (tests and tools).
#[derive(Debug, Default)]
pub struct GgufWriter {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    data: Vec<u8>,
    n_tensors: u64,
}

impl GgufWriter {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    /// Adds a scalar or string value (arrays via [`GgufWriter::kv_raw`]).
    pub fn kv(&mut self, key: &str, v: &Value) -> &mut Self {
        Self::string(&mut self.kv, key);
        Self::value(&mut self.kv, v, true);
        self.n_kv += 1;
        self
    }

    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    fn value(out: &mut Vec<u8>, v: &Value, with_type: bool) {
        if with_type {
            out.extend_from_slice(&Self::type_id(v).to_le_bytes());
        }
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::String(s) => Self::string(out, s),
            Value::Array(items) => {
                let et = items.first().map_or(4, Self::type_id);
                out.extend_from_slice(&et.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for i in items {
                    Self::value(out, i, false);
                }
            }
        }
    }

    /// Adds a tensor with raw (already quantized) bytes.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: QuantType, bytes: &[u8]) -> &mut Self {
        Self::string(&mut self.infos, name);
        self.infos
            .extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend_from_slice(&d.to_le_bytes());
        }
        self.infos.extend_from_slice(&ty.ggml_id().to_le_bytes());
        let off = self.data.len().div_ceil(32) * 32;
        self.data.resize(off, 0);
        self.infos.extend_from_slice(&(off as u64).to_le_bytes());
        self.data.extend_from_slice(bytes);
        self.n_tensors += 1;
        self
    }

    /// The file.
    pub fn finish(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&self.n_tensors.to_le_bytes());
        out.extend_from_slice(&self.n_kv.to_le_bytes());
        out.extend_from_slice(&self.kv);
        out.extend_from_slice(&self.infos);
        out.resize(out.len().div_ceil(32) * 32, 0);
        out.extend_from_slice(&self.data);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        let mut w = GgufWriter::default();
        w.kv("general.architecture", &Value::String("llama".into()))
            .kv("llama.block_count", &Value::U32(2))
            .kv("llama.rope.freq_base", &Value::F32(10000.0))
            .kv(
                "tokenizer.ggml.tokens",
                &Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            )
            .kv("flag", &Value::Bool(true))
            .kv("big", &Value::I64(-5));
        let f: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        w.tensor("w", &[2, 2], QuantType::F32, &f);
        w.tensor("v", &[32], QuantType::Q8_0, &[0u8; 34]);
        w.finish()
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let g = Gguf::from_bytes(sample()).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get_u64("llama.block_count").unwrap(), 2);
        assert_eq!(g.get_f64("llama.rope.freq_base").unwrap(), 10000.0);
        assert_eq!(g.get("flag").and_then(Value::as_bool), Some(true));
        assert_eq!(g.get("big").and_then(Value::as_i64), Some(-5));
        assert_eq!(
            g.get("tokenizer.ggml.tokens")
                .and_then(Value::as_array)
                .map(|a| a.len()),
            Some(2)
        );
        let t = g.tensor("w").unwrap();
        assert_eq!((t.dims.clone(), t.bytes), (vec![2, 2], 16));
        assert_eq!(&g.data(t)[4..8], &2.0f32.to_le_bytes());
        assert_eq!(g.tensor("v").unwrap().ty, QuantType::Q8_0);
        assert!(g.get_u64("missing").is_err());
    }

    #[test]
    fn lies_are_errors() {
        let good = sample();
        // Tensor data past the end.
        assert!(Gguf::from_bytes(good[..good.len() - 1].to_vec()).is_err());
        // Absurd metadata count.
        let mut b = good.clone();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = Gguf::from_bytes(b).unwrap_err().to_string();
        assert!(e.contains("metadata count"), "{e}");
        // Wrong magic and version.
        let mut b = good.clone();
        b[0] = b'X';
        assert!(Gguf::from_bytes(b).is_err());
        let mut b = good.clone();
        b[4] = 9;
        assert!(Gguf::from_bytes(b)
            .unwrap_err()
            .to_string()
            .contains("version"));
        // Unknown tensor type.
        let mut w = GgufWriter::default();
        w.tensor("x", &[32], QuantType::Q8_0, &[0u8; 34]);
        let mut b = w.finish();
        let pos = b.windows(4).rposition(|s| s == 8u32.to_le_bytes()).unwrap();
        b[pos] = 77;
        assert!(Gguf::from_bytes(b)
            .unwrap_err()
            .to_string()
            .contains("type 77"));
    }

    proptest! {
        #[test]
        fn hostile_bytes_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
            let mut b = sample();
            for (i, v) in flips {
                let n = b.len();
                b[i % n] = v;
            }
            let n = b.len();
            b.truncate(cut % (n + 1));
            let _ = Gguf::from_bytes(b);
        }
    }
}
