//! `--model`: items shaped from the model file match what a worker serving it expects.
//! Only with the `onnx` feature, which `--model` needs.
#![cfg(feature = "onnx")]
// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use tidepool_load::input::{inputs_of_model, InputSpec};
use tidepool_load::Error;
use tidepool_protocol::DType;
use tidepool_tests::worker::{ort_lib, TinyModel};

#[test]
fn inputs_come_from_the_model_without_the_batch_dimension() {
    let model = TinyModel {
        input_dim: 12,
        ..TinyModel::default()
    }
    .write();
    let inputs = inputs_of_model(&model, &ort_lib()).unwrap();
    assert_eq!(
        inputs,
        vec![InputSpec {
            name: "input".to_owned(),
            dtype: DType::F32,
            shape: vec![12],
        }]
    );
}

#[test]
fn a_missing_model_is_a_clear_error() {
    let err =
        inputs_of_model(std::path::Path::new("/nonexistent/model.onnx"), &ort_lib()).unwrap_err();
    assert!(matches!(err, Error::Model { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/model.onnx"), "{err}");
}
