//! Frames over TCP: a connection that reads and writes whole frames within a size bound, the
//! server accept loop (pipelined requests, bounded), a simple request/response client
//! (`Connection`), and a connection many tasks share (`SharedConnection`: the Raft traffic of
//! every group between two nodes).
//!
//! Both the server and `SharedConnection` write through a `FrameWriter`: a frame sent while
//! nothing is queued is written at once by its sender; otherwise one writer task per
//! connection sends every frame queued at that moment with one write: the messages of many
//! groups to the same peer, and their answers, then cost one system call instead of one each.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, Mutex, Semaphore};

use crate::protocol::{decode_body, decode_frame, encode_body, Frame, FrameKind, Request, Response, FRAME_BYTES_MAX_DEFAULT};

/// Connections a server accepts at once.
pub const CONNECTIONS_MAX: usize = 1024;
/// Requests of one connection handled at once (pipelining depth).
pub const IN_FLIGHT_PER_CONNECTION_MAX: usize = 256;
/// A shared connection that has received nothing for this long while a call timed out is
/// given up and reopened by the next call: after a network cut heals, a fresh connection
/// works at once, while the old one may wait out TCP's retransmission backoff.
const SILENT_CONNECTION_GIVE_UP: Duration = Duration::from_secs(2);
/// A writer task gathers queued frames into one write up to this many bytes.
const COALESCED_WRITE_BYTES_MAX: usize = 1 << 20;

/// Reads whole frames: every frame already received is taken from the buffer before the next
/// read, and a read adds at most `READ_BYTES` (so the buffer stays within a frame plus that).
pub struct FrameReader {
    stream: OwnedReadHalf,
    buf: Vec<u8>,
    /// Where the unparsed bytes of `buf` start.
    start: usize,
    frame_bytes_max: usize,
}

/// Bytes asked of the socket per read.
const READ_BYTES: usize = 64 * 1024;

impl FrameReader {
    pub fn new(stream: OwnedReadHalf, frame_bytes_max: usize) -> FrameReader {
        FrameReader { stream, buf: Vec::with_capacity(READ_BYTES), start: 0, frame_bytes_max }
    }

    /// The next frame; `Ok(None)` at a clean end of stream.
    pub async fn read_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            match decode_frame(&self.buf[self.start..], self.frame_bytes_max) {
                Ok(Some((frame, used))) => {
                    self.start += used;
                    return Ok(Some(frame));
                }
                Ok(None) => {}
                Err(err) => return Err(io::Error::new(io::ErrorKind::InvalidData, err)),
            }
            // Parsed bytes are dropped before reading more (one move of the partial frame).
            self.buf.drain(..self.start);
            self.start = 0;
            self.buf.reserve(READ_BYTES);
            let read = (&mut self.stream).take(READ_BYTES as u64).read_buf(&mut self.buf).await?;
            if read == 0 {
                return match self.buf.is_empty() {
                    true => Ok(None),
                    false => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a frame")),
                };
            }
        }
    }
}

async fn write_frame(writer: &Mutex<OwnedWriteHalf>, frame: &Frame) -> io::Result<()> {
    writer.lock().await.write_all(&encode_frame(frame)).await
}

fn encode_frame(frame: &Frame) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(frame.body.len() + crate::protocol::frame::FRAME_HEADER_BYTES);
    frame.encode(&mut bytes);
    bytes
}

/// Writes frames to one connection for many tasks. A frame sent while nothing is queued is
/// written at once by its sender, with a non-blocking write: no hand-off to another task, which
/// on a small machine costs a wake-up and often a context switch per message. What the socket
/// does not take at once, and every frame sent while bytes are queued, goes to the connection's
/// writer task, which writes everything queued at that moment with one write (the messages of
/// many groups to one peer then cost one system call). Frames go out in the order they were
/// sent. The writer task ends, and the write half closes, when the last `FrameWriter` is gone.
#[derive(Clone)]
pub(crate) struct FrameWriter {
    shared: Arc<WriterShared>,
}

struct WriterShared {
    stream: OwnedWriteHalf,
    state: std::sync::Mutex<WriterState>,
    /// Wakes the writer task: bytes were queued, or the last sender is gone.
    wake: Arc<tokio::sync::Notify>,
    on_error: std::sync::Mutex<Option<OnError>>,
}

/// What a connection's writer calls once when writing fails.
type OnError = Box<dyn FnOnce(io::Error) + Send>;

#[derive(Default)]
struct WriterState {
    /// Bytes waiting for the writer task, in order.
    queued: Vec<u8>,
    /// The writer task has bytes to write (queued or being written): senders must queue.
    busy: bool,
    /// A write failed: nothing more is sent.
    failed: bool,
}

