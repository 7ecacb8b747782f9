//! `KeptSession`: a lease session whose keep-alives a thread of its own sends, so that the
//! code holding locks under it (the file layer, an application's failover lock) need not.
//!
//! The holder's view of its lease is conservative: the lease is `held` while a renewal that
//! the metadata leader confirmed was *sent* less than a TTL ago. The leader counts the TTL from
//! when it received that renewal, later than it was sent, so while `held` says yes the cluster
//! has not ended the session. Once it says no, another session may already hold the locks;
//! the cluster refuses this session's writes (`SessionExpired`) from the moment it ends it,
//! whatever the holder believes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{Client, ClientError};
use crate::protocol::ErrorReply;

/// What the holder and its renewing thread share.
struct Renewals {
    /// Set when the session is dropped: the thread stops.
    stop: Mutex<bool>,
    wake: Condvar,
    /// When the last renewal the cluster confirmed was sent (at first: when the open was sent).
    confirmed_sent_at: Mutex<Instant>,
    /// The cluster answered that the session ended.
    expired: AtomicBool,
}

/// A lease session kept alive every third of its TTL until dropped; dropping it stops the
/// renewals and closes the session (the cluster then fences it and releases its locks).
pub struct KeptSession {
    id: u64,
    ttl: Duration,
    client: Arc<Client>,
    renewals: Arc<Renewals>,
}

impl KeptSession {
    /// Opens a session with a lease of `ttl` and starts renewing it. `on_error` hears every
    /// renewal that failed (the last one: `SessionExpired`, after which renewals stop).
    pub fn open(client: Arc<Client>, ttl: Duration, on_error: impl Fn(&ClientError) + Send + 'static) -> Result<KeptSession, ClientError> {
        let sent_at = Instant::now();
        let id = client.open_session(ttl)?;
        let renewals =
            Arc::new(Renewals { stop: Mutex::new(false), wake: Condvar::new(), confirmed_sent_at: Mutex::new(sent_at), expired: AtomicBool::new(false) });
        let (thread_client, thread_renewals) = (client.clone(), renewals.clone());
        let started = std::thread::Builder::new().name(format!("lease-{id}")).spawn(move || renew(&thread_client, id, ttl, &thread_renewals, on_error));
        if let Err(err) = started {
            let _ = client.close_session(id);
            return Err(ClientError::Server(ErrorReply::Internal(format!("cannot start the thread that renews the lease: {err}"))));
        }
        Ok(KeptSession { id, ttl, client, renewals })
    }

    /// The session's id, for `Client::lock`, `write_in_session` and `unlock`.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether the lease is certainly still held (see the module's comment).
    pub fn held(&self) -> bool {
        !self.expired() && self.renewals.confirmed_sent_at.lock().unwrap().elapsed() < self.ttl
    }

    /// Whether the cluster answered that the session ended.
    pub fn expired(&self) -> bool {
        self.renewals.expired.load(Ordering::SeqCst)
    }
}

impl Drop for KeptSession {
    fn drop(&mut self) {
        // The thread is not waited for: a renewal in flight may take the client's whole retry
        // window. It stops after it.
        *self.renewals.stop.lock().unwrap() = true;
        self.renewals.wake.notify_all();
        if !self.expired() {
            // Best effort: a session not closed ends when its lease runs out.
            let _ = self.client.close_session(self.id);
        }
    }
}

/// The renewing thread: a keep-alive every third of the TTL until stopped or told the session
/// ended.
fn renew(client: &Client, id: u64, ttl: Duration, renewals: &Renewals, on_error: impl Fn(&ClientError)) {
    loop {
        {
            let stop = renewals.stop.lock().unwrap();
            let (stop, _) = renewals.wake.wait_timeout_while(stop, ttl / 3, |stop| !*stop).unwrap();
            if *stop {
                return;
            }
        }
        match client.keep_alive_sent(id) {
            Ok((_, sent_at)) => *renewals.confirmed_sent_at.lock().unwrap() = sent_at,
            Err(err) => {
                let ended = matches!(err, ClientError::Server(ErrorReply::SessionExpired { .. }));
                if ended {
                    renewals.expired.store(true, Ordering::SeqCst);
                }
                on_error(&err);
                if ended {
                    return;
                }
            }
        }
    }
}
