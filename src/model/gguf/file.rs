//! Writing a GGUF file: header, metadata, tensor infos, then the tensor data, each part aligned.
//!
//! ```text
//! u32 magic "GGUF" | u32 version 3 | u64 tensor count | u64 metadata count
//! metadata: (string key, u32 value type, value)*
//! tensor infos: (string name, u32 n_dims, u64 dims[n_dims] (innermost first), u32 ggml type, u64 offset)*
//! zero padding to ALIGNMENT | tensor data, each tensor padded to ALIGNMENT
//! ```
//!
//! Strings are a u64 byte length then UTF-8 bytes; arrays a u32 element type, a u64 count, then
//! the elements. Spec: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.
//!
//! Why not `candle_core::quantized::gguf_file::write`: it writes every value type we need (string
//! arrays for the vocabulary included) but stamps the file GGUF version 2, while llama.cpp's
//! converter (`gguf-py`) writes version 3. The layout of the two is the same for little-endian
//! files; writing 3 keeps our files field for field what the converter writes. Reading goes
//! through candle's `gguf_file::Content`, which reads both.

use std::io::Write;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};

/// Where tensor data and each tensor start: `general.alignment`'s default, which gguf-py uses.
pub(crate) const ALIGNMENT: usize = 32;
const MAGIC: u32 = 0x4655_4747;
const VERSION: u32 = 3;

/// A GGUF file being assembled: metadata in insertion order, then tensors in insertion order.
pub(crate) struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, QTensor)>,
}

impl GgufWriter {
    /// A file whose first key is `general.architecture`, as gguf-py's `GGUFWriter` starts one.
    pub(crate) fn new(architecture: &str) -> Self {
        Self {
            metadata: vec![(
                "general.architecture".to_owned(),
                Value::String(architecture.to_owned()),
            )],
            tensors: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, key: impl Into<String>, value: Value) {
        self.metadata.push((key.into(), value));
    }

    pub(crate) fn add_tensor(&mut self, name: impl Into<String>, tensor: QTensor) {
        self.tensors.push((name.into(), tensor));
    }

    pub(crate) fn tensors(&self) -> &[(String, QTensor)] {
        &self.tensors
    }

    /// Writes the whole file to `w`. Fails on an array mixing value types, which GGUF cannot hold,
    /// and on a tensor whose bytes cannot be read back from candle.
    pub(crate) fn write(&self, w: &mut impl Write) -> Result<(), String> {
        let mut out = Counting {
            inner: w,
            written: 0,
        };
        out.u32(MAGIC)?;
        out.u32(VERSION)?;
        out.u64(self.tensors.len() as u64)?;
        out.u64(self.metadata.len() as u64)?;
        for (key, value) in &self.metadata {
            out.string(key)?;
            out.u32(value_type(value)?)?;
            write_value(&mut out, value)?;
        }
        let data: Vec<std::borrow::Cow<'_, [u8]>> = self
            .tensors
            .iter()
            .map(|(name, tensor)| tensor.data().map_err(|e| format!("tensor `{name}`: {e}")))
            .collect::<Result<_, _>>()?;
        let mut offset = 0usize;
        for ((name, tensor), bytes) in self.tensors.iter().zip(&data) {
            out.string(name)?;
            let dims = tensor.shape().dims();
            out.u32(dims.len() as u32)?;
            for &dim in dims.iter().rev() {
                out.u64(dim as u64)?;
            }
            out.u32(ggml_type_id(tensor.dtype()))?;
            out.u64(offset as u64)?;
            offset += bytes.len().next_multiple_of(ALIGNMENT);
        }
        out.pad()?;
        for bytes in &data {
            out.bytes(bytes)?;
            out.pad()?;
        }
        Ok(())
    }
}

/// ggml's `ggml_type` numbers of the types this crate writes.
pub(crate) fn ggml_type_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn value_type(value: &Value) -> Result<u32, String> {
    Ok(match value {
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
    })
}

fn write_value<W: Write>(out: &mut Counting<W>, value: &Value) -> Result<(), String> {
    match value {
        Value::U8(v) => out.bytes(&[*v]),
        Value::I8(v) => out.bytes(&v.to_le_bytes()),
        Value::U16(v) => out.bytes(&v.to_le_bytes()),
        Value::I16(v) => out.bytes(&v.to_le_bytes()),
        Value::U32(v) => out.u32(*v),
        Value::I32(v) => out.bytes(&v.to_le_bytes()),
        Value::U64(v) => out.u64(*v),
        Value::I64(v) => out.bytes(&v.to_le_bytes()),
        Value::F32(v) => out.bytes(&v.to_le_bytes()),
        Value::F64(v) => out.bytes(&v.to_le_bytes()),
        Value::Bool(v) => out.bytes(&[u8::from(*v)]),
        Value::String(v) => out.string(v),
        Value::Array(items) => {
            // An empty array's element type is never read.
            let element = match items.first() {
                Some(first) => value_type(first)?,
                None => 0,
            };
            if items
                .iter()
                .any(|item| value_type(item).is_ok_and(|t| t != element))
            {
                return Err("an array mixes value types".to_owned());
            }
            out.u32(element)?;
            out.u64(items.len() as u64)?;
            items.iter().try_for_each(|item| write_value(out, item))
        }
    }
}

/// A writer that knows how many bytes went through it, for the alignment padding.
struct Counting<W> {
    inner: W,
    written: usize,
}

impl<W: Write> Counting<W> {
    fn bytes(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.inner.write_all(bytes).map_err(|e| e.to_string())?;
        self.written += bytes.len();
        Ok(())
    }

