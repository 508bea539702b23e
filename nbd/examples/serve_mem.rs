//! Serves in-memory exports over TCP for trying real clients against the library.
//!
//! ```text
//! cargo run -p twinblock-nbd --release --example serve_mem -- 10809 [size_mib] [--multi-conn]
//! nbdinfo --list nbd://127.0.0.1:10809
//! qemu-io -f raw -c 'write -P 0xab 0 64k' nbd://127.0.0.1:10809/mem
//! ```
//!
//! Two exports: `mem` (the default, also reachable as the empty name) and `ro`, a read-only
//! 1 MiB export. Ctrl-C stops the server.

use std::sync::Arc;

use anyhow::Context;
use twinblock_nbd::mem::MemDevice;
use twinblock_nbd::{DeviceCaps, Export, Server, ServerConfig};

const DEFAULT_SIZE_MIB: usize = 256;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port: u16 = args
        .first()
        .context("usage: serve_mem PORT [SIZE_MIB] [--multi-conn]")?
        .parse()
        .context("PORT must be a number from 1 to 65535")?;
    let size_mib: usize = match args.get(1).filter(|a| !a.starts_with("--")) {
        Some(s) => s.parse().context("SIZE_MIB must be a number")?,
        None => DEFAULT_SIZE_MIB,
    };
    let multi_conn = args.iter().any(|a| a == "--multi-conn");

    let server = Server::new(ServerConfig::default());
    let caps = DeviceCaps {
        multi_conn,
        fast_zero: true,
        ..DeviceCaps::default()
    };
    server.add_export(Export {
        name: "mem".into(),
        description: format!("{size_mib} MiB in-memory disk"),
        device: Arc::new(MemDevice::with_caps(size_mib << 20, caps)),
    })?;
    server.add_export(Export {
        name: "ro".into(),
        description: "1 MiB read-only disk".into(),
        device: Arc::new(MemDevice::with_caps(
            1 << 20,
            DeviceCaps {
                read_only: true,
                ..DeviceCaps::default()
            },
        )),
    })?;
    server.set_default_export(Some("mem".into()))?;

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
    tracing::info!("serving nbd://127.0.0.1:{port}/mem ({size_mib} MiB) and /ro");
    server
        .serve_tcp(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving NBD")?;
    Ok(())
}
