//! The controller's one owner: a thread of its own that runs the commands sent to it, one
//! at a time and in order. The API, the reconciler, the health checks and the background
//! tasks hold a [`ControllerHandle`] and await their command's answer. Nothing else
//! touches the controller, so it needs no lock, and its map syscalls never run on (or
//! block) the async threads.
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::{mpsc, oneshot};

use crate::{controller::Controller, health::Checker};

type Command = Box<dyn FnOnce(&mut Controller) + Send>;

/// What the owner thread runs: a command, or the last one.
enum Message {
    Run(Command),
    /// Drops the controller (on the owner thread) and ends the thread; answered after.
    Close(oneshot::Sender<()>),
}

/// The controller's owner has stopped: closed, or a command panicked (logged).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the controller has stopped")]
pub struct Stopped;

/// Sends commands to the controller's owner. Cheap to clone.
#[derive(Clone)]
pub struct ControllerHandle {
    messages: mpsc::UnboundedSender<Message>,
    /// Set when a command panicked and took the owner down.
    failed: Arc<AtomicBool>,
}

impl ControllerHandle {
    /// Starts the owner thread with `controller`, and its health checks (tasks on the
    /// current tokio runtime, which must exist) reporting straight to it.
    pub fn start(mut controller: Controller) -> Self {
        let (messages, mut inbox) = mpsc::unbounded_channel::<Message>();
        // A weak sender: the checks, owned by the controller, must not keep the channel
        // (and so the thread) open on their own.
        let to_owner = messages.downgrade();
        controller.start_health_checks(Checker::new(Arc::new(move |event| {
            let Some(owner) = to_owner.upgrade() else {
                return false;
            };
            owner
                .send(Message::Run(Box::new(move |c| c.set_health(&event))))
                .is_ok()
        })));
        let failed = Arc::new(AtomicBool::new(false));
        let failed_in_thread = failed.clone();
        std::thread::Builder::new()
            .name("lb-controller".into())
            .spawn(move || {
                crate::privileges::keep_only_in_thread(crate::privileges::RUNNING);
                let run = std::panic::AssertUnwindSafe(|| {
                    while let Some(message) = inbox.blocking_recv() {
                        match message {
                            Message::Run(command) => command(&mut controller),
                            Message::Close(done) => {
                                drop(controller);
                                let _ = done.send(());
                                return;
                            }
                        }
                    }
                });
                if std::panic::catch_unwind(run).is_err() {
                    failed_in_thread.store(true, Ordering::Release);
                    tracing::error!("the controller stopped: a command panicked");
                }
            })
            .expect("spawning the controller's thread");
        Self { messages, failed }
    }

    /// Runs `f` on the controller and returns its answer.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Controller) -> T + Send + 'static,
    ) -> Result<T, Stopped> {
        let (answer, answered) = oneshot::channel();
        let command: Command = Box::new(move |c| {
            let _ = answer.send(f(c));
        });
        self.messages
            .send(Message::Run(command))
            .map_err(|_| Stopped)?;
        answered.await.map_err(|_| Stopped)
    }

    /// Whether a command panicked and stopped the owner.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Drops the controller after the commands sent before this one, and waits for it.
    /// Later calls answer [`Stopped`].
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.messages.send(Message::Close(done)).is_ok() {
            let _ = closed.await;
        }
    }
}
