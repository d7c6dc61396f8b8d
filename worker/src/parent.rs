//! `--exit-with-parent`: drain and exit when the process that started the worker is gone.
//!
//! The parent starts the worker with its standard input the read end of a pipe, keeps the write
//! end open and never writes to it. However the parent ends (exit, crash, SIGKILL), the kernel
//! closes its end, and the worker's read of stdin returns end of file. That is portable (no
//! `prctl`), needs no polling, and sees through a shell or `exec` wrapper as long as the pipe is
//! passed on.
//!
//! The write end must not leak into other processes, or they would keep it open: Rust's
//! `Stdio::piped()` (what a balancer's actuator uses) opens pipes close-on-exec, so only the
//! parent holds it. A parent in Rust does:
//! ```no_run
//! use std::process::{Command, Stdio};
//! let mut child = Command::new("tidepool-worker")
//!     .args(["serve", "--model", "model.onnx", "--exit-with-parent"])
//!     .stdin(Stdio::piped())
//!     .spawn()?;
//! // Keep this for as long as the worker should live; dropping it stops the worker too.
//! let lifeline = child.stdin.take();
//! # drop(lifeline);
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io::Read as _;
use std::os::unix::fs::FileTypeExt as _;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// True when standard input is a pipe or a socket: something whose end of file means the
/// other side closed it (a terminal or `/dev/null` does not).
pub fn stdin_is_a_pipe() -> bool {
    use std::os::fd::AsFd as _;
    let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .map(|m| m.file_type().is_fifo() || m.file_type().is_socket())
        .unwrap_or(false)
}

/// Cancels `shutdown` when standard input reaches end of file (or fails), from a thread of its
/// own. A plain thread, not the runtime's blocking pool: a read of stdin cannot be interrupted,
/// and the process must be able to exit while it is still blocked there. Whatever the parent
/// writes is read and ignored.
pub fn exit_with_parent(shutdown: CancellationToken) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("tidepool-parent".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 256];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => {
                        info!("standard input closed: the parent process is gone; draining");
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        warn!(error = %e, "reading standard input failed; treating the parent as gone");
                        break;
                    }
                }
            }
            shutdown.cancel();
        })
        .map(drop)
}
