//! The JSON of a REST inference request, read straight into typed values. A generic JSON tree costs about
//! 100 times the bytes it was parsed from (a 16 MiB body of `[[0],[0],...]` held 400 MiB), so none is built:
//! every list is bounded while it is read (inputs, outputs, parameters, tensor elements, nesting depth), and a
//! body that goes past a bound is refused before it costs more.
//!
//! Tensor data may come flat or nested in rows; either way it is read row-major into one list of scalars,
//! which `rest` then checks against the input's datatype.

use std::{cell::Cell, collections::BTreeMap, fmt};

use serde::{
    Deserialize, Deserializer,
    de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor},
};

/// Parameters a request, an input or an output may carry.
pub const MAX_PARAMETERS: usize = 64;
/// Inputs and outputs a request may list (a call sends one input and names at most six outputs).
pub const MAX_INPUTS: usize = 8;
pub const MAX_OUTPUTS: usize = 16;
/// Dimensions of a shape, and levels of nesting in tensor data.
pub const MAX_DIMENSIONS: usize = 8;

thread_local! {
    /// Tensor elements the request being parsed on this thread may still hold: serde's derive passes no state
    /// down, and a parse runs start to end on one thread.
    static ELEMENTS_LEFT: Cell<usize> = const { Cell::new(0) };
}

/// Parses an inference request, holding at most `max_elements` tensor elements in all.
pub fn parse(json: &[u8], max_elements: usize) -> Result<InferRequest, serde_json::Error> {
    ELEMENTS_LEFT.with(|left| left.set(max_elements));
    serde_json::from_slice(json)
}

#[derive(Debug, Deserialize)]
pub struct InferRequest {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub parameters: Parameters,
    pub inputs: Bounded<Input, MAX_INPUTS>,
    #[serde(default)]
    pub outputs: Bounded<Output, MAX_OUTPUTS>,
}

#[derive(Debug, Deserialize)]
pub struct Input {
    pub name: String,
    pub shape: Bounded<i64, MAX_DIMENSIONS>,
    pub datatype: String,
    #[serde(default)]
    pub parameters: Parameters,
    #[serde(default)]
    pub data: Option<TensorData>,
}

#[derive(Debug, Deserialize)]
pub struct Output {
    pub name: String,
    #[serde(default)]
    pub parameters: Parameters,
}

/// A parameter's value: the protocol allows a boolean, a number or a string.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(String),
}

impl Scalar {
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Scalar::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Scalar::Int(n) => u64::try_from(*n).ok(),
            Scalar::Uint(n) => Some(*n),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Read by hand, not `#[serde(untagged)]`: that buffers any value, however large, into a generic tree first.
impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct One;
        impl<'de> Visitor<'de> for One {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a boolean, a number or a string")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Uint(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar::Str(v))
            }
        }
        deserializer.deserialize_any(One)
    }
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::Int(n) => write!(f, "{n}"),
            Scalar::Uint(n) => write!(f, "{n}"),
            Scalar::Float(x) => write!(f, "{x}"),
            Scalar::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// At most [`MAX_PARAMETERS`] named scalars.
#[derive(Debug, Default)]
pub struct Parameters(pub BTreeMap<String, Scalar>);

impl Parameters {
    pub fn get(&self, key: &str) -> Option<&Scalar> {
        self.0.get(key)
    }
}

impl<'de> Deserialize<'de> for Parameters {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Parameters;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an object of at most {MAX_PARAMETERS} parameters")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parameters, A::Error> {
                let mut entries = BTreeMap::new();
                while let Some((key, value)) = map.next_entry::<String, Scalar>()? {
                    if entries.len() == MAX_PARAMETERS {
                        return Err(de::Error::custom(format!("more than {MAX_PARAMETERS} parameters")));
                    }
                    entries.insert(key, value);
                }
                Ok(Parameters(entries))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

/// A list of at most `N` items, refused as soon as it grows past them.
#[derive(Debug)]
pub struct Bounded<T, const N: usize>(pub Vec<T>);

impl<T, const N: usize> Default for Bounded<T, N> {
    fn default() -> Self {
        Bounded(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Bounded<T, N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Items<T, const N: usize>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for Items<T, N> {
            type Value = Bounded<T, N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list of at most {N} items")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    if items.len() == N {
                        return Err(de::Error::custom(format!("a list of more than {N} items")));
                    }
                    items.push(item);
                }
                Ok(Bounded(items))
            }
        }
        deserializer.deserialize_seq(Items::<T, N>(std::marker::PhantomData))
    }
}

