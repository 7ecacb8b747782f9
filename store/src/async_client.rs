//! The async API: `AsyncClient`, for callers already on a tokio runtime (chunkctl's tools, a
//! future async file layer). It drives the blocking `Client` on tokio's blocking thread pool,
//! so the routing, retry and exactly-once rules are the one implementation in the client
//! crate (client/src/client/mod.rs)
//! and a call never blocks the caller's runtime threads. The cost is one hand-off to the
//! blocking pool per call (tens of microseconds).

use std::sync::Arc;

use crate::client::{Client, ClientConfig, ClientError};
use crate::key::Key;
use crate::ops::{OpResult, Operation, WriteOp, WritePolicy};
use crate::protocol::{ClusterMap, ErrorReply, ReadPolicy};
use crate::value::{Bin, Record, RecordMeta};

/// Cheap to clone; clones share connections, cluster map and session state.
#[derive(Clone)]
pub struct AsyncClient {
    inner: Arc<Client>,
}

impl AsyncClient {
    /// Connects to the first seed that answers and loads the cluster map.
    pub async fn connect(config: ClientConfig) -> Result<AsyncClient, ClientError> {
        let inner = run_blocking(move || Client::connect(config)).await??;
        Ok(AsyncClient { inner: Arc::new(inner) })
    }

    /// The blocking client underneath (same sessions and connections).
    pub fn blocking(&self) -> &Client {
        &self.inner
    }

    pub async fn cluster_map(&self) -> ClusterMap {
        self.inner.cluster_map()
    }

    pub async fn get(&self, namespace: &str, key: &Key, bins: Option<Vec<String>>) -> Result<Option<Record>, ClientError> {
        let read = self.inner.config().read_policy;
        self.get_with(namespace, key, bins, read).await
    }

    pub async fn get_with(&self, namespace: &str, key: &Key, bins: Option<Vec<String>>, read: ReadPolicy) -> Result<Option<Record>, ClientError> {
        let (client, namespace, key) = (self.inner.clone(), namespace.to_owned(), key.clone());
        run_blocking(move || client.get_with(&namespace, &key, bins, read)).await?
    }

    pub async fn put(&self, namespace: &str, key: &Key, bins: Vec<Bin>, policy: &WritePolicy) -> Result<RecordMeta, ClientError> {
        Ok(self.write(namespace, key, WriteOp::Put(bins), policy).await?.0)
    }

    pub async fn delete(&self, namespace: &str, key: &Key, policy: &WritePolicy) -> Result<RecordMeta, ClientError> {
        Ok(self.write(namespace, key, WriteOp::Delete, policy).await?.0)
    }

    pub async fn operate(&self, namespace: &str, key: &Key, ops: Vec<Operation>, policy: &WritePolicy) -> Result<(RecordMeta, Vec<OpResult>), ClientError> {
        self.write(namespace, key, WriteOp::Operate(ops), policy).await
    }

    /// A write with the blocking client's exactly-once retries. Dropping the future does not
    /// cancel the write: it runs to its end on the blocking pool (so its tag is never reused).
    pub async fn write(&self, namespace: &str, key: &Key, op: WriteOp, policy: &WritePolicy) -> Result<(RecordMeta, Vec<OpResult>), ClientError> {
        let (client, namespace, key, policy) = (self.inner.clone(), namespace.to_owned(), key.clone(), *policy);
        run_blocking(move || client.write(&namespace, &key, op, &policy)).await?
    }
}

async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ClientError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ClientError::Server(ErrorReply::Internal(format!("client task failed: {e}"))))
}
