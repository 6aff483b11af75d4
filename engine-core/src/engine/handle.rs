//! The async engine: one thread owns the [`Engine`] and runs its scheduler loop, fed by a
//! channel; callers on any thread or runtime submit requests and receive each request's tokens
//! as a [`Stream`]. Dropping a stream (or calling [`RequestStream::cancel`]) cancels its
//! request and frees its blocks at the next step boundary.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures_core::Stream;
use serde::Serialize;
use tokio::sync::{mpsc as tokio_mpsc, oneshot};

use super::load::Engine;
use super::request::{GenerationOutput, Request, TokenEvent};
use crate::error::KvqError;
use crate::loader::Tokenizer;

/// What a request's stream yields: its tokens as they are sampled, then its output.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// A sampled token and the text it released; the last one has `finished` set.
    Token(TokenEvent),
    /// The request is done; always the last item of a stream that did not fail.
    Finished(GenerationOutput),
}

/// One item of a request's stream: an event, or the error that ended the request.
pub type EventResult = Result<EngineEvent, KvqError>;

/// A request's events as a boxed stream (what [`AsyncEngine::submit`] returns); dropping it
/// cancels the request.
pub type EventStream = Pin<Box<dyn Stream<Item = EventResult> + Send>>;

/// What an engine serves, fixed at start.
#[derive(Debug, Clone, Serialize)]
pub struct EngineInfo {
    pub backend: String,
    pub codec: String,
    /// The codec's LMDeploy policy number (none for a registered codec).
    pub policy: Option<u32>,
    /// Most tokens (prompt + generated) of one request.
    pub session_len: usize,
    pub max_batch_size: usize,
    /// GPUs the model is split over (tensor parallelism; 1 on the CPU).
    pub tp: usize,
    /// Blocks of the cache (of each rank's share with tp > 1).
    pub num_blocks: usize,
    pub block_size: usize,
    pub token_capacity: usize,
    pub ratio_to_fp16: f64,
    pub vocab_size: usize,
    /// Draft tokens verified per decoding request and step (n-gram speculation); 0 is off.
    pub num_speculative_tokens: usize,
    /// [`Engine::summary`]: the plan in one line, for logs.
    pub summary: String,
}

impl EngineInfo {
    pub fn of(engine: &Engine) -> Self {
        Self {
            backend: engine.resolved.backend.name().to_string(),
            codec: engine.resolved.codec_name(),
            policy: engine.resolved.codec.policy(),
            session_len: engine.limits().session_len,
            tp: engine.config.engine.tp,
            max_batch_size: engine.limits().max_batch_size,
            num_blocks: engine.plan.num_blocks,
            block_size: engine.plan.block_size,
            token_capacity: engine.plan.token_capacity,
            ratio_to_fp16: engine.plan.ratio_to_fp16,
            vocab_size: engine.spec.vocab_size,
            num_speculative_tokens: engine.limits().num_speculative_tokens,
            summary: engine.summary(),
        }
    }
}

/// A snapshot of the engine's load, updated after every step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    pub free_blocks: usize,
    pub total_blocks: usize,
    pub running: usize,
    pub waiting: usize,
    /// Preemptions since start (a running request's blocks freed for recomputation).
    pub preemptions: u64,
    /// Prompt tokens found in the prefix cache since start (not computed).
    pub prefix_hit_tokens: u64,
    /// Speculative draft tokens scored since start.
    pub spec_drafted: u64,
    /// Of those, drafts kept.
    pub spec_accepted: u64,
    /// False once the engine thread has stopped.
    pub alive: bool,
}

/// An engine requests can be submitted to from async code (a trait so servers can be tested
/// against any implementation).
#[async_trait]
pub trait AsyncEngine: Send + Sync {
    fn info(&self) -> &EngineInfo;

    /// The model's tokenizer (prompts are tokenized by the caller).
    fn tokenizer(&self) -> &Tokenizer;

    fn stats(&self) -> EngineStats;

    /// Queues `request`; an invalid one (empty, too long for the session, bad sampling
    /// values) is refused here with [`KvqError::InvalidArgument`].
    async fn submit(&self, request: Request) -> Result<EventStream, KvqError>;
}

enum Command {
    Submit {
        request: Request,
        events: tokio_mpsc::UnboundedSender<EventResult>,
        reply: oneshot::Sender<Result<usize, KvqError>>,
    },
    Cancel(usize),
}