impl Drop for WriterShared {
    fn drop(&mut self) {
        self.wake.notify_one();
    }
}

impl WriterShared {
    fn fail(&self, err: io::Error) {
        self.state.lock().unwrap().failed = true;
        if let Some(on_error) = self.on_error.lock().unwrap().take() {
            on_error(err);
        }
    }
}

impl FrameWriter {
    /// Starts the writer task of `stream`; `on_error` runs once, at the first failed write.
    fn spawn(stream: OwnedWriteHalf, on_error: impl FnOnce(io::Error) + Send + 'static) -> FrameWriter {
        let wake = Arc::new(tokio::sync::Notify::new());
        let shared =
            Arc::new(WriterShared { stream, state: Default::default(), wake: wake.clone(), on_error: std::sync::Mutex::new(Some(Box::new(on_error))) });
        tokio::spawn(write_queued(Arc::downgrade(&shared), wake));
        FrameWriter { shared }
    }

    /// Sends one encoded frame (written now, or queued). Err once a write has failed.
    pub(crate) fn send(&self, bytes: Vec<u8>) -> Result<(), ()> {
        let mut state = self.shared.state.lock().unwrap();
        if state.failed {
            return Err(());
        }
        if state.busy {
            state.queued.extend_from_slice(&bytes);
            return Ok(());
        }
        let written = match self.shared.stream.try_write(&bytes) {
            Ok(written) => written,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
            Err(err) => {
                drop(state);
                self.shared.fail(err);
                return Err(());
            }
        };
        if written < bytes.len() {
            state.queued.extend_from_slice(&bytes[written..]);
            state.busy = true;
            self.shared.wake.notify_one();
        }
        Ok(())
    }
}

/// The writer task: writes what is queued, everything queued at the moment in one write, until
/// the last sender is gone or a write fails.
async fn write_queued(shared: std::sync::Weak<WriterShared>, wake: Arc<tokio::sync::Notify>) {
    loop {
        wake.notified().await;
        let Some(writer) = shared.upgrade() else { return };
        loop {
            let batch = {
                let mut state = writer.state.lock().unwrap();
                if state.queued.is_empty() || state.failed {
                    state.busy = false;
                    break;
                }
                let take = state.queued.len().min(COALESCED_WRITE_BYTES_MAX);
                state.queued.drain(..take).collect::<Vec<u8>>()
            };
            let mut at = 0;
            while at < batch.len() {
                let written = match writer.stream.writable().await {
                    Ok(()) => match writer.stream.try_write(&batch[at..]) {
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                        other => other,
                    },
                    Err(err) => Err(err),
                };
                match written {
                    Ok(0) => return writer.fail(io::Error::new(io::ErrorKind::WriteZero, "the connection took no bytes")),
                    Ok(written) => at += written,
                    Err(err) => return writer.fail(err),
                }
            }
        }
    }
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
    // (Each queued response is one request's, and requests in flight are bounded: the queue is.)
    let writer = FrameWriter::spawn(write, |err| tracing::debug!(%err, "could not write responses"));
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
            // A closed queue means the connection failed; the reader sees that too.
            let _ = writer.send(encode_frame(&reply));
        });
    }
    Ok(())
}

/// One connection to a server, used for one request at a time (callers that want parallel
/// requests open several).
pub struct Connection {
    addr: String,
    source: Option<IpAddr>,
    stream: Option<(FrameReader, Mutex<OwnedWriteHalf>)>,
    next_id: AtomicU64,
}

impl Connection {
    pub fn new(addr: impl Into<String>) -> Connection {
        Connection { addr: addr.into(), source: None, stream: None, next_id: AtomicU64::new(1) }
    }

