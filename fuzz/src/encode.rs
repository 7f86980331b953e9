//! Writes a fuzz input down as bytes: the inverse of how `arbitrary` (derive, 1.x) reads it,
//! so hand-written scenarios can be committed as seeds. A `serde::Serializer` walks the
//! value; the types' `Serialize` derives mirror their `Arbitrary` derives field for field.
//!
//! What `arbitrary` reads, and so what this writes:
//! - integers: little-endian bytes; `bool`: one byte, `1` or `0`; `f64`: its bits as `u64`;
//! - `Option`: a `bool`, then the value when `Some`;
//! - `Vec` (and the last field's take-the-rest list): each element after a `1`, then `0`;
//! - an enum: a `u32` `x` with `(x * variants) >> 32 == index`, then the variant's fields;
//! - [`Text`](crate::text::Text): a `u16` length, then the bytes.
//!
//! Enum variant counts are not in serde's data model; [`VARIANTS`] lists them, and the
//! round-trip test of every seed catches a count that went stale.

use serde::ser::{self, Serialize};
use std::fmt;

/// Variant counts of the enums in fuzz inputs, by type name.
pub const VARIANTS: &[(&str, u64)] = &[
    ("AgentChoice", 2),
    ("Op", 18),
    ("TwilioFrame", 8),
    ("Sid", 2),
    ("MarkName", 4),
    ("Payload", 3),
    ("Item", 2),
    ("Format", 5),
    ("Role", 5),
    ("OpenAiEvent", 20),
    ("ErrorCode", 4),
    ("ToolName", 5),
    ("Arguments", 3),
];

#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl ser::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

/// The bytes `arbitrary` decodes back into `value`.
pub fn to_bytes<T: Serialize>(value: &T) -> Vec<u8> {
    let mut e = Encoder(Vec::new());
    value.serialize(&mut e).expect("fuzz inputs encode");
    e.0
}

pub struct Encoder(Vec<u8>);

impl Encoder {
    fn variant(&mut self, name: &str, index: u32) -> Result<(), Error> {
        let count = VARIANTS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| *c)
            .ok_or_else(|| Error(format!("no variant count for enum {name}")))?;
        let x = ((u64::from(index) << 32).div_ceil(count)) as u32;
        debug_assert_eq!((u64::from(x) * count) >> 32, u64::from(index));
        self.0.extend_from_slice(&x.to_le_bytes());
        Ok(())
    }
}

type R = Result<(), Error>;

impl<'a> ser::Serializer for &'a mut Encoder {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Seq<'a>;
    type SerializeTuple = &'a mut Encoder;
    type SerializeTupleStruct = &'a mut Encoder;
    type SerializeTupleVariant = &'a mut Encoder;
    type SerializeMap = ser::Impossible<(), Error>;
    type SerializeStruct = &'a mut Encoder;
    type SerializeStructVariant = &'a mut Encoder;

    fn serialize_bool(self, v: bool) -> R {
        self.0.push(u8::from(v));
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> R {
        self.0.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_i16(self, v: i16) -> R {
        self.0.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_i32(self, v: i32) -> R {
        self.0.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_i64(self, v: i64) -> R {
        self.0.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> R {
        self.0.push(v);
        Ok(())
    }
    fn serialize_u16(self, v: u16) -> R {
        self.0.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_u32(self, v: u32) -> R {
        self.0.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_u64(self, v: u64) -> R {
        self.0.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> R {
        self.0.extend_from_slice(&v.to_bits().to_le_bytes());
        Ok(())
    }
    fn serialize_f64(self, v: f64) -> R {
        self.0.extend_from_slice(&v.to_bits().to_le_bytes());
        Ok(())
    }
    fn serialize_char(self, v: char) -> R {
        self.serialize_u32(u32::from(v))
    }
    fn serialize_str(self, v: &str) -> R {
        let len = u16::try_from(v.len()).map_err(|_| Error("text over 65535 bytes".into()))?;
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(v.as_bytes());
        Ok(())
    }
    fn serialize_bytes(self, _: &[u8]) -> R {
        Err(Error("bytes are not used in fuzz inputs".into()))
    }
    fn serialize_none(self) -> R {
        self.0.push(0);
        Ok(())
    }
    fn serialize_some<T: ?Sized + Serialize>(self, v: &T) -> R {
        self.0.push(1);
        v.serialize(self)
    }
    fn serialize_unit(self) -> R {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> R {
        Ok(())
    }
    fn serialize_unit_variant(self, name: &'static str, index: u32, _: &'static str) -> R {
        self.variant(name, index)
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(self, _: &'static str, v: &T) -> R {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        name: &'static str,
        index: u32,
        _: &'static str,
        v: &T,
    ) -> R {
        self.variant(name, index)?;
        v.serialize(self)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Seq<'a>, Error> {
        Ok(Seq(self))
    }
    fn serialize_tuple(self, _: usize) -> Result<Self, Error> {
        Ok(self)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, Error> {
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, Error> {
        self.variant(name, index)?;
        Ok(self)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Error> {
        Err(Error("maps are not used in fuzz inputs".into()))
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, Error> {
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, Error> {
        self.variant(name, index)?;
        Ok(self)
    }
}

/// A `Vec`: each element after a `1`, then a `0`.
pub struct Seq<'a>(&'a mut Encoder);

impl ser::SerializeSeq for Seq<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, v: &T) -> R {
        self.0 .0.push(1);
        v.serialize(&mut *self.0)
    }
    fn end(self) -> R {
        self.0 .0.push(0);
        Ok(())
    }
}

macro_rules! concatenated {
    ($trait:ident, $method:ident) => {
        impl ser::$trait for &mut Encoder {
            type Ok = ();
            type Error = Error;
            fn $method<T: ?Sized + Serialize>(&mut self, v: &T) -> R {
                v.serialize(&mut **self)
            }
            fn end(self) -> R {
                Ok(())
            }
        }
    };
}

concatenated!(SerializeTuple, serialize_element);
concatenated!(SerializeTupleStruct, serialize_field);
concatenated!(SerializeTupleVariant, serialize_field);

impl ser::SerializeStruct for &mut Encoder {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, _: &'static str, v: &T) -> R {
        v.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeStructVariant for &mut Encoder {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, _: &'static str, v: &T) -> R {
        v.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}
