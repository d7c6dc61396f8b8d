//! The write-burst size shared by the balancer's two writers (to clients in
//! `frontend.rs`, to targets in `upstream.rs`).
//!
//! Both writers encode everything queued for their socket into one buffer and write it
//! with one syscall. Past this many buffered bytes a burst is written before more frames
//! are taken, so that one busy writer neither holds a large buffer nor delays the first
//! frame of a burst for long. One constant, so that the two sides cannot drift apart.

/// Past this many buffered bytes a burst is written before more frames are taken.
pub(crate) const WRITE_BURST: usize = 64 * 1024;

/// Writes one burst of encoded frames and flushes it: a TLS stream may keep records in
/// its buffer until flushed; a TCP stream's flush does nothing.
pub(crate) async fn write_burst<W>(socket: &mut W, buf: &[u8]) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    socket.write_all(buf).await?;
    socket.flush().await
}
