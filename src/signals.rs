//! Shutdown on SIGINT or SIGTERM.

/// A future that resolves when the process receives SIGINT (Ctrl-C) or SIGTERM. The handlers
/// are installed when this is called, not when the future is first polled: a daemon that says
/// it is ready before it polls this (systemd's `READY=1`) must already catch a SIGTERM sent right
/// after that, or the default action would kill it without a clean stop. Call it inside a tokio
/// runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                tracing::warn!("cannot install signal handlers; waiting for Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
