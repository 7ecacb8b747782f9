//! One blocking connection: std TcpStream, whole frames, deadlines.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::CallError;
use crate::protocol::{decode_body, decode_frame, Frame, FrameKind, Response, FRAME_BYTES_MAX_DEFAULT};

/// Most bytes one read from the socket takes.
const READ_BYTES_MAX: usize = 64 * 1024;

pub(crate) struct BlockingConnection {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Where a read lands, zeroed once (not on every read: a call's answer is a few bytes).
    scratch: Box<[u8]>,
    next_id: u64,
}

impl BlockingConnection {
    /// Connects to `addr`, from `source` when given (the kernel picks the port).
    pub fn connect(addr: &str, timeout: Duration, source: Option<IpAddr>) -> std::io::Result<BlockingConnection> {
        let mut last = std::io::Error::other(format!("{addr} resolves to no address"));
        for socket in std::net::ToSocketAddrs::to_socket_addrs(addr)? {
            let connected = match source {
                None => TcpStream::connect_timeout(&socket, timeout),
                Some(source) => (|| {
                    let bound = socket2::Socket::new(socket2::Domain::for_address(socket), socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
                    bound.bind(&SocketAddr::new(source, 0).into())?;
                    bound.connect_timeout(&socket.into(), timeout)?;
                    Ok(TcpStream::from(bound))
                })(),
            };
            match connected {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    return Ok(BlockingConnection { stream, buf: Vec::new(), scratch: vec![0; READ_BYTES_MAX].into_boxed_slice(), next_id: 1 });
                }
                Err(err) => last = err,
            }
        }
        Err(last)
    }

    /// Forgets the socket without closing it (after a fork it belongs to the parent).
    pub fn abandon(self) {
        std::mem::forget(self.stream);
    }

    /// Sends one request (`body`, encoded) and waits for its answer until `deadline`.
    pub fn call(&mut self, body: Vec<u8>, deadline: Instant) -> Result<Response, CallError> {
        let request_id = self.next_id;
        self.next_id += 1;
        let mut bytes = Vec::with_capacity(body.len() + 18);
        Frame { kind: FrameKind::Request, request_id, body }.encode(&mut bytes);
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        self.stream.set_write_timeout(Some(remaining)).map_err(|_| CallError::NotSent)?;
        // A failed write may still have delivered part (or all) of the request.
        self.stream.write_all(&bytes).map_err(|_| CallError::Lost)?;
        loop {
            match decode_frame(&self.buf, FRAME_BYTES_MAX_DEFAULT) {
                Ok(Some((frame, used))) => {
                    self.buf.drain(..used);
                    if frame.request_id != request_id || frame.kind != FrameKind::Response {
                        return Err(CallError::Lost);
                    }
                    return decode_body(&frame.body, FRAME_BYTES_MAX_DEFAULT).map_err(|_| CallError::Lost);
                }
                Ok(None) => {}
                Err(_) => return Err(CallError::Lost),
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(CallError::Lost);
            }
            self.stream.set_read_timeout(Some(remaining)).map_err(|_| CallError::Lost)?;
            match self.stream.read(&mut self.scratch) {
                Ok(0) | Err(_) => return Err(CallError::Lost),
                Ok(read) => self.buf.extend_from_slice(&self.scratch[..read]),
            }
        }
    }
}
