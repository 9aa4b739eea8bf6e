//! One QuickJS runtime per thread running one [`Program`] generation.

use super::{HookError, HookFile, HookKind, HookRequest, Hooks, Program, RouteDecision};
use rquickjs::function::Rest;
use rquickjs::{
    Coerced, Context, Ctx, Error as JsError, Function, Object, Persistent, Runtime, Value,
};
use std::cell::{Cell, RefCell};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Top-level code of a file runs once per thread; it gets a more generous budget than a call.
const LOAD_BUDGET: Duration = Duration::from_secs(1);

/// One file, evaluated: its context and its function.
struct Compiled {
    // Field order is drop order: the saved values must go before their context.
    func: Persistent<Function<'static>>,
    freeze: Persistent<Function<'static>>,
    ctx: Context,
    file: HookFile,
}

/// A thread's runtime and the program generation it holds.
struct Engine {
    generation: u64,
    // Drop order again: contexts before the runtime.
    hooks: [Option<Compiled>; 3],
    deadline: Rc<Cell<Option<Instant>>>,
    timeout: Duration,
    rt: Runtime,
}

thread_local! {
    static ENGINE: RefCell<Option<Engine>> = const { RefCell::new(None) };
}

fn engine_error(e: JsError) -> HookError {
    HookError::Load(format!("QuickJS: {e}"))
}

impl Engine {
    fn new(generation: u64, program: &Program) -> Result<Engine, (HookKind, HookError)> {
        let limits = program.limits;
        let rt = Runtime::new().map_err(|e| (HookKind::Uid, engine_error(e)))?;
        rt.set_memory_limit(limits.memory);
        rt.set_max_stack_size(limits.stack);
        let deadline: Rc<Cell<Option<Instant>>> = Rc::default();
        let seen = deadline.clone();
        // QuickJS polls this every few thousand operations; cheap enough, and the only way to
        // stop `while (true) {}`.
        rt.set_interrupt_handler(Some(Box::new(move || {
            seen.get().is_some_and(|t| Instant::now() >= t)
        })));
        let mut engine = Engine {
            generation,
            hooks: Default::default(),
            deadline,
            timeout: limits.timeout,
            rt,
        };
        for file in program.files.iter().flatten() {
            let compiled = engine.load(file).map_err(|e| (file.kind, e))?;
            engine.hooks[file.kind.index()] = Some(compiled);
        }
        Ok(engine)
    }

    fn load(&self, file: &HookFile) -> Result<Compiled, HookError> {
        let ctx = Context::full(&self.rt).map_err(engine_error)?;
        let kind = file.kind;
        self.arm(LOAD_BUDGET, ctx.get_runtime_ptr());
        let saved = ctx.with(|ctx| -> Result<_, HookError> {
            // Taken before user code runs, which could replace `Object.freeze`.
            let freeze: Function = ctx
                .globals()
                .get::<_, Object>("Object")
                .and_then(|o| o.get("freeze"))
                .map_err(engine_error)?;
            install_globals(&ctx, &file.name).map_err(engine_error)?;
            let mut opts = rquickjs::context::EvalOptions::default();
            opts.global = true;
            opts.strict = false;
            opts.filename = Some(file.name.to_string());
            ctx.eval_with_options::<(), _>(file.source.as_bytes(), opts)
                .map_err(|e| self.describe(&ctx, e, &file.name))?;
            let func = find_function(&ctx, kind).ok_or_else(|| {
                HookError::Load(format!(
                    "{}: defines no function: set `module.exports = function (req) {{ ... }}` or declare `function {}(...)`",
                    file.name,
                    kind.name()
                ))
            })?;
            Ok((Persistent::save(&ctx, func), Persistent::save(&ctx, freeze)))
        });
        self.disarm();
        let (func, freeze) = saved?;
        Ok(Compiled {
            func,
            freeze,
            ctx,
            file: file.clone(),
        })
    }