    /// Connections leave from `source` (port chosen by the kernel) when it is set.
    pub fn from_source(mut self, source: Option<IpAddr>) -> Connection {
        self.source = source;
        self
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
            let stream = connect(&self.addr, self.source).await?;
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

type Waiting = HashMap<u64, oneshot::Sender<io::Result<Response>>>;

/// One TCP connection shared by every task that calls through it: requests are pipelined (one
/// writer task sends what is queued in one write, one reader task hands each response to its
/// caller by request id). A failed connection fails every call waiting on it, and the next call
/// reconnects; a call that times out gives up alone (its late answer is dropped), so one slow
/// request does not cut off the others.
pub struct SharedConnection {
    addr: String,
    source: Option<IpAddr>,
    live: Mutex<Option<Arc<Live>>>,
    next_id: AtomicU64,
}

struct Live {
    writer: FrameWriter,
    opened: tokio::time::Instant,
    /// Milliseconds after `opened` when the last response arrived.
    last_received_ms: AtomicU64,
    /// Tells the reader task to stop (the writer stops when the `Live` is dropped).
    given_up: Arc<tokio::sync::Notify>,
    /// Callers waiting for answers; `None` once the connection failed.
    waiting: std::sync::Mutex<Option<Waiting>>,
}

impl Live {
    /// Fails every waiting call and refuses new ones; the connection's reader stops.
    fn fail(&self, err: &io::Error) {
        self.given_up.notify_one();
        if let Some(waiting) = self.waiting.lock().unwrap().take() {
            for (_, caller) in waiting {
                let _ = caller.send(Err(io::Error::new(err.kind(), err.to_string())));
            }
        }
    }

    fn is_failed(&self) -> bool {
        self.waiting.lock().unwrap().is_none()
    }

    fn note_received(&self) {
        self.last_received_ms.store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        self.opened.elapsed().saturating_sub(Duration::from_millis(self.last_received_ms.load(Ordering::Relaxed)))
    }
}

impl SharedConnection {
    pub fn new(addr: impl Into<String>) -> SharedConnection {
        SharedConnection { addr: addr.into(), source: None, live: Mutex::new(None), next_id: AtomicU64::new(1) }
    }

    /// Connections leave from `source` (port chosen by the kernel) when it is set.
    pub fn from_source(mut self, source: Option<IpAddr>) -> SharedConnection {
        self.source = source;
        self
    }

    /// Sends `request` and waits for its response, within `timeout` (connecting included).
    pub async fn call(&self, request: &Request, timeout: Duration) -> io::Result<Response> {
        let body = encode_body(request, FRAME_BYTES_MAX_DEFAULT).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = encode_frame(&Frame { kind: FrameKind::Request, request_id, body });
        let mut used: Option<Arc<Live>> = None;
        let call = async {
            let live = self.connected().await?;
            used = Some(live.clone());
            let (sender, answer) = oneshot::channel();
            match live.waiting.lock().unwrap().as_mut() {
                Some(waiting) => waiting.insert(request_id, sender),
                None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "connection failed")),
            };
            if live.writer.send(bytes).is_err() {
                live.fail(&io::Error::new(io::ErrorKind::BrokenPipe, "connection writer stopped"));
            }
            let answered = Answer { live: &live, request_id, answer };
            answered.wait().await
        };
        let result = tokio::time::timeout(timeout, call).await;
        result.unwrap_or_else(|_| {
            if let Some(live) = used.filter(|live| live.silent_for() >= SILENT_CONNECTION_GIVE_UP) {
                live.fail(&io::Error::new(io::ErrorKind::TimedOut, "no answer on this connection for a while"));
            }
            Err(io::Error::new(io::ErrorKind::TimedOut, "request timed out"))
        })
    }

    /// The live connection, connecting if there is none or the last one failed.
    async fn connected(&self) -> io::Result<Arc<Live>> {
        let mut live = self.live.lock().await;
        if let Some(current) = live.as_ref().filter(|l| !l.is_failed()) {
            return Ok(current.clone());
        }
        let stream = connect(&self.addr, self.source).await?;
        let (read, write) = stream.into_split();
        let fresh = Arc::new_cyclic(|weak: &std::sync::Weak<Live>| {
            let weak = weak.clone();
            let writer = FrameWriter::spawn(write, move |err| {
                if let Some(live) = weak.upgrade() {
                    live.fail(&err);
                }
            });
            Live {
                writer,
                opened: tokio::time::Instant::now(),
                last_received_ms: AtomicU64::new(0),
                given_up: Arc::new(tokio::sync::Notify::new()),
                waiting: std::sync::Mutex::new(Some(HashMap::new())),
            }
        });
        tokio::spawn(read_responses(FrameReader::new(read, FRAME_BYTES_MAX_DEFAULT), Arc::downgrade(&fresh), fresh.given_up.clone()));
        *live = Some(fresh.clone());
        Ok(fresh)
    }
}

/// A call waiting for its response; dropped unanswered (timeout), it stops waiting.
struct Answer<'a> {
    live: &'a Live,
    request_id: u64,
    answer: oneshot::Receiver<io::Result<Response>>,
}

impl Answer<'_> {
    async fn wait(mut self) -> io::Result<Response> {
        (&mut self.answer).await.unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::BrokenPipe, "connection failed")))
    }
}

