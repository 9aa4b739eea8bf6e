//! JavaScript hooks: small programs the operator writes to resolve the uid (`uid(req)`), pick
//! the pool or backend (`route(req, uid)`) and authenticate the admin console (`admin(req)`).
//!
//! Each hook is one file named in the configuration (`hooks.uid`, `hooks.route`, `hooks.admin`).
//! A file is a classic script: it defines the function as `module.exports = function (req) {...}`
//! (the original gopush's Node style), as `module.exports.uid = ...`, or as a global
//! `function uid(req) {...}`. Files are read and checked when a snapshot is built (so
//! `gopush check` and a SIGHUP reload catch syntax errors with file:line) and kept, as text, in a
//! [`Program`] with a generation number; the parsed `Config` only names them.
//!
//! Engines are QuickJS runtimes (through `rquickjs`), one per worker thread, because a QuickJS
//! runtime is single-threaded. A thread compiles the program the first time it runs a hook and
//! again only when the generation changes (a reload), never per request. Every file gets its own
//! context (its own globals) in the thread's runtime.
//!
//! Sandbox: QuickJS without its `std`/`os` modules has no filesystem, network, timers or
//! `require`; `console.log` writes to the agent's log. Every call has a time budget (an interrupt
//! handler stops a runaway hook) and the runtime has a memory limit and a stack limit. A hook
//! that throws, returns a value of the wrong shape or breaks a limit fails only its own request;
//! the error, with file:line, is logged and counted in [`crate::metrics::counters`].

mod engine;
mod request;

pub use request::{cookie_pairs, form_decode, query_pairs, HookRequest};

use crate::metrics::counters;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The three hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    /// `uid(req)`: the uid, or null/undefined for none.
    Uid,
    /// `route(req, uid)`: null, a pool name, `"ip:port"` or `{ip, port}`.
    Route,
    /// `admin(req)`: may this request use the admin console?
    Admin,
}

impl HookKind {
    /// All hooks, in file-loading order.
    pub const ALL: [HookKind; 3] = [HookKind::Uid, HookKind::Route, HookKind::Admin];

    /// The hook's (and its function's) name.
    pub fn name(self) -> &'static str {
        match self {
            HookKind::Uid => "uid",
            HookKind::Route => "route",
            HookKind::Admin => "admin",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One hook file, read.
#[derive(Clone)]
pub struct HookFile {
    /// Which hook it defines.
    pub kind: HookKind,
    /// The file as opened.
    pub path: PathBuf,
    /// The name used in JS stack traces and log lines.
    pub name: Arc<str>,
    /// Its text.
    pub source: Arc<str>,
}

impl fmt::Debug for HookFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookFile")
            .field("kind", &self.kind)
            .field("path", &self.path)
            .field("bytes", &self.source.len())
            .finish()
    }
}

/// Per-call and per-thread limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time budget of one call.
    pub timeout: Duration,
    /// Memory limit of one thread's runtime, in bytes (all hooks together).
    pub memory: usize,
    /// Stack limit of a call, in bytes.
    pub stack: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_millis(50),
            memory: 16 << 20,
            stack: 256 << 10,
        }
    }
}

/// The hook files of one configuration and their limits.
#[derive(Debug, Clone, Default)]
pub struct Program {
    files: [Option<HookFile>; 3],
    limits: Limits,
}

impl Program {
    /// A program of `files` (at most one per kind; a later one replaces an earlier).
    pub fn new(files: impl IntoIterator<Item = HookFile>, limits: Limits) -> Self {
        let mut p = Program {
            files: Default::default(),
            limits,
        };
        for f in files {
            let i = f.kind.index();
            p.files[i] = Some(f);
        }
        p
    }

    /// The file of a hook, if configured.
    pub fn file(&self, kind: HookKind) -> Option<&HookFile> {
        self.files[kind.index()].as_ref()
    }

