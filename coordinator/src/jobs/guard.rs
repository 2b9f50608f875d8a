//! Plug-in code (a strategy registered by a build of your own, a custom
//! protocol) runs inside the coordinator. A panic in it must fail its job,
//! naming the plug-in, and leave every other job running.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};

use confide_algorithms::Strategy;

/// The message of a caught panic.
pub fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// Runs `f`; a panic becomes `Err("{who} panicked in {what}: message")`.
pub fn guarded<T>(who: &str, what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| format!("{who} panicked in {what}: {}", panic_message(p.as_ref())))
}

/// A strategy whose every call is guarded: errors and panics come back as
/// `Err` with the strategy's name and the call.
pub struct GuardedStrategy {
    inner: Box<dyn Strategy>,
    who: String,
}

impl GuardedStrategy {
    /// Guards `inner`.
    pub fn new(inner: Box<dyn Strategy>) -> Result<Self, String> {
        let name = guarded("a strategy", "name", || inner.name().to_owned())?;
        Ok(GuardedStrategy { inner, who: format!("strategy {name}") })
    }

    /// The strategy, for calls that cannot fail.
    pub fn who(&self) -> &str {
        &self.who
    }

    /// Calls `f` on the strategy: `what` names the call in errors.
    pub fn call<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut dyn Strategy) -> Result<T, confide_algorithms::Error>,
    ) -> Result<T, String> {
        let inner = self.inner.as_mut();
        match guarded(&self.who, what, || f(inner))? {
            Ok(v) => Ok(v),
            Err(e) => Err(format!("{what}: {e}")),
        }
    }
}
