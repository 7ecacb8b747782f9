//! Frames over TCP: a connection that reads and writes whole frames within a size bound, the
//! server accept loop (pipelined requests, bounded), and a simple request/response client.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore};

use crate::protocol::{decode_body, decode_frame, encode_body, Frame, FrameKind, Request, Response, FRAME_BYTES_MAX_DEFAULT};

/// Connections a server accepts at once.
pub const CONNECTIONS_MAX: usize = 1024;
/// Requests of one connection handled at once (pipelining depth).
pub const IN_FLIGHT_PER_CONNECTION_MAX: usize = 256;

/// Reads whole frames, never buffering more than one frame's worth.
pub struct FrameReader {
    stream: OwnedReadHalf,
    buf: Vec<u8>,
    frame_bytes_max: usize,
}

impl FrameReader {
    pub fn new(stream: OwnedReadHalf, frame_bytes_max: usize) -> FrameReader {
        FrameReader { stream, buf: Vec::with_capacity(64 * 1024), frame_bytes_max }
    }

    /// The next frame; `Ok(None)` at a clean end of stream.
    pub async fn read_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            match decode_frame(&self.buf, self.frame_bytes_max) {
                Ok(Some((frame, used))) => {
                    self.buf.drain(..used);
                    return Ok(Some(frame));
                }
                Ok(None) => {}
                Err(err) => return Err(io::Error::new(io::ErrorKind::InvalidData, err)),
            }
            let mut chunk = [0u8; 64 * 1024];
            let read = self.stream.read(&mut chunk).await?;
            if read == 0 {
                return match self.buf.is_empty() {
                    true => Ok(None),
                    false => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a frame")),
                };
            }
            self.buf.extend_from_slice(&chunk[..read]);
        }
    }
}

async fn write_frame(writer: &Mutex<OwnedWriteHalf>, frame: &Frame) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(frame.body.len() + 18);
    frame.encode(&mut bytes);
    writer.lock().await.write_all(&bytes).await
}

/// Answers requests.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> impl std::future::Future<Output = Response> + Send;
}

/// Accepts connections until the listener fails; each connection's requests are handled
/// concurrently (up to IN_FLIGHT_PER_CONNECTION_MAX) and answered with their request ids.
pub async fn serve<H: Handler>(listener: TcpListener, handler: Arc<H>) {
    let connections = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection refused: {CONNECTIONS_MAX} connections already open");
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(err) = serve_connection(stream, handler).await {
                tracing::info!(%peer, %err, "connection closed");
            }
        });
    }
}

async fn serve_connection<H: Handler>(stream: TcpStream, handler: Arc<H>) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let (read, write) = stream.into_split();
    let writer = Arc::new(Mutex::new(write));
    let mut reader = FrameReader::new(read, FRAME_BYTES_MAX_DEFAULT);
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT_PER_CONNECTION_MAX));
    while let Some(frame) = reader.read_frame().await? {
        if frame.kind != FrameKind::Request {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "a client sent a response frame"));
        }
        let request: Request = decode_body(&frame.body, FRAME_BYTES_MAX_DEFAULT).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let permit = in_flight.clone().acquire_owned().await.expect("never closed");
        let (handler, writer) = (handler.clone(), writer.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let response = handler.handle(request).await;
            let body = encode_body(&response, FRAME_BYTES_MAX_DEFAULT).unwrap_or_else(|e| {
                let error = Response::Error(crate::protocol::ErrorReply::Internal(e));
                encode_body(&error, FRAME_BYTES_MAX_DEFAULT).expect("a short error fits")
            });
            let reply = Frame { kind: FrameKind::Response, request_id: frame.request_id, body };
            if let Err(err) = write_frame(&writer, &reply).await {
                tracing::debug!(%err, "could not write a response");
            }
        });
    }
    Ok(())
}

/// One connection to a server, used for one request at a time (callers that want parallel
/// requests open several).
pub struct Connection {
    addr: String,
    stream: Option<(FrameReader, Mutex<OwnedWriteHalf>)>,
    next_id: AtomicU64,
}

impl Connection {
    pub fn new(addr: impl Into<String>) -> Connection {
        Connection { addr: addr.into(), stream: None, next_id: AtomicU64::new(1) }
    }

    /// Sends `request` and waits for its response, within `timeout`. Any error drops the
    /// connection (the next call reconnects).
    pub async fn call(&mut self, request: &Request, timeout: Duration) -> io::Result<Response> {
        let result = tokio::time::timeout(timeout, self.call_inner(request)).await;
        let result = result.unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "request timed out")));
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn call_inner(&mut self, request: &Request) -> io::Result<Response> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(&self.addr).await?;
            stream.set_nodelay(true)?;
            let (read, write) = stream.into_split();
            self.stream = Some((FrameReader::new(read, FRAME_BYTES_MAX_DEFAULT), Mutex::new(write)));
        }
        let (reader, writer) = self.stream.as_mut().expect("connected above");
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = encode_body(request, FRAME_BYTES_MAX_DEFAULT).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        write_frame(writer, &Frame { kind: FrameKind::Request, request_id, body }).await?;
        let frame = reader.read_frame().await?.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection"))?;
        if frame.request_id != request_id || frame.kind != FrameKind::Response {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "response to another request"));
        }
        decode_body(&frame.body, FRAME_BYTES_MAX_DEFAULT).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}