    fn u32(&mut self, v: u32) -> Result<(), String> {
        self.bytes(&v.to_le_bytes())
    }

    fn u64(&mut self, v: u64) -> Result<(), String> {
        self.bytes(&v.to_le_bytes())
    }

    fn string(&mut self, s: &str) -> Result<(), String> {
        self.u64(s.len() as u64)?;
        self.bytes(s.as_bytes())
    }

    fn pad(&mut self) -> Result<(), String> {
        let padding = self.written.next_multiple_of(ALIGNMENT) - self.written;
        self.bytes(&[0; ALIGNMENT][..padding])
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::gguf_file::Content;
    use candle_core::{Device, Tensor};

    use super::*;

    /// candle's reader (an independent implementation of the spec) reads back every value type,
    /// a string array, and tensors of each written type at the offsets we computed.
    #[test]
    fn candle_reads_back_what_we_write() {
        let mut writer = GgufWriter::new("bert");
        writer.add("a.u32", Value::U32(7));
        writer.add("a.f32", Value::F32(1e-12));
        writer.add("a.bool", Value::Bool(false));
        writer.add(
            "a.strings",
            Value::Array(vec![
                Value::String("▁hi".into()),
                Value::String("[CLS]".into()),
            ]),
        );
        writer.add("a.i32s", Value::Array(vec![Value::I32(1), Value::I32(3)]));
        let values: Vec<f32> = (0..64 * 3).map(|i| (i as f32 * 0.37).sin()).collect();
        let tensor = Tensor::from_vec(values.clone(), (3, 64), &Device::Cpu).expect("tensor");
        for (name, dtype) in [
            ("t.f32", GgmlDType::F32),
            ("t.f16", GgmlDType::F16),
            ("t.q8", GgmlDType::Q8_0),
        ] {
            writer.add_tensor(name, QTensor::quantize(&tensor, dtype).expect("quantize"));
        }
        let mut bytes = Vec::new();
        writer.write(&mut bytes).expect("writes");
        assert_eq!(&bytes[4..8], &3u32.to_le_bytes(), "GGUF version 3");

        let mut reader = std::io::Cursor::new(&bytes);
        let content = Content::read(&mut reader).expect("candle reads it");
        assert_eq!(
            content.metadata["general.architecture"]
                .to_string()
                .expect("str"),
            "bert"
        );
        assert_eq!(content.metadata["a.u32"].to_u32().expect("u32"), 7);
        assert_eq!(content.metadata["a.f32"].to_f32().expect("f32"), 1e-12);
        assert!(!content.metadata["a.bool"].to_bool().expect("bool"));
        let strings: Vec<&String> = content.metadata["a.strings"]
            .to_vec()
            .expect("array")
            .iter()
            .map(|v| v.to_string().expect("str"))
            .collect();
        assert_eq!(strings, ["▁hi", "[CLS]"]);
        for (name, tolerance) in [("t.f32", 0.0), ("t.f16", 1e-3), ("t.q8", 1e-2)] {
            let read = content
                .tensor(&mut reader, name, &Device::Cpu)
                .expect("tensor reads");
            assert_eq!(read.shape().dims(), &[3, 64]);
            let got = read
                .dequantize(&Device::Cpu)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .expect("values");
            let worst = got
                .iter()
                .zip(&values)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= tolerance, "{name}: {worst}");
        }
        assert_eq!(bytes.len() % ALIGNMENT, 0);
    }

    #[test]
    fn an_array_of_mixed_types_is_refused() {
        let mut writer = GgufWriter::new("bert");
        writer.add("bad", Value::Array(vec![Value::U32(1), Value::I32(1)]));
        assert!(writer.write(&mut Vec::new()).is_err());
    }
}