    /// Starts the time budget. `raw` is this engine's runtime (from one of its contexts).
    fn arm(&self, budget: Duration, raw: *mut rquickjs::qjs::JSRuntime) {
        self.deadline.set(Some(Instant::now() + budget));
        // QuickJS measures stack depth from where the runtime was created; calls come from
        // other depths of the worker's stack, so re-anchor the limit at the current frame.
        if !raw.is_null() {
            // SAFETY: `raw` is the live runtime this engine owns, used on its own thread only;
            // the call only records the current stack pointer.
            unsafe { rquickjs::qjs::JS_UpdateStackTop(raw) };
        }
    }

    fn disarm(&self) {
        self.deadline.set(None);
    }

    fn timed_out(&self) -> bool {
        self.deadline.get().is_some_and(|t| Instant::now() >= t)
    }

    /// Turns a failed evaluation into a [`HookError`] with the file and line.
    fn describe(&self, ctx: &Ctx<'_>, e: JsError, file: &str) -> HookError {
        let timed_out = self.timed_out();
        let allocation = matches!(e, JsError::Allocation);
        let (text, line) = match e {
            JsError::Exception => {
                let thrown = ctx.catch();
                exception_text(&thrown, file)
            }
            other => (other.to_string(), None),
        };
        let at = match line {
            Some(l) => format!("{file}:{l}: {text}"),
            None => format!("{file}: {text}"),
        };
        let lower = text.to_ascii_lowercase();
        if lower.contains("out of memory")
            || lower.contains("stack overflow")
            || lower.contains("call stack size")
            || allocation
        {
            ctx.run_gc();
            return HookError::Memory(at);
        }
        // After the memory check: a slow allocation loop may also be past its deadline, but the
        // allocator is what stopped it.
        if timed_out {
            return HookError::Timeout(format!(
                "{at} (the time budget of {:?} is spent)",
                self.timeout
            ));
        }
        HookError::Threw(at)
    }

    /// Calls the hook with `args` built inside its context, and converts the result with `out`.
    fn call<T>(
        &self,
        kind: HookKind,
        args: impl for<'js> FnOnce(&Ctx<'js>, &Function<'js>) -> rquickjs::Result<Vec<Value<'js>>>,
        out: impl for<'js> FnOnce(&str, Value<'js>) -> Result<T, HookError>,
    ) -> Result<T, HookError> {
        let Some(c) = &self.hooks[kind.index()] else {
            return Err(HookError::Load(format!("no {} hook", kind.name())));
        };
        self.arm(self.timeout, c.ctx.get_runtime_ptr());
        let result = c.ctx.with(|ctx| match invoke(&ctx, c, args) {
            Ok(v) => out(&c.file.name, v),
            Err(e) => Err(self.describe(&ctx, e, &c.file.name)),
        });
        self.disarm();
        result
    }
}

fn invoke<'js>(
    ctx: &Ctx<'js>,
    c: &Compiled,
    args: impl FnOnce(&Ctx<'js>, &Function<'js>) -> rquickjs::Result<Vec<Value<'js>>>,
) -> rquickjs::Result<Value<'js>> {
    let func = c.func.clone().restore(ctx)?;
    let freeze = c.freeze.clone().restore(ctx)?;
    let args = args(ctx, &freeze)?;
    func.call((Rest(args),))
}

/// `module`, `exports` and `console` for a file.
fn install_globals(ctx: &Ctx<'_>, file: &str) -> rquickjs::Result<()> {
    let g = ctx.globals();
    let module = Object::new(ctx.clone())?;
    let exports = Object::new(ctx.clone())?;
    module.set("exports", exports.clone())?;
    g.set("module", module)?;
    g.set("exports", exports)?;
    let console = Object::new(ctx.clone())?;
    for (name, warn) in [
        ("log", false),
        ("info", false),
        ("warn", true),
        ("error", true),
    ] {
        let file: std::sync::Arc<str> = file.into();
        let f = Function::new(ctx.clone(), move |args: Rest<Coerced<String>>| {
            let text = args
                .0
                .iter()
                .map(|a| a.0.as_str())
                .collect::<Vec<_>>()
                .join(" ");
            if warn {
                tracing::warn!(target: "gopush::hooks", file = &*file, "{text}");
            } else {
                tracing::info!(target: "gopush::hooks", file = &*file, "{text}");
            }
        })?;
        console.set(name, f)?;
    }
    g.set("console", console)?;
    Ok(())
}