/// A tensor's elements, flattened row-major; `null`s are skipped.
#[derive(Debug, Default, PartialEq)]
pub struct TensorData(pub Vec<Scalar>);

impl<'de> Deserialize<'de> for TensorData {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut out = Vec::new();
        Level {
            out: &mut out,
            depth: 0,
        }
        .deserialize(deserializer)?;
        Ok(TensorData(out))
    }
}

/// One level of (possibly nested) tensor data, appending its scalars to `out`.
struct Level<'a> {
    out: &'a mut Vec<Scalar>,
    depth: usize,
}

impl Level<'_> {
    fn push<E: de::Error>(self, scalar: Scalar) -> Result<(), E> {
        let left = ELEMENTS_LEFT.with(Cell::get);
        if left == 0 {
            return Err(E::custom("more tensor elements than the images a call may carry"));
        }
        ELEMENTS_LEFT.with(|l| l.set(left - 1));
        self.out.push(scalar);
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Level<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Level<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("tensor data: scalars, in nested lists or flat")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth == MAX_DIMENSIONS {
            return Err(de::Error::custom(format!(
                "tensor data nested more than {MAX_DIMENSIONS} deep"
            )));
        }
        while seq
            .next_element_seed(Level {
                out: &mut *self.out,
                depth: self.depth + 1,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.push(Scalar::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.push(Scalar::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.push(Scalar::Uint(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.push(Scalar::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.push(Scalar::Str(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        self.push(Scalar::Str(v))
    }

    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<(), A::Error> {
        Err(de::Error::custom(
            "tensor data holds an object: send scalars, flat or in nested lists",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(json: &str, max: usize) -> Result<Vec<Scalar>, String> {
        let body = format!(r#"{{"inputs":[{{"name":"raw","shape":[1],"datatype":"UINT8","data":{json}}}]}}"#);
        parse(body.as_bytes(), max)
            .map(|r| r.inputs.0.into_iter().next().unwrap().data.unwrap_or_default().0)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn nested_and_flat_data_read_the_same() {
        assert_eq!(data("[[1,2],[3,4]]", 10), data("[1,2,3,4]", 10));
        assert_eq!(data("[1,null,2]", 10).unwrap(), vec![Scalar::Uint(1), Scalar::Uint(2)]);
    }

    #[test]
    fn elements_past_the_bound_are_refused_while_parsing() {
        assert_eq!(data("[[0],[0],[0]]", 3).unwrap().len(), 3);
        let e = data("[[0],[0],[0],[0]]", 3).unwrap_err();
        assert!(e.contains("more tensor elements"), "{e}");
    }

    #[test]
    fn deep_nesting_objects_and_long_lists_are_refused() {
        assert!(
            data(&format!("{}1{}", "[".repeat(9), "]".repeat(9)), 10)
                .unwrap_err()
                .contains("nested")
        );
        assert!(data(r#"[{"a":1}]"#, 10).unwrap_err().contains("object"));
        let shape = format!(
            r#"{{"inputs":[{{"name":"raw","shape":[{}],"datatype":"UINT8"}}]}}"#,
            ["1"; 9].join(",")
        );
        assert!(
            parse(shape.as_bytes(), 10)
                .unwrap_err()
                .to_string()
                .contains("more than 8")
        );
        let params: Vec<String> = (0..65).map(|i| format!(r#""p{i}":1"#)).collect();
        let body = format!(r#"{{"parameters":{{{}}},"inputs":[]}}"#, params.join(","));
        assert!(
            parse(body.as_bytes(), 10)
                .unwrap_err()
                .to_string()
                .contains("more than 64 parameters")
        );
        let nested = r#"{"parameters":{"p":{"deep":[1,2]}},"inputs":[]}"#;
        assert!(parse(nested.as_bytes(), 10).is_err(), "a parameter is a scalar");
    }
}
