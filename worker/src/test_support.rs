//! Helpers for tests: [`ort_lib`], shared with the `tidepool-tests` harness through the
//! `test-support` feature, and the crate-private helpers of this crate's own unit tests.

use std::path::PathBuf;
#[cfg(test)]
use std::sync::atomic::{AtomicUsize, Ordering};

/// The ONNX Runtime library for tests: `ORT_DYLIB_PATH`, else `libonnxruntime.so.*` in the
/// repository's `.ort/` folder (`make ort` or scripts/fetch-ort.sh fills it). Panics with the
/// command to run when there is none.
///
/// The one lookup every test uses: this crate's unit tests, and the `tidepool-tests` harness
/// (which enables the `test-support` feature and re-exports it). The worker binary itself
/// never guesses: it takes `--ort-lib` or `ORT_DYLIB_PATH`.
pub fn ort_lib() -> PathBuf {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return PathBuf::from(path);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.ort");
    std::fs::read_dir(&dir)
        .ok()
        .and_then(|entries| {
            entries.filter_map(Result::ok).map(|e| e.path()).find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so."))
            })
        })
        .unwrap_or_else(|| {
            panic!(
                "no ONNX Runtime library: set ORT_DYLIB_PATH or run `make ort` (looked in {})",
                dir.display()
            )
        })
}

/// A fresh empty directory under the system's temporary directory.
#[cfg(test)]
pub(crate) fn scratch_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tidepool-worker-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a model built with `ort::editor` to `path` (no optimisation, weights inline).
#[cfg(test)]
pub(crate) fn write_graph(path: &std::path::Path, graph: ort::editor::Graph) {
    use ort::editor::{Model, Opset, ONNX_DOMAIN};
    use ort::session::builder::GraphOptimizationLevel;
    let env = crate::model::environment(&ort_lib()).unwrap();
    let mut model = Model::new([Opset::new(ONNX_DOMAIN, 17).unwrap()]).unwrap();
    model.set_graph(graph).unwrap();
    let builder = ort::session::Session::builder(&env)
        .unwrap()
        .with_optimization_level(GraphOptimizationLevel::Disable)
        .unwrap()
        .with_optimized_model_path(path)
        .unwrap();
    drop(model.into_session(&builder).unwrap());
}

/// A graph input or output of type `ty` and shape `dims` (-1: dynamic). Loads ONNX Runtime
/// first: any ort call before that would look for a library on the default path.
#[cfg(test)]
pub(crate) fn outlet(
    name: &str,
    ty: ort::value::TensorElementType,
    dims: &[i64],
) -> ort::value::Outlet {
    crate::model::environment(&ort_lib()).unwrap();
    ort::value::Outlet::new(
        name,
        ort::value::ValueType::Tensor {
            ty,
            shape: ort::value::Shape::new(dims.iter().copied()),
            dimension_symbols: ort::value::SymbolicDimensions::empty(dims.len()),
        },
    )
}

/// An empty editor graph, with ONNX Runtime loaded first.
#[cfg(test)]
pub(crate) fn new_graph() -> ort::editor::Graph {
    crate::model::environment(&ort_lib()).unwrap();
    ort::editor::Graph::new().unwrap()
}

/// Loads `path` on the CPU with one intra-op thread, as the unit tests run models.
#[cfg(test)]
pub(crate) fn load_cpu(path: &std::path::Path) -> crate::model::Model {
    crate::model::Model::load(&crate::model::LoadOptions {
        path: path.to_path_buf(),
        ort_lib: ort_lib(),
        device: crate::config::DeviceChoice::Cpu,
        threads: Some(1),
    })
    .expect("load the test model")
}