/// `module.exports` if it is a function, else `module.exports.<name>`, else global `<name>`.
fn find_function<'js>(ctx: &Ctx<'js>, kind: HookKind) -> Option<Function<'js>> {
    let g = ctx.globals();
    let exported: Option<Value> = g
        .get::<_, Object>("module")
        .ok()
        .and_then(|m| m.get("exports").ok());
    if let Some(v) = &exported {
        if let Some(f) = v.as_function() {
            return Some(f.clone());
        }
        if let Some(f) = v
            .as_object()
            .and_then(|o| o.get::<_, Value>(kind.name()).ok())
            .and_then(|v| v.as_function().cloned())
        {
            return Some(f);
        }
    }
    g.get::<_, Value>(kind.name())
        .ok()
        .and_then(|v| v.as_function().cloned())
}

/// "TypeError: message" and the line in `file`, from a thrown value.
fn exception_text(thrown: &Value<'_>, file: &str) -> (String, Option<u32>) {
    if let Some(ex) = thrown.as_exception() {
        let name: Option<String> = ex
            .as_object()
            .get::<_, Option<Coerced<String>>>("name")
            .ok()
            .flatten()
            .map(|c| c.0);
        let message = ex.message().unwrap_or_default();
        let text = match name {
            Some(n) if !n.is_empty() => format!("{n}: {message}"),
            _ => message,
        };
        let line = ex.stack().and_then(|s| line_in(&s, file)).or_else(|| {
            // Syntax errors carry their position as properties rather than in the stack.
            ex.as_object()
                .get::<_, Option<u32>>("lineNumber")
                .ok()
                .flatten()
        });
        return (text, line);
    }
    if thrown.is_null() || thrown.is_undefined() {
        // QuickJS throws null when it cannot even allocate the error object.
        return ("out of memory".into(), None);
    }
    let text = thrown
        .get::<Coerced<String>>()
        .map(|c| c.0)
        .unwrap_or_else(|_| format!("a thrown {}", thrown.type_name()));
    (format!("uncaught {text}"), None)
}

/// The first `file:LINE` in a QuickJS stack trace (`    at uid (hooks/uid.js:3:11)`).
fn line_in(stack: &str, file: &str) -> Option<u32> {
    let mut rest = stack;
    while let Some(i) = rest.find(file) {
        let after = &rest[i + file.len()..];
        if let Some(digits) = after.strip_prefix(':') {
            let end = digits
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(digits.len());
            if let Ok(n) = digits[..end].parse() {
                return Some(n);
            }
        }
        rest = after;
    }
    None
}

/// Runs `f` with this thread's engine for `hooks`, (re)building it when the generation changed.
fn with_engine<T>(
    hooks: &Hooks,
    f: impl FnOnce(&Engine) -> Result<T, HookError>,
) -> Result<T, HookError> {
    ENGINE.with(|cell| {
        let Ok(mut slot) = cell.try_borrow_mut() else {
            return Err(HookError::Load(
                "a hook was called from inside a hook".into(),
            ));
        };
        if slot.as_ref().map(|e| e.generation) != Some(hooks.generation) {
            // Free the old program's memory before building the new one.
            *slot = None;
            let engine = Engine::new(hooks.generation, &hooks.program).map_err(|(_, e)| e)?;
            *slot = Some(engine);
        }
        match slot.as_ref() {
            Some(engine) => f(engine),
            None => Err(HookError::Load("no engine".into())),
        }
    })
}

pub(super) fn check(program: &Program) -> Result<(), (HookKind, HookError)> {
    Engine::new(0, program).map(drop)
}

fn req_arg<'js>(
    ctx: &Ctx<'js>,
    freeze: &Function<'js>,
    req: &HookRequest<'_>,
) -> rquickjs::Result<Value<'js>> {
    req.to_js(ctx, freeze).map(Object::into_value)
}

fn refuse_promise(file: &str, v: &Value<'_>) -> Result<(), HookError> {
    if v.is_promise() {
        return Err(HookError::BadReturn(format!(
            "{file}: returned a promise; hooks must be synchronous (no `async`)"
        )));
    }
    Ok(())
}

