//! The one wire format, in Python: a library document serialised through
//! serde into a `serde_json::Value` (keys in struct order), then built as
//! Python objects (`dict`, `list`, `str`, `int`, `float`, `bool`, `None`).
//! And back: a chain given as Python objects becomes a `Value`, which serde
//! deserialises into the library's `Chain` exactly as the command does
//! with the JSON text.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyMapping, PyString, PyTuple};
use serde::Serialize;
use serde_json::{Map, Number, Value};

/// How deep a chain given as Python objects may nest (serde_json's own
/// limit for JSON text): deeper input is refused, never walked.
const MAX_DEPTH: usize = 128;

/// A library document as a `Value` (done without the GIL).
pub fn to_value(doc: &impl Serialize) -> Result<Value, String> {
    serde_json::to_value(doc).map_err(|e| format!("cannot serialise a document: {e}"))
}

/// A `Value` as Python objects; objects become `dict`s with their keys in
/// the document's order.
pub fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, item) in map {
                dict.set_item(k, to_py(py, item)?)?;
            }
            dict.into_any()
        }
    })
}

/// What a caller passed as a chain, made ready for serde without the GIL.
pub enum Input {
    /// JSON text (`str` or `bytes`): parsed by serde_json as the command
    /// parses a chain file, with line and column in its messages.
    Text(Vec<u8>),
    /// A mapping (or any JSON-like Python value), already walked.
    Value(Value),
}

/// Take a chain argument: `str`/`bytes` are JSON text; anything else is
/// walked into a `Value`. The error is the message of a bad-input failure.
pub fn input(obj: &Bound<'_, PyAny>) -> Result<Input, String> {
    if let Ok(s) = obj.cast::<PyString>() {
        let s = s
            .to_cow()
            .map_err(|e| format!("it is not valid UTF-8: {e}"))?;
        return Ok(Input::Text(s.as_bytes().to_vec()));
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Input::Text(b.as_bytes().to_vec()));
    }
    from_py(obj, 0, &mut String::from("chain")).map(Input::Value)
}

/// A Python value as a `Value`; `path` names where the walk is (for the
/// message).
fn from_py(obj: &Bound<'_, PyAny>, depth: usize, path: &mut String) -> Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err(format!("{path} nests deeper than {MAX_DEPTH} levels"));
    }
    if obj.is_none() {
        return Ok(Value::Null);
    }
    // `bool` first: in Python it is a kind of `int`.
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.cast::<PyInt>().is_ok() {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(Value::from(i));
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(Value::from(u));
        }
        return Err(format!("{path} is an integer out of range"));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return Number::from_f64(f.value())
            .map(Value::Number)
            .ok_or_else(|| format!("{path} is not a finite number"));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return s
            .to_cow()
            .map(|s| Value::String(s.to_string()))
            .map_err(|e| format!("{path} is not valid UTF-8: {e}"));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut map = Map::new();
        for (k, v) in d.iter() {
            let key = k
                .cast::<PyString>()
                .map_err(|_| format!("{path} has a key that is not a string: {}", repr(&k)))?
                .to_cow()
                .map_err(|e| format!("{path} has a key that is not valid UTF-8: {e}"))?
                .to_string();
            let len = path.len();
            path.push_str(&format!("[{key:?}]"));
            let value = from_py(&v, depth + 1, path)?;
            path.truncate(len);
            map.insert(key, value);
        }
        return Ok(Value::Object(map));
    }
    if obj.cast::<PyList>().is_ok() || obj.cast::<PyTuple>().is_ok() {
        let mut items = Vec::new();
        for (i, item) in obj.try_iter().map_err(|e| e.to_string())?.enumerate() {
            let item = item.map_err(|e| e.to_string())?;
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            items.push(from_py(&item, depth + 1, path)?);
            path.truncate(len);
        }
        return Ok(Value::Array(items));
    }
    // Any other mapping (`collections.abc.Mapping`): read it as a dict.
    if let Ok(m) = obj.cast::<PyMapping>() {
        let d = PyDict::new(obj.py());
        let items = m.items().map_err(|e| e.to_string())?;
        for pair in items.iter() {
            let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) =
                pair.extract().map_err(|e: PyErr| e.to_string())?;
            d.set_item(k, v).map_err(|e| e.to_string())?;
        }
        return from_py(d.as_any(), depth, path);
    }
    Err(format!(
        "{path} is a Python {} (a chain holds dicts, lists, strings, numbers, booleans and None)",
        type_name(obj)
    ))
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "object".into(), |n| n.to_string())
}

fn repr(obj: &Bound<'_, PyAny>) -> String {
    obj.repr()
        .map_or_else(|_| type_name(obj), |r| r.to_string())
}

/// Deserialise what [`input`] took into a library type (without the GIL).
pub fn deserialize<T: serde::de::DeserializeOwned>(input: Input) -> Result<T, String> {
    match input {
        Input::Text(bytes) => serde_json::from_slice(&bytes).map_err(|e| e.to_string()),
        Input::Value(v) => serde_json::from_value(v).map_err(|e| e.to_string()),
    }
}
