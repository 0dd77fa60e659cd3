//! Flattening TorchScript return values into an ordered list of tensors.

use tch::{IValue, Tensor};

use crate::error::{Error, Result};

/// One output tensor and where it came from: `"0"` for a plain tensor,
/// `"1"` for the second element of a tuple, `"logits"` for a dict key, and
/// `"1.logits"` for nested containers.
pub(crate) fn flatten(value: IValue) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    walk(value, String::new(), true, &mut out)?;
    Ok(out)
}

fn join(prefix: &str, part: &str) -> String {
    if prefix.is_empty() {
        part.to_string()
    } else {
        format!("{prefix}.{part}")
    }
}

fn walk(value: IValue, name: String, top: bool, out: &mut Vec<(String, Tensor)>) -> Result<()> {
    match value {
        IValue::Tensor(t) => {
            let name = if top { "0".to_string() } else { name };
            out.push((name, t));
        }
        IValue::Tuple(items) | IValue::GenericList(items) => {
            for (i, item) in items.into_iter().enumerate() {
                walk(item, join(&name, &i.to_string()), false, out)?;
            }
        }
        IValue::TensorList(items) => {
            for (i, t) in items.into_iter().enumerate() {
                out.push((join(&name, &i.to_string()), t));
            }
        }
        IValue::GenericDict(items) => {
            for (i, (key, item)) in items.into_iter().enumerate() {
                let key = match key {
                    IValue::String(s) => s,
                    IValue::Int(k) => k.to_string(),
                    _ => i.to_string(),
                };
                walk(item, join(&name, &key), false, out)?;
            }
        }
        other => {
            return Err(Error::UnsupportedOutput {
                kind: kind_name(&other).to_string(),
            })
        }
    }
    Ok(())
}

pub(crate) fn kind_name(v: &IValue) -> &'static str {
    match v {
        IValue::None => "None",
        IValue::Tensor(_) => "Tensor",
        IValue::Double(_) => "float",
        IValue::Int(_) => "int",
        IValue::Bool(_) => "bool",
        IValue::Tuple(_) => "tuple",
        IValue::IntList(_) => "List[int]",
        IValue::DoubleList(_) => "List[float]",
        IValue::BoolList(_) => "List[bool]",
        IValue::String(_) => "str",
        IValue::StringList(_) => "List[str]",
        IValue::TensorList(_) => "List[Tensor]",
        IValue::GenericList(_) => "list",
        IValue::GenericDict(_) => "dict",
        IValue::Object(_) => "object",
        IValue::Device(_) => "device",
        _ => "unknown value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_containers_flatten_in_order_with_names() {
        let t = || Tensor::from(1.0f32);
        let v = IValue::Tuple(vec![
            IValue::Tensor(t()),
            IValue::GenericDict(vec![
                (IValue::String("a".into()), IValue::Tensor(t())),
                (
                    IValue::String("b".into()),
                    IValue::TensorList(vec![t(), t()]),
                ),
            ]),
        ]);
        let names: Vec<_> = flatten(v).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["0", "1.a", "1.b.0", "1.b.1"]);
        assert_eq!(flatten(IValue::Tensor(t())).unwrap()[0].0, "0");
    }

    #[test]
    fn non_tensor_outputs_are_typed_errors() {
        let e = flatten(IValue::Tuple(vec![IValue::String("x".into())])).unwrap_err();
        assert!(matches!(e, Error::UnsupportedOutput { ref kind } if kind == "str"));
    }
}
