//! ONNX `ModelProto` → [`Graph`]: constants, input shapes, node lowering with
//! static shape inference and constant folding.

use std::collections::HashMap;
use std::path::Path;

use prost::Message;

use super::consts::{decode_tensor, onnx_dtype};
use super::lower::{is_supported, lower_node, Lowered};
use super::proto::{type_proto, ModelProto, NodeProto};
use super::{MAX_OPSET, MIN_OPSET};
use crate::error::{EngineError, Result};
use crate::ir::{DType, Graph, Node, Tensor, TensorId};

/// Shapes for graph inputs whose dimensions the model leaves dynamic
/// (or to override static ones with the same rank), by input name.
pub type InputShapes = HashMap<String, Vec<usize>>;

/// Reads and imports an ONNX file.
pub fn import_file(path: &Path, shapes: &InputShapes) -> Result<Graph> {
    let bytes = std::fs::read(path).map_err(|source| EngineError::Io {
        path: path.display().to_string(),
        error: source,
    })?;
    import(&bytes, shapes)
}

/// The names of a model's real inputs (initializers listed as inputs left
/// out), without importing it.
pub fn input_names(bytes: &[u8]) -> Result<Vec<String>> {
    let model = ModelProto::decode(bytes).map_err(|e| EngineError::Decode(e.to_string()))?;
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| EngineError::model("the file has no graph (is it an ONNX model?)"))?;
    let inits: std::collections::HashSet<&str> = graph
        .initializer
        .iter()
        .filter_map(|i| i.name.as_deref())
        .collect();
    Ok(graph
        .input
        .iter()
        .filter_map(|vi| vi.name.clone())
        .filter(|n| !inits.contains(n.as_str()))
        .collect())
}

