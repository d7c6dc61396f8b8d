//! Helpers for this crate's unit tests.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The ONNX Runtime library: `ORT_DYLIB_PATH`, else the repository's `.ort/` folder
/// (scripts/fetch-ort.sh fills it).
pub(crate) fn ort_lib() -> PathBuf {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return PathBuf::from(path);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.ort");
    std::fs::read_dir(&dir)
        .ok()
        .and_then(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so."))
                })
        })
        .unwrap_or_else(|| panic!("no ONNX Runtime library: set ORT_DYLIB_PATH or run scripts/fetch-ort.sh (looked in {})", dir.display()))
}

/// A fresh empty directory under the system's temporary directory.
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
pub(crate) fn new_graph() -> ort::editor::Graph {
    crate::model::environment(&ort_lib()).unwrap();
    ort::editor::Graph::new().unwrap()
}

/// Loads `path` on the CPU with one intra-op thread, as the unit tests run models.
pub(crate) fn load_cpu(path: &std::path::Path) -> crate::model::Model {
    crate::model::Model::load(&crate::model::LoadOptions {
        path: path.to_path_buf(),
        ort_lib: ort_lib(),
        device: crate::config::DeviceChoice::Cpu,
        threads: Some(1),
    })
    .expect("load the test model")
}