/// State the engine thread publishes for the handles.
struct Shared {
    info: EngineInfo,
    tokenizer: Tokenizer,
    free_blocks: AtomicUsize,
    running: AtomicUsize,
    waiting: AtomicUsize,
    preemptions: AtomicU64,
    prefix_hit_tokens: AtomicU64,
    spec_drafted: AtomicU64,
    spec_accepted: AtomicU64,
    alive: AtomicBool,
}

impl Shared {
    fn publish(&self, engine: &Engine) {
        self.free_blocks
            .store(engine.free_blocks(), Ordering::Relaxed);
        self.running.store(engine.num_running(), Ordering::Relaxed);
        self.waiting.store(engine.num_waiting(), Ordering::Relaxed);
        self.preemptions
            .store(engine.preemptions(), Ordering::Relaxed);
        self.prefix_hit_tokens
            .store(engine.prefix_hit_tokens(), Ordering::Relaxed);
        let spec = engine.speculation();
        self.spec_drafted.store(spec.drafted, Ordering::Relaxed);
        self.spec_accepted.store(spec.accepted, Ordering::Relaxed);
    }
}

/// Marks the engine stopped when the thread ends, however it ends (after the engine, and
/// with it its host and device memory, is dropped).
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::Release);
    }
}

fn stopped() -> KvqError {
    KvqError::EngineStopped
}

/// A cheap, cloneable handle to an engine running on its own thread. The thread ends when
/// every handle and stream is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    commands: Sender<Command>,
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// Moves `engine` onto a new thread and starts its loop.
    pub fn spawn(engine: Engine) -> Result<Self, KvqError> {
        let shared = Arc::new(Shared {
            info: EngineInfo::of(&engine),
            tokenizer: engine.tokenizer.clone(),
            free_blocks: AtomicUsize::new(engine.free_blocks()),
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            preemptions: AtomicU64::new(0),
            prefix_hit_tokens: AtomicU64::new(0),
            spec_drafted: AtomicU64::new(0),
            spec_accepted: AtomicU64::new(0),
            alive: AtomicBool::new(true),
        });
        let (commands, rx) = mpsc::channel();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("kvq-engine".into())
            .spawn(move || run(engine, rx, thread_shared))
            .map_err(|source| KvqError::Io {
                path: "engine thread".into(),
                source,
            })?;
        Ok(Self { commands, shared })
    }

    pub fn info(&self) -> &EngineInfo {
        &self.shared.info
    }

    /// Drops this handle and waits, up to `timeout`, for the engine thread to end: it ends
    /// once every other handle and stream is gone too, after dropping the engine, so its host
    /// and device memory are free for the next one (a benchmark that builds engines one after
    /// another). Returns whether it ended in time.
    pub fn shutdown(self, timeout: std::time::Duration) -> bool {
        let shared = self.shared.clone();
        drop(self);
        let start = std::time::Instant::now();
        while shared.alive.load(Ordering::Acquire) {
            if start.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        true
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.shared.tokenizer
    }

    pub fn stats(&self) -> EngineStats {
        let s = &self.shared;
        EngineStats {
            free_blocks: s.free_blocks.load(Ordering::Relaxed),
            total_blocks: s.info.num_blocks,
            running: s.running.load(Ordering::Relaxed),
            waiting: s.waiting.load(Ordering::Relaxed),
            preemptions: s.preemptions.load(Ordering::Relaxed),
            prefix_hit_tokens: s.prefix_hit_tokens.load(Ordering::Relaxed),
            spec_drafted: s.spec_drafted.load(Ordering::Relaxed),
            spec_accepted: s.spec_accepted.load(Ordering::Relaxed),
            alive: s.alive.load(Ordering::Relaxed),
        }
    }

    /// Queues `request` and returns the stream of its events (see [`AsyncEngine::submit`]).
    pub async fn submit(&self, request: Request) -> Result<RequestStream, KvqError> {
        let (events, rx) = tokio_mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Submit {
                request,
                events,
                reply,
            })
            .map_err(|_| stopped())?;
        let id = answer.await.map_err(|_| stopped())??;
        Ok(RequestStream {
            id,
            events: rx,
            commands: self.commands.clone(),
            done: false,
        })
    }
}

#[async_trait]
impl AsyncEngine for EngineHandle {
    fn info(&self) -> &EngineInfo {
        EngineHandle::info(self)
    }

    fn tokenizer(&self) -> &Tokenizer {
        EngineHandle::tokenizer(self)
    }

    fn stats(&self) -> EngineStats {
        EngineHandle::stats(self)
    }

