//! A small builder for ONNX models, used by tests and tools to make models in
//! code (so the test suite runs without any model files).

use prost::Message;

use super::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

/// Builds a single-graph ONNX model.
#[derive(Clone, Debug, Default)]
pub struct ModelBuilder {
    graph: GraphProto,
    opset: i64,
}

impl ModelBuilder {
    /// An empty model for the given default-domain opset.
    pub fn new(opset: i64) -> Self {
        ModelBuilder {
            graph: GraphProto {
                name: Some("osprey-test".into()),
                ..Default::default()
            },
            opset,
        }
    }

    /// Declares a float32 graph input; a negative dimension is dynamic.
    pub fn input(&mut self, name: &str, shape: &[i64]) -> &mut Self {
        self.graph
            .input
            .push(value_info(name, shape, DataType::Float));
        self
    }

    /// Declares a graph output.
    pub fn output(&mut self, name: &str) -> &mut Self {
        self.graph.output.push(ValueInfoProto {
            name: Some(name.into()),
            ..Default::default()
        });
        self
    }

    /// Adds a float32 initializer.
    pub fn init_f32(&mut self, name: &str, shape: &[usize], data: &[f32]) -> &mut Self {
        self.graph.initializer.push(tensor_f32(name, shape, data));
        self
    }

    /// Adds an int64 initializer.
    pub fn init_i64(&mut self, name: &str, shape: &[usize], data: &[i64]) -> &mut Self {
        self.graph.initializer.push(TensorProto {
            name: Some(name.into()),
            dims: shape.iter().map(|&d| d as i64).collect(),
            data_type: Some(DataType::Int64 as i32),
            int64_data: data.to_vec(),
            ..Default::default()
        });
        self
    }

    /// Adds an INT8 initializer (e.g. QDQ weights or zero points).
    pub fn init_i8(&mut self, name: &str, shape: &[usize], data: &[i8]) -> &mut Self {
        self.graph.initializer.push(TensorProto {
            name: Some(name.into()),
            dims: shape.iter().map(|&d| d as i64).collect(),
            data_type: Some(DataType::Int8 as i32),
            raw_data: Some(data.iter().map(|&v| v as u8).collect()),
            ..Default::default()
        });
        self
    }

    /// Adds a UINT8 initializer (e.g. asymmetric QDQ zero points).
    pub fn init_u8(&mut self, name: &str, shape: &[usize], data: &[u8]) -> &mut Self {
        self.graph.initializer.push(TensorProto {
            name: Some(name.into()),
            dims: shape.iter().map(|&d| d as i64).collect(),
            data_type: Some(DataType::Uint8 as i32),
            raw_data: Some(data.to_vec()),
            ..Default::default()
        });
        self
    }

    /// Adds a node.
    pub fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<AttributeProto>,
    ) -> &mut Self {
        let name = format!("{}_{}", op.to_lowercase(), self.graph.node.len());
        self.graph.node.push(NodeProto {
            name: Some(name),
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attrs,
            ..Default::default()
        });
        self
    }

    /// The model as a protobuf message.
    pub fn model(&self) -> ModelProto {
        ModelProto {
            ir_version: Some(8),
            producer_name: Some("osprey".into()),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(self.opset),
            }],
            graph: Some(self.graph.clone()),
            ..Default::default()
        }
    }

    /// The model serialised.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.model().encode_to_vec()
    }
}

fn value_info(name: &str, shape: &[i64], dt: DataType) -> ValueInfoProto {
    let dims = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| tensor_shape_proto::Dimension {
            value: Some(if d >= 0 {
                tensor_shape_proto::dimension::Value::DimValue(d)
            } else {
                tensor_shape_proto::dimension::Value::DimParam(format!("d{i}"))
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(dt as i32),
                shape: Some(TensorShapeProto { dim: dims }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A float32 tensor stored as raw little-endian bytes.
pub fn tensor_f32(name: &str, shape: &[usize], data: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: shape.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// An integer attribute.
pub fn attr_i(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        i: Some(v),
        r#type: Some(AttributeType::Int as i32),
        ..Default::default()
    }
}

/// An integer-list attribute.
pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        ints: v.to_vec(),
        r#type: Some(AttributeType::Ints as i32),
        ..Default::default()
    }
}

/// A float attribute.
pub fn attr_f(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        f: Some(v),
        r#type: Some(AttributeType::Float as i32),
        ..Default::default()
    }
}

/// A string attribute.
pub fn attr_s(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        s: Some(v.as_bytes().to_vec()),
        r#type: Some(AttributeType::String as i32),
        ..Default::default()
    }
}

/// A tensor attribute (as `Constant` nodes use).
pub fn attr_t(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        t: Some(t),
        r#type: Some(AttributeType::Tensor as i32),
        ..Default::default()
    }
}
