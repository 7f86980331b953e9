//! Strings in fuzz inputs: a little-endian `u16` length, then that many bytes (fewer if the
//! input ends first), read as UTF-8 with invalid sequences replaced.
//!
//! `String`'s own `Arbitrary` reads its length from the *end* of the input, so one value's
//! bytes depend on everything after it; this reads front to back, so an input is just its
//! parts one after another and seeds can be written down (see [`crate::encode`]).

use arbitrary::{Arbitrary, Result, Unstructured};
use serde::{Serialize, Serializer};
use std::fmt;
use std::ops::Deref;

#[derive(Clone, PartialEq, Eq, Default)]
pub struct Text(pub String);

impl<'a> Arbitrary<'a> for Text {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let len = usize::from(u16::arbitrary(u)?);
        let bytes = u.bytes(len.min(u.len()))?;
        Ok(Text(String::from_utf8_lossy(bytes).into_owned()))
    }
}

impl Serialize for Text {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Text(s.to_owned())
    }
}

impl From<Text> for String {
    fn from(t: Text) -> String {
        t.0
    }
}