    async fn submit(&self, request: Request) -> Result<EventStream, KvqError> {
        Ok(Box::pin(EngineHandle::submit(self, request).await?))
    }
}

/// The events of one submitted request. Ends after [`EngineEvent::Finished`] or an error;
/// dropped earlier, it cancels the request.
pub struct RequestStream {
    id: usize,
    events: tokio_mpsc::UnboundedReceiver<EventResult>,
    commands: Sender<Command>,
    /// Finished, failed or cancelled: nothing left to cancel.
    done: bool,
}

impl RequestStream {
    /// The engine's id of the request (what its [`TokenEvent`]s carry).
    pub fn id(&self) -> usize {
        self.id
    }

    /// Cancels the request; its blocks are freed at the next step boundary.
    pub fn cancel(self) {
        drop(self)
    }

    /// Waits for every event and returns the output (the text is the streamed text).
    pub async fn output(mut self) -> Result<GenerationOutput, KvqError> {
        while let Some(event) = std::future::poll_fn(|cx| Pin::new(&mut self).poll_next(cx)).await {
            if let EngineEvent::Finished(out) = event? {
                return Ok(out);
            }
        }
        Err(stopped())
    }
}

impl Stream for RequestStream {
    type Item = EventResult;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<EventResult>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.events.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                if matches!(item, Ok(EngineEvent::Finished(_)) | Err(_)) {
                    self.done = true;
                }
                Poll::Ready(Some(item))
            }
            // The engine dropped the request without finishing it: it has stopped.
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Err(stopped())))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.commands.send(Command::Cancel(self.id));
        }
    }
}

/// The engine thread: applies commands between steps, steps while there is work, and routes
/// each event to its request's stream. A stream whose receiver is gone is cancelled.
fn run(engine: Engine, commands: Receiver<Command>, shared: Arc<Shared>) {
    let _alive = AliveGuard(shared.clone());
    // The engine is dropped when `serve` returns, before the guard marks the thread ended.
    serve(engine, commands, &shared);
}

/// [`run`]'s loop, until no handle and no stream is left.
fn serve(mut engine: Engine, commands: Receiver<Command>, shared: &Shared) {
    let mut streams: HashMap<usize, tokio_mpsc::UnboundedSender<EventResult>> = HashMap::new();
    let mut events = Vec::new();
    let mut gone = Vec::new();
    loop {
        if !engine.has_work() {
            shared.publish(&engine);
            match commands.recv() {
                Ok(c) => apply(&mut engine, &mut streams, c),
                Err(_) => return,
            }
        }
        loop {
            match commands.try_recv() {
                Ok(c) => apply(&mut engine, &mut streams, c),
                Err(TryRecvError::Empty) => break,
                // No handle and no stream is left: nobody can receive anything.
                Err(TryRecvError::Disconnected) => return,
            }
        }
        if !engine.has_work() {
            continue;
        }
        events.clear();
        match engine.step(&mut events) {
            Ok(_) => {
                // Counters first, so a caller that sees its request finish reads them
                // including this step.
                shared.publish(&engine);
                for e in events.drain(..) {
                    let id = e.request;
                    if let Some(tx) = streams.get(&id) {
                        if tx.send(Ok(EngineEvent::Token(e))).is_err() {
                            gone.push(id);
                        }
                    }
                }
                for (id, out) in engine.take_finished() {
                    if let Some(tx) = streams.remove(&id) {
                        let _ = tx.send(Ok(EngineEvent::Finished(out)));
                    }
                }
                for id in gone.drain(..) {
                    if streams.remove(&id).is_some() {
                        let _ = engine.cancel(id);
                    }
                }
            }
            Err(e) => {
                // The batch's state is unknown after a failed step: fail every request.
                let message = e.to_string();
                let _ = engine.cancel_all();
                for (_, tx) in streams.drain() {
                    let _ = tx.send(Err(KvqError::Engine(message.clone())));
                }
            }
        }
        shared.publish(&engine);
    }
}

fn apply(
    engine: &mut Engine,
    streams: &mut HashMap<usize, tokio_mpsc::UnboundedSender<EventResult>>,
    command: Command,
) {
    match command {
        Command::Submit {
            request,
            events,
            reply,
        } => match engine.submit(request) {
            Ok(id) => {
                if reply.send(Ok(id)).is_ok() {
                    streams.insert(id, events);
                } else {
                    let _ = engine.cancel(id); // the submitter went away
                }
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        },
        Command::Cancel(id) => {
            streams.remove(&id);
            let _ = engine.cancel(id);
        }
    }
}