pub(super) fn call_uid(hooks: &Hooks, req: &HookRequest<'_>) -> Result<Option<String>, HookError> {
    with_engine(hooks, |e| {
        e.call(
            HookKind::Uid,
            |ctx, freeze| Ok(vec![req_arg(ctx, freeze, req)?]),
            |file, v| {
                refuse_promise(file, &v)?;
                uid_of(file, &v)
            },
        )
    })
}

fn uid_of(file: &str, v: &Value<'_>) -> Result<Option<String>, HookError> {
    if v.is_null() || v.is_undefined() {
        return Ok(None);
    }
    if let Some(s) = v.as_string() {
        let s = s
            .to_string()
            .map_err(|e| HookError::BadReturn(format!("{file}: {e}")))?;
        return Ok((!s.is_empty()).then_some(s));
    }
    if v.is_number() {
        if let Ok(Coerced(s)) = v.get::<Coerced<String>>() {
            return Ok(Some(s));
        }
    }
    Err(HookError::BadReturn(format!(
        "{file}: uid() returned a {}; expected a string, a number, null or undefined",
        v.type_name()
    )))
}

pub(super) fn call_route(
    hooks: &Hooks,
    req: &HookRequest<'_>,
    uid: &str,
) -> Result<RouteDecision, HookError> {
    with_engine(hooks, |e| {
        e.call(
            HookKind::Route,
            |ctx, freeze| {
                let uid = rquickjs::String::from_str(ctx.clone(), uid)?.into_value();
                Ok(vec![req_arg(ctx, freeze, req)?, uid])
            },
            |file, v| {
                refuse_promise(file, &v)?;
                route_of(file, &v)
            },
        )
    })
}

fn route_of(file: &str, v: &Value<'_>) -> Result<RouteDecision, HookError> {
    let bad = |why: String| HookError::BadReturn(format!("{file}: route() {why}"));
    if v.is_null() || v.is_undefined() {
        return Ok(RouteDecision::Default);
    }
    if let Some(s) = v.as_string() {
        let s = s.to_string().map_err(|e| bad(e.to_string()))?;
        if s.is_empty() {
            return Ok(RouteDecision::Default);
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(RouteDecision::Backend(addr));
        }
        if s.contains(':') {
            return Err(bad(format!(
                "returned `{s}`: not a literal IP:port nor a pool name"
            )));
        }
        return Ok(RouteDecision::Pool(s));
    }
    if let Some(o) = v.as_object().filter(|_| !v.is_function() && !v.is_array()) {
        let ip: Option<Coerced<String>> = o.get("ip").map_err(|e| bad(e.to_string()))?;
        let port: Value = o.get("port").map_err(|e| bad(e.to_string()))?;
        let ip = ip.and_then(|c| c.0.parse::<IpAddr>().ok()).ok_or_else(|| {
            bad("returned an object whose `ip` is not a literal IP address".into())
        })?;
        let port = port
            .as_number()
            .filter(|p| p.fract() == 0.0 && (1.0..=65535.0).contains(p))
            .map(|p| p as u16)
            .or_else(|| {
                port.as_string()
                    .and_then(|s| s.to_string().ok())
                    .and_then(|s| s.parse::<u16>().ok())
                    .filter(|p| *p != 0)
            })
            .ok_or_else(|| bad("returned an object whose `port` is not 1..65535".into()))?;
        return Ok(RouteDecision::Backend(SocketAddr::new(ip, port)));
    }
    Err(bad(format!(
        "returned a {}; expected null, a pool name, \"ip:port\" or {{ip, port}}",
        v.type_name()
    )))
}

pub(super) fn call_admin(hooks: &Hooks, req: &HookRequest<'_>) -> Result<bool, HookError> {
    with_engine(hooks, |e| {
        e.call(
            HookKind::Admin,
            |ctx, freeze| Ok(vec![req_arg(ctx, freeze, req)?]),
            |file, v| {
                refuse_promise(file, &v)?;
                v.as_bool().ok_or_else(|| {
                    HookError::BadReturn(format!(
                        "{file}: admin() returned a {}; expected true or false",
                        v.type_name()
                    ))
                })
            },
        )
    })
}