impl Drop for Answer<'_> {
    fn drop(&mut self) {
        if let Some(waiting) = self.live.waiting.lock().unwrap().as_mut() {
            waiting.remove(&self.request_id);
        }
    }
}

/// Hands each response to its caller until the connection ends or the `Live` is dropped.
async fn read_responses(mut reader: FrameReader, live: std::sync::Weak<Live>, given_up: Arc<tokio::sync::Notify>) {
    let failure = loop {
        let read = tokio::select! {
            read = reader.read_frame() => read,
            () = given_up.notified() => return,
        };
        let frame = match read {
            Ok(Some(frame)) => frame,
            Ok(None) => break io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection"),
            Err(err) => break err,
        };
        let Some(current) = live.upgrade() else { return };
        current.note_received();
        if frame.kind != FrameKind::Response {
            break io::Error::new(io::ErrorKind::InvalidData, "the server sent a request frame");
        }
        let caller = current.waiting.lock().unwrap().as_mut().and_then(|w| w.remove(&frame.request_id));
        if let Some(caller) = caller {
            let response = decode_body(&frame.body, FRAME_BYTES_MAX_DEFAULT).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            let _ = caller.send(response);
        }
    };
    if let Some(current) = live.upgrade() {
        current.fail(&failure);
    }
}

/// Opens a TCP connection to `addr` (host:port, resolved), leaving from `source` when set:
/// a node's peer connections then come from its own address, which is what lets firewall
/// rules (and chunkcheck's partitions) tell nodes on one host apart.
pub async fn connect(addr: &str, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let stream = match source {
        None => TcpStream::connect(addr).await?,
        Some(source) => {
            let target = tokio::net::lookup_host(addr)
                .await?
                .find(|a| a.is_ipv4() == source.is_ipv4())
                .ok_or_else(|| io::Error::new(io::ErrorKind::AddrNotAvailable, format!("{addr} has no address of the family of {source}")))?;
            let socket = if source.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            socket.bind(SocketAddr::new(source, 0))?;
            socket.connect(target).await?
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many tasks send frames at once through one `FrameWriter` while the reader is slow
    /// (the socket fills: writes are partial or would block, so frames go through the queue
    /// and the direct path in turn): every frame arrives whole, each sender's in its order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_from_many_senders_arrive_whole_and_in_each_senders_order() {
        // Small socket buffers, so that writes are partial or would block all the time.
        let listening = TcpSocket::new_v4().unwrap();
        listening.set_recv_buffer_size(4096).unwrap();
        listening.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listening.listen(16).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let socket = TcpSocket::new_v4().unwrap();
            socket.set_send_buffer_size(4096).unwrap();
            socket.connect(addr).await.unwrap()
        });
        let (server, _) = listener.accept().await.unwrap();
        let (_read, write) = client.await.unwrap().into_split();
        let writer = FrameWriter::spawn(write, |err| panic!("write failed: {err}"));
        const SENDERS: u64 = 8;
        const FRAMES: u64 = 400;
        let senders: Vec<_> = (0..SENDERS)
            .map(|sender| {
                let writer = writer.clone();
                tokio::spawn(async move {
                    for n in 0..FRAMES {
                        // Bodies of 1 to 64 KiB, so the socket's buffer fills.
                        let body = vec![(sender * 31 + n) as u8; 1024 * (1 + (n as usize * 7) % 64)];
                        let frame = Frame { kind: FrameKind::Request, request_id: sender << 32 | n, body };
                        writer.send(encode_frame(&frame)).unwrap();
                        if n % 16 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        drop(writer);
        let (read, _write) = server.into_split();
        let mut reader = FrameReader::new(read, FRAME_BYTES_MAX_DEFAULT);
        let mut next = vec![0u64; SENDERS as usize];
        for read in 0..SENDERS * FRAMES {
            // A slow reader: the writers find the socket full now and then.
            if read % 32 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let frame = reader.read_frame().await.unwrap().expect("a frame");
            let (sender, n) = (frame.request_id >> 32, frame.request_id & 0xffff_ffff);
            assert_eq!(n, next[sender as usize], "sender {sender}'s frames out of order");
            next[sender as usize] += 1;
            assert_eq!(frame.body.len(), 1024 * (1 + (n as usize * 7) % 64));
            assert!(frame.body.iter().all(|&b| b == (sender * 31 + n) as u8), "frame {n} of sender {sender} damaged");
        }
        for sender in senders {
            sender.await.unwrap();
        }
        assert_eq!(reader.read_frame().await.unwrap().map(|f| f.request_id), None, "the write half closed once every sender was gone");
    }
}