    /// No hook at all.
    pub fn is_empty(&self) -> bool {
        self.files.iter().all(Option::is_none)
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Reads the files `config` names (relative to `dir`, the configuration file's directory)
    /// and checks them: compiled and their top level run once, so a syntax error is reported
    /// with its file and line when a snapshot is built (`gopush check`, start, reload), not at
    /// the first request. `Ok(None)`: no hook is configured. Errors are `(key, message)`.
    pub fn load(
        config: &crate::config::HooksConfig,
        dir: &Path,
    ) -> Result<Option<Program>, (String, String)> {
        let mut files = Vec::new();
        for (kind, path) in config.files() {
            let key = format!("hooks.{}", kind.name());
            let full = crate::config::normalize(&dir.join(path));
            let text = std::fs::read_to_string(&full)
                .map_err(|e| (key.clone(), format!("cannot read {}: {e}", full.display())))?;
            files.push(HookFile {
                kind,
                name: full.display().to_string().into(),
                path: full,
                source: text.into(),
            });
        }
        if files.is_empty() {
            return Ok(None);
        }
        let limits = Limits {
            timeout: config.timeout,
            memory: config.memory_limit,
            ..Limits::default()
        };
        let program = Program::new(files, limits);
        program
            .check()
            .map_err(|(kind, e)| (format!("hooks.{}", kind.name()), e.detail().to_string()))?;
        Ok(Some(program))
    }

    /// Compiles and runs every file's top level once, on this thread, and checks that each
    /// defines its function ([`Program::load`] does this); the error names the file and line.
    pub fn check(&self) -> Result<(), (HookKind, HookError)> {
        engine::check(self)
    }
}

/// What `route` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteDecision {
    /// null/undefined: the configured pools (product parameter, then `default`).
    Default,
    /// A pool by name.
    Pool(String),
    /// An explicit backend, outside any pool (no ring, no health check).
    Backend(SocketAddr),
}

/// Why a hook call failed. The text carries the file and, when known, the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookError {
    /// The hook threw (or returned a rejected promise).
    Threw(String),
    /// The hook returned something it may not return.
    BadReturn(String),
    /// The hook ran past its time budget.
    Timeout(String),
    /// The hook hit the memory or stack limit.
    Memory(String),
    /// The program could not be set up on this thread.
    Load(String),
}

impl HookError {
    /// A resource limit was hit (time, memory, stack) or the engine failed: the operator's
    /// problem rather than the request's, answered with 500 whatever hook it was.
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            HookError::Timeout(_) | HookError::Memory(_) | HookError::Load(_)
        )
    }
}

impl fmt::Display for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookError::Threw(m) => write!(f, "threw: {m}"),
            HookError::BadReturn(m) => write!(f, "bad return value: {m}"),
            HookError::Timeout(m) => write!(f, "interrupted: {m}"),
            HookError::Memory(m) => write!(f, "resource limit: {m}"),
            HookError::Load(m) => write!(f, "cannot load: {m}"),
        }
    }
}

impl HookError {
    /// The text without the kind of failure: `hooks/uid.js:3: SyntaxError: ...`.
    pub fn detail(&self) -> &str {
        match self {
            HookError::Threw(m)
            | HookError::BadReturn(m)
            | HookError::Timeout(m)
            | HookError::Memory(m)
            | HookError::Load(m) => m,
        }
    }
}

impl std::error::Error for HookError {}

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// The hooks of one configuration snapshot. Cheap to hold; the engines that run it are per
/// thread and follow its generation.
#[derive(Debug, Clone)]
pub struct Hooks {
    generation: u64,
    program: Arc<Program>,
}

impl Hooks {
    /// Hooks for `program`, with a generation number no earlier snapshot had, so that every
    /// thread recompiles once when it first meets them.
    pub fn new(program: Arc<Program>) -> Self {
        Hooks {
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            program,
        }
    }

    /// The generation number.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The program.
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Is this hook configured?
    pub fn has(&self, kind: HookKind) -> bool {
        self.program.file(kind).is_some()
    }

    /// Runs `uid(req)`: `Ok(None)` for null, undefined or `""`; a number becomes its decimal
    /// text. Errors are logged and counted here.
    pub fn uid(&self, req: &HookRequest<'_>) -> Result<Option<String>, HookError> {
        self.observe(HookKind::Uid, engine::call_uid(self, req))
    }

    /// Runs `route(req, uid)`.
    pub fn route(&self, req: &HookRequest<'_>, uid: &str) -> Result<RouteDecision, HookError> {
        self.observe(HookKind::Route, engine::call_route(self, req, uid))
    }

    /// Runs `admin(req)`: only `true` admits. For the admin console's listener; with no admin
    /// hook configured this is `Ok(None)` and the caller applies its own rule.
    pub fn admin(&self, req: &HookRequest<'_>) -> Result<Option<bool>, HookError> {
        if !self.has(HookKind::Admin) {
            return Ok(None);
        }
        self.observe(HookKind::Admin, engine::call_admin(self, req))
            .map(Some)
    }

    fn observe<T>(&self, kind: HookKind, r: Result<T, HookError>) -> Result<T, HookError> {
        let c = counters();
        c.hook_calls.inc();
        if let Err(e) = &r {
            match e {
                HookError::Timeout(_) => &c.hook_timeouts,
                HookError::Memory(_) => &c.hook_memory,
                _ => &c.hook_errors,
            }
            .inc();
            tracing::warn!(target: "gopush::hooks", hook = kind.name(), "hook {}: {e}", kind.name());
        }
        r
    }
}

#[cfg(test)]
mod tests;
