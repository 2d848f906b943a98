//! The reference: the echo server a Rust developer would write with tokio instead of
//! preforkd (multi-threaded runtime, one task per connection, TCP_NODELAY, 16 KiB buffer).
//! Prints `listening on ADDR` once bound. Usage: `tokio-echo 127.0.0.1:PORT`, or
//! `tokio-echo unix:/path` for a Unix-domain socket (a stale file there is replaced).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};

/// Echoes until the peer closes.
async fn echo(mut socket: impl AsyncRead + AsyncWrite + Unpin) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match socket.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if socket.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let address = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".into());
    if let Some(path) = address.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        println!("listening on unix:{path}");
        loop {
            let (socket, _) = listener.accept().await?;
            tokio::spawn(echo(socket));
        }
    }
    let listener = TcpListener::bind(&address).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (socket, _) = listener.accept().await?;
        let _ = socket.set_nodelay(true);
        tokio::spawn(echo(socket));
    }
}
