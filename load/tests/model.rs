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

#[tokio::test]
async fn from_metadata_shapes_mixed_length_items_that_a_text_worker_accepts() {
    use std::time::Duration;
    use tidepool_load::{run, LoadConfig};
    use tidepool_tests::worker::{scratch_dir, start_worker, worker_config};
    use tidepool_worker::test_support::{write_test_model, TestModel};

    let path = scratch_dir("load-encoder").join("encoder.onnx");
    write_test_model(TestModel::Encoder, &path);
    let worker = start_worker(worker_config(&path)).await;
    let mut config = LoadConfig::new(worker.local_addr().to_string());
    config.from_metadata = true;
    config.lengths = (2, 30);
    config.rate = 100.0;
    config.duration = Duration::from_secs(1);
    let report = run(config, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    assert!(report.sent > 50, "{}", report.sent);
    assert_eq!(report.ok(), report.sent, "every item fit the model");
    assert_eq!(
        report.info.inputs,
        vec![
            "input_ids:i64:2..30".to_owned(),
            "attention_mask:i64:2..30".to_owned()
        ]
    );
    worker.shutdown().await.unwrap();
}
