//! Plain-HTTP servers that hold up against idle and slow clients: a
//! bounded number of connections, a deadline for a request's head, and
//! connections closed once they move no byte for a while or take too long
//! to read an answer. `axum::serve` has none of these (its hyper runs
//! without a timer, so even hyper's header timeout is off): a client that
//! opens connections and sends nothing would hold a file descriptor each,
//! for ever, in the process that also keeps the ledger and the federation
//! links. The party's prediction endpoint, its metrics endpoint and the
//! coordinator's dashboard and metrics all serve through [`serve`].

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How many connections a server holds at once, and how long it waits.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Connections held at once; more wait to be accepted.
    pub connections: usize,
    /// A connection that moves no byte either way for this long is closed.
    pub idle: Duration,
    /// A request's head (its line and headers) must arrive within this.
    pub header: Duration,
    /// An answer must be written out within this of its first byte (a
    /// client reading a byte at a time would otherwise restart the idle
    /// clock with each).
    pub answer_within: Duration,
}

impl Bounds {
    /// The bounds of a server that answers small, quick requests (metrics,
    /// the dashboard's pages): 64 connections, 30 s idle (the dashboard's
    /// event streams send a keep-alive every 15 s), 10 s for a head and 60
    /// s for an answer.
    pub const SMALL: Bounds = Bounds {
        connections: 64,
        idle: Duration::from_secs(30),
        header: Duration::from_secs(10),
        answer_within: Duration::from_secs(60),
    };
}

/// Serves `app` on `listener` within `bounds` until the task is aborted;
/// `what` names the server in its logs.
pub fn serve(
    listener: TcpListener,
    app: axum::Router,
    bounds: Bounds,
    what: &'static str,
) -> tokio::task::JoinHandle<()> {
    let Bounds { connections, idle, header, answer_within } = bounds;
    let mut listener = Bounded { inner: listener, slots: Arc::new(Semaphore::new(connections)), idle, answer_within };
    tokio::spawn(async move {
        loop {
            let (io, _) = axum::serve::Listener::accept(&mut listener).await;
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header);
                if let Err(e) = http.serve_connection(hyper_util::rt::TokioIo::new(io), service).await {
                    tracing::debug!("a connection to the {what} ended: {e}");
                }
            });
        }
    })
}

/// A listener that accepts a connection only with a free slot, and closes
/// connections that stay idle ([`Idle`]).
struct Bounded {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    idle: Duration,
    answer_within: Duration,
}

impl axum::serve::Listener for Bounded {
    type Io = Idle<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Idle<TcpStream>, SocketAddr) {
        // The semaphore is never closed.
        let Ok(slot) = self.slots.clone().acquire_owned().await else { return std::future::pending().await };
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (Idle::new(io, slot, self.idle, self.answer_within), addr)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection that fails once no byte has moved either way for `idle`,
/// or when an answer is still being written `answer_within` after its
/// first byte (a client that reads its answer a byte at a time would
/// otherwise keep the connection, each byte restarting the idle clock). An
/// answer is written from its first byte to the flush that empties it:
/// each of several pipelined answers has its own clock. Its slot is freed
/// when it is dropped.
struct Idle<S> {
    io: S,
    _slot: OwnedSemaphorePermit,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    answer_within: Duration,
    writing_since: Option<tokio::time::Instant>,
}

impl<S> Idle<S> {
    fn new(io: S, slot: OwnedSemaphorePermit, idle: Duration, answer_within: Duration) -> Idle<S> {
        Idle { io, _slot: slot, idle, deadline: Box::pin(tokio::time::sleep(idle)), answer_within, writing_since: None }
    }

    /// An error once the answer being written has taken too long.
    fn writing_too_long(&mut self) -> Option<std::io::Error> {
        let since = *self.writing_since.get_or_insert_with(tokio::time::Instant::now);
        (since.elapsed() > self.answer_within).then(|| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client did not read its answer within the request and idle timeouts",
            )
        })
    }

    /// Pending IO: an error once the deadline has passed.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the connection moved no byte for the idle timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn moved(&mut self) {
        let next = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }
}

use std::future::Future as _;

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                self.moved();
                Poll::Ready(r)
            }
            Poll::Pending => self.pending(cx),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Idle<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.writing_too_long() {
            return Poll::Ready(Err(e));
        }
        match Pin::new(&mut self.io).poll_write(cx, data) {
            Poll::Ready(r) => {
                self.moved();
                Poll::Ready(r)
            }
            Poll::Pending => self.pending(cx),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(r) => {
                // Written out: the next answer has a clock of its own.
                self.writing_since = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.pending(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that reads its answer a byte at a time cannot keep its
    /// connection: each byte restarts the idle clock, but the answer must
    /// be written within the request and idle bounds of its first byte. A
    /// client that reads is answered whole, each answer on its own clock.
    #[tokio::test]
    async fn a_client_that_reads_its_answer_slowly_is_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let slots = Arc::new(Semaphore::new(2));
        let answer = vec![7u8; 16 << 10];
        // Slow: a byte every 20 ms, an idle bound of 10 s, 300 ms to answer.
        let (server, mut client) = tokio::io::duplex(64);
        let mut conn = Idle::new(
            server,
            slots.clone().try_acquire_owned().unwrap(),
            Duration::from_secs(10),
            Duration::from_millis(300),
        );
        let reader = tokio::spawn(async move {
            let mut byte = [0u8; 1];
            let mut got = 0usize;
            while client.read(&mut byte).await.unwrap_or(0) == 1 {
                got += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            got
        });
        let e = tokio::time::timeout(Duration::from_secs(5), conn.write_all(&answer))
            .await
            .expect("the slow reader was cut off, not served for minutes")
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        drop(conn);
        let got = reader.await.unwrap();
        assert!(got > 0 && got < answer.len(), "bytes kept moving, and the answer was cut: {got}");
        // A client that reads: the whole answer.
        let (server, mut client) = tokio::io::duplex(64);
        let mut conn =
            Idle::new(server, slots.try_acquire_owned().unwrap(), Duration::from_secs(10), Duration::from_millis(300));
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            client.read_to_end(&mut all).await.unwrap();
            all.len()
        });
        conn.write_all(&answer).await.unwrap();
        conn.flush().await.unwrap();
        // Pipelined answers each have their own clock: one written after a
        // pause longer than the bound still goes.
        tokio::time::sleep(Duration::from_millis(400)).await;
        conn.write_all(&answer).await.unwrap();
        conn.shutdown().await.unwrap();
        drop(conn);
        assert_eq!(reader.await.unwrap(), 2 * answer.len());
    }

    /// Connections that send nothing hold no slot for ever: past the cap
    /// they wait to be accepted, and each held one is closed once its head
    /// has not come within the bound; a real request is then answered.
    #[tokio::test]
    async fn silent_connections_are_closed_and_a_request_is_then_answered() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let bounds = Bounds {
            connections: 4,
            idle: Duration::from_millis(300),
            header: Duration::from_millis(300),
            answer_within: Duration::from_secs(5),
        };
        let server = serve(listener, app, bounds, "test server");
        let mut silent = Vec::new();
        for _ in 0..12 {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut answer = String::new();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut answer))
            .await
            .expect("answered once the silent connections were closed")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"), "{answer}");
        // The first silent ones were closed by the server (read gives EOF
        // or an error, not a wait).
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(5), silent[0].read(&mut byte)).await.expect("closed");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        server.abort();
    }
}
