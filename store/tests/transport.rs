//! `SharedConnection`, the one connection per peer that every Raft group of a node shares:
//! pipelined calls get their own answers (matched by request id, whatever the order), a call
//! that times out gives up alone, and a connection the server drops fails the calls waiting on
//! it at once (never a hang) while the next call reconnects.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chunkstore::node::transport::{serve, Handler, SharedConnection};
use chunkstore::protocol::{ReadPolicy, Request, Response};
use chunkstore::Key;
use tokio::io::AsyncReadExt;

/// Answers a Get after sleeping `min_index` milliseconds, echoing `min_index` as the index.
struct Slow;

impl Handler for Slow {
    async fn handle(&self, request: Request) -> Response {
        match request {
            Request::Get { min_index, .. } => {
                tokio::time::sleep(Duration::from_millis(min_index)).await;
                Response::Record { record: None, index: min_index }
            }
            _ => Response::Raft { message: Vec::new() },
        }
    }
}

fn get(delay_ms: u64) -> Request {
    Request::Get { namespace: "ns".into(), key: Key::new("s", 1i64), bins: None, read: ReadPolicy::Session, min_index: delay_ms }
}

async fn server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(serve(listener, Arc::new(Slow)));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_each_get_their_own_answer() {
    let connection = Arc::new(SharedConnection::new(server().await));
    // Delays chosen so that answers come back in another order than the calls went out.
    let calls: Vec<_> = (0..200u64)
        .map(|i| {
            let connection = connection.clone();
            let delay = (i * 37) % 50;
            tokio::spawn(async move { (delay, connection.call(&get(delay), Duration::from_secs(10)).await) })
        })
        .collect();
    for call in calls {
        let (delay, answer) = call.await.unwrap();
        assert_eq!(answer.unwrap(), Response::Record { record: None, index: delay });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_call_gives_up_alone() {
    let connection = Arc::new(SharedConnection::new(server().await));
    let slow = {
        let connection = connection.clone();
        tokio::spawn(async move { connection.call(&get(3000), Duration::from_millis(100)).await })
    };
    let quick: Vec<_> = (0..20u64)
        .map(|i| {
            let connection = connection.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10 * i)).await;
                connection.call(&get(5), Duration::from_secs(5)).await
            })
        })
        .collect();
    let timed_out = slow.await.unwrap().unwrap_err();
    assert_eq!(timed_out.kind(), std::io::ErrorKind::TimedOut);
    for call in quick {
        assert_eq!(call.await.unwrap().unwrap(), Response::Record { record: None, index: 5 });
    }
    // The connection still works after the abandoned call's late answer arrives.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(connection.call(&get(1), Duration::from_secs(5)).await.unwrap(), Response::Record { record: None, index: 1 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_fails_its_calls_and_the_next_call_reconnects() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let connection = Arc::new(SharedConnection::new(addr));
    // The first connection is accepted, its first request read, and then it is closed unanswered.
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 18];
        stream.read_exact(&mut buf).await.unwrap();
        drop(stream);
        serve(listener, Arc::new(Slow)).await;
    });
    let started = Instant::now();
    let failed = connection.call(&get(0), Duration::from_secs(20)).await;
    assert!(failed.is_err(), "a call on a closed connection must fail: {failed:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "the failure took {:?} to surface", started.elapsed());
    assert_eq!(connection.call(&get(2), Duration::from_secs(5)).await.unwrap(), Response::Record { record: None, index: 2 });
    server.abort();
}