/// Imports an ONNX model from bytes.
pub fn import(bytes: &[u8], shapes: &InputShapes) -> Result<Graph> {
    let model = ModelProto::decode(bytes).map_err(|e| EngineError::Decode(e.to_string()))?;
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| EngineError::model("the file has no graph (is it an ONNX model?)"))?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| {
            o.domain.as_deref().unwrap_or("").is_empty() || o.domain.as_deref() == Some("ai.onnx")
        })
        .and_then(|o| o.version)
        .ok_or_else(|| EngineError::model("no default-domain opset import"))?;
    if !(MIN_OPSET..=MAX_OPSET).contains(&opset) {
        return Err(EngineError::model(format!(
            "opset {opset} is not supported (osprey accepts {MIN_OPSET}..={MAX_OPSET})"
        )));
    }

    // Collect every unsupported node before doing anything else.
    let unsupported: Vec<String> = graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| !is_supported(n))
        .map(|(i, n)| {
            let domain = n.domain.as_deref().unwrap_or("");
            format!(
                "op '{}{}' (node '{}', opset {opset})",
                if domain.is_empty() {
                    String::new()
                } else {
                    format!("{domain}.")
                },
                n.op_type.as_deref().unwrap_or("?"),
                node_name(n, i)
            )
        })
        .collect();
    if !unsupported.is_empty() {
        return Err(EngineError::Unsupported {
            count: unsupported.len(),
            list: unsupported.join("; "),
        });
    }

    let mut g = Graph {
        opset,
        ..Graph::default()
    };
    let mut names: HashMap<String, TensorId> = HashMap::new();

    for init in &graph.initializer {
        let name = init.name.clone().unwrap_or_default();
        let v = decode_tensor(init)
            .map_err(|e| EngineError::model(format!("initializer '{name}': {e}")))?;
        let id = g.add_tensor(Tensor {
            name: name.clone(),
            shape: v.shape,
            dtype: v.dtype,
            value: Some(v.data),
        });
        if init.data_type == Some(super::proto::tensor_proto::DataType::Int8 as i32) {
            g.int8_constants.insert(id);
        }
        names.insert(name, id);
    }

    for vi in &graph.input {
        let name = vi.name.clone().unwrap_or_default();
        if names.contains_key(&name) {
            continue; // an initializer listed as input (IR < 4 style)
        }
        let Some(type_proto::Value::TensorType(tt)) =
            vi.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            return Err(EngineError::model(format!(
                "input '{name}' is not a tensor"
            )));
        };
        let dtype = onnx_dtype(tt.elem_type.unwrap_or(0))
            .map_err(|e| EngineError::model(format!("input '{name}' has unsupported type {e}")))?;
        if dtype != DType::F32 {
            return Err(EngineError::model(format!(
                "input '{name}' is {}; osprey models take float32 inputs",
                dtype.name()
            )));
        }
        let dims: Vec<Option<usize>> =
            tt.shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match d.value {
                            Some(super::proto::tensor_shape_proto::dimension::Value::DimValue(
                                v,
                            )) if v > 0 => Some(v as usize),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
        let shape = resolve_input_shape(&name, &dims, shapes.get(&name))?;
        let id = g.add_tensor(Tensor {
            name: name.clone(),
            shape,
            dtype,
            value: None,
        });
        g.inputs.push(id);
        names.insert(name, id);
    }
    for key in shapes.keys() {
        if g.input_id(key).is_none() {
            let known: Vec<&str> = g
                .inputs
                .iter()
                .map(|&i| g.tensors[i].name.as_str())
                .collect();
            return Err(EngineError::Input {
                name: key.clone(),
                msg: format!("no such model input (inputs: {})", known.join(", ")),
            });
        }
    }

    for (i, n) in graph.node.iter().enumerate() {
        let name = node_name(n, i);
        let op_type = n.op_type.clone().unwrap_or_default();
        let node_err = |msg: String| EngineError::Node {
            node: name.clone(),
            op: op_type.clone(),
            msg,
        };
        let mut inputs: Vec<Option<TensorId>> = Vec::with_capacity(n.input.len());
        for inp in &n.input {
            if inp.is_empty() {
                inputs.push(None);
            } else {
                let id = names.get(inp).copied().ok_or_else(|| {
                    node_err(format!("input '{inp}' is not produced by any earlier node"))
                })?;
                inputs.push(Some(id));
            }
        }
        let lowered = lower_node(n, &inputs, &g, opset).map_err(node_err)?;
        if let Some(scale) = super::lower::runtime_qdq_scale(n, &inputs, &g) {
            // QDQ on an activation: the tensor on both sides carries the scale.
            for t in n.input.first().into_iter().chain(n.output.first()) {
                g.quant_scales.entry(t.clone()).or_insert(scale);
            }
        }
        let outputs: Vec<&String> = n.output.iter().collect();
        match lowered {
            Lowered::Const(values) => {
                for (out_name, v) in outputs.iter().zip(values) {
                    if out_name.is_empty() {
                        continue;
                    }
                    let id = g.add_tensor(Tensor {
                        name: (*out_name).clone(),
                        shape: v.shape,
                        dtype: v.dtype,
                        value: Some(v.data),
                    });
                    names.insert((*out_name).clone(), id);
                }
            }
            Lowered::Node {
                op,
                inputs,
                outputs: shapes,
            } => {
                let mut out_ids = Vec::with_capacity(shapes.len());
                for (k, shape) in shapes.into_iter().enumerate() {
                    let out_name = outputs.get(k).map(|s| s.as_str()).unwrap_or("");
                    let tname = if out_name.is_empty() {
                        format!("{name}:out{k}")
                    } else {
                        out_name.to_string()
                    };
                    let id = g.add_tensor(Tensor {
                        name: tname.clone(),
                        shape,
                        dtype: DType::F32,
                        value: None,
                    });
                    if !out_name.is_empty() {
                        names.insert(tname, id);
                    }
                    out_ids.push(id);
                }
                g.nodes.push(Node {
                    name: name.clone(),
                    onnx_op: op_type.clone(),
                    op,
                    inputs,
                    outputs: out_ids,
                });
            }
        }
    }

    for vo in &graph.output {
        let name = vo.name.clone().unwrap_or_default();
        let id = names.get(&name).copied().ok_or_else(|| {
            EngineError::model(format!("graph output '{name}' is never produced"))
        })?;
        if g.tensors[id].dtype != DType::F32 {
            return Err(EngineError::model(format!(
                "graph output '{name}' is {}; osprey produces float32 outputs",
                g.tensors[id].dtype.name()
            )));
        }
        g.outputs.push(id);
    }
    if g.outputs.is_empty() {
        return Err(EngineError::model("the graph has no outputs"));
    }
    g.validate()?;
    Ok(g)
}

fn node_name(n: &NodeProto, i: usize) -> String {
    match n.name.as_deref() {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => format!("#{i}"),
    }
}

fn resolve_input_shape(
    name: &str,
    dims: &[Option<usize>],
    given: Option<&Vec<usize>>,
) -> Result<Vec<usize>> {
    let show = |d: &[Option<usize>]| {
        let parts: Vec<String> = d
            .iter()
            .map(|x| x.map_or("?".to_string(), |v| v.to_string()))
            .collect();
        format!("[{}]", parts.join(","))
    };
    match given {
        Some(g) => {
            if !dims.is_empty() && g.len() != dims.len() {
                return Err(EngineError::Input {
                    name: name.into(),
                    msg: format!(
                        "shape {g:?} has rank {}, the model declares {}",
                        g.len(),
                        show(dims)
                    ),
                });
            }
            for (k, (&want, have)) in g.iter().zip(dims).enumerate() {
                if want == 0 {
                    return Err(EngineError::Input {
                        name: name.into(),
                        msg: format!("dimension {k} is 0"),
                    });
                }
                if let Some(h) = have {
                    if *h != want {
                        return Err(EngineError::Input {
                            name: name.into(),
                            msg: format!("shape {g:?} conflicts with the model's {}", show(dims)),
                        });
                    }
                }
            }
            Ok(g.clone())
        }
        None => dims
            .iter()
            .copied()
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| EngineError::Input {
                name: name.into(),
                msg: format!(
                    "the model leaves its shape {} dynamic; give it, e.g. --input-shape {name}={}",
                    show(dims),
                    dims.iter()
                        .map(|d| d.map_or("1".to_string(), |v| v.to_string()))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            }),
    }
}
