//! Bounds on one load: a step budget and a heap budget, so that a hostile or
//! mistaken `BUILD.star` ends with a located error instead of running until
//! it is killed (or taking the machine's memory).
//!
//! - **Steps** are Starlark's ticks: one per loop iteration (comprehensions
//!   too) and one per function call, counted over every file of the load.
//!   The evaluator reports every thousandth tick to `set_check_cancelled`,
//!   where the budget is checked. `range()` refuses a range longer than the
//!   budget: going through it would exceed it, and materialising it
//!   (`list(range(n))`) is one native operation that no tick interrupts.
//! - **Heap** is what the evaluating thread holds, as counted by
//!   [`CountingAlloc`] (which `ci` installs as its global allocator): the
//!   Starlark heap, dict tables, strings being built, the model. It is
//!   checked before every statement and at every thousandth tick, and before
//!   the operations that can make a huge value in one step: `*` (repetition)
//!   and `+` (concatenation) are replaced in the syntax tree by calls to
//!   [`checked_ops`], which compute the result's size first and refuse it
//!   before the memory is taken. `x *= n` is refused when parsed (it cannot
//!   be rewritten, and repeats without a check); `x += y` at most doubles a
//!   value and is caught at the next statement.
//!
//! What is not bounded: native operations whose result is a product of their
//! operands' sizes or exponential in them — `sep.join(list)`, `s.replace(a,
//! b)`, and `str()`/`repr()`/`%`/`json.encode` of a structure that shares
//! sub-values (`x = [x, x]` repeated) — can still take memory or time in one
//! step. Their operands are bounded by the limits, not their results.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::num::NonZeroI32;
use std::rc::Rc;

use starlark::codemap::{FileSpan, FileSpanRef};
use starlark::environment::GlobalsBuilder;
use starlark::eval::{BeforeStmtFunc, Evaluator};
use starlark::starlark_module;
use starlark::syntax::ast::{AssignOp, AstStmt, StmtP};
use starlark::syntax::AstModule;
use starlark::values::list::ListRef;
use starlark::values::range::Range;
use starlark::values::tuple::TupleRef;
use starlark::values::Value;

use super::{location_of, EvalContext};
use crate::error::{Invalid, ModelError};
use crate::model::Location;

/// Default step budget of a load. A generated pipeline of 10,000 tasks takes
/// about 70,000 steps (docs/PIPELINES.md, "Limits").
pub const DEFAULT_MAX_STEPS: u64 = 10_000_000;
/// Default heap budget of a load, in MiB. The same 10,000 tasks hold about
/// 40 MiB at their peak.
pub const DEFAULT_MAX_HEAP_MIB: u64 = 1024;

/// The limits of one load (`[load]` in `ci.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadLimits {
    /// Starlark steps (loop iterations and calls) over every file of the load.
    pub max_steps: u64,
    /// MiB the evaluation may hold at once.
    pub max_heap_mib: u64,
}

impl Default for LoadLimits {
    fn default() -> LoadLimits {
        LoadLimits {
            max_steps: DEFAULT_MAX_STEPS,
            max_heap_mib: DEFAULT_MAX_HEAP_MIB,
        }
    }
}

/// A global allocator that counts, per thread, the bytes allocated and not
/// yet freed there. The loader reads the count of its evaluating thread to
/// enforce `max_heap_mib`; without this allocator installed only the
/// checks before `*` and `+` apply (against the size of their result alone).
///
/// ```ignore
/// #[global_allocator]
/// static ALLOC: strata_engine::CountingAlloc = strata_engine::CountingAlloc;
/// ```
pub struct CountingAlloc;

thread_local! {
    /// Bytes allocated minus bytes freed on this thread. Const-initialised
    /// and without a destructor, so reading it never allocates.
    static LIVE: Cell<i64> = const { Cell::new(0) };
}

#[inline]
fn count(delta: i64) {
    let _ = LIVE.try_with(|live| live.set(live.get().wrapping_add(delta)));
}

// SAFETY: every method forwards to `System` unchanged; the counting touches
// only a thread-local integer and never allocates or unwinds.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

fn thread_live_bytes() -> i64 {
    LIVE.try_with(Cell::get).unwrap_or(0)
}

/// The budget of one load, shared by the evaluators of all its files (each
/// runs on the same thread, nested for `load()`).
pub(crate) struct Budget {
    limits: LoadLimits,
    /// The thread's live bytes when the load started.
    base: i64,
    /// Ticks of the evaluations that have finished.
    steps_done: Cell<u64>,
    /// The limit a check found exceeded, for the error the evaluator returns
    /// (a cancellation, which says nothing of why).
    exceeded: RefCell<Option<Invalid>>,
    /// Set once a limit stopped the evaluation: the evaluator checks again
    /// when a module ends, and a second stop would replace the located
    /// error of the first with an unlocated cancellation.
    stopped: Cell<bool>,
    /// The statement being evaluated, to locate a stop the evaluator reports
    /// without a span.
    last: RefCell<Option<FileSpan>>,
}

impl Budget {
    /// Starts counting; call on the thread that evaluates.
    pub(crate) fn new(limits: LoadLimits) -> Budget {
        Budget {
            limits,
            base: thread_live_bytes(),
            steps_done: Cell::new(0),
            exceeded: RefCell::new(None),
            stopped: Cell::new(false),
            last: RefCell::new(None),
        }
    }

    fn max_heap_bytes(&self) -> u64 {
        self.limits.max_heap_mib.saturating_mul(1 << 20)
    }

    fn heap_used(&self) -> u64 {
        (thread_live_bytes() - self.base).max(0) as u64
    }

    fn step_limit(&self) -> Invalid {
        Invalid::StepLimit {
            max: self.limits.max_steps,
        }
    }

    fn heap_limit(&self, what: String) -> Invalid {
        Invalid::HeapLimit {
            max_mib: self.limits.max_heap_mib,
            what,
        }
    }

    /// Refuses an operation that would make a value of `bytes` bytes.
    fn check_alloc(&self, op: &str, bytes: u64) -> Result<(), Invalid> {
        let used = self.heap_used();
        if used.saturating_add(bytes) > self.max_heap_bytes() {
            self.stopped.set(true);
            return Err(self.heap_limit(format!(
                "`{op}` would make a value of {} MiB, with {} MiB already held",
                bytes >> 20,
                used >> 20
            )));
        }
        Ok(())
    }

    /// Whether the evaluation is over a limit, counting `own_steps` of the
    /// evaluator asking; records which for [`Budget::take_exceeded`].
    fn over(&self, own_steps: u64) -> Option<Invalid> {
        if self.stopped.get() {
            return None;
        }
        let problem = if self.steps_done.get().saturating_add(own_steps) > self.limits.max_steps {
            self.step_limit()
        } else {
            let used = self.heap_used();
            if used <= self.max_heap_bytes() {
                return None;
            }
            self.heap_limit(format!("the values made so far hold {} MiB", used >> 20))
        };
        self.stopped.set(true);
        *self.exceeded.borrow_mut() = Some(problem.clone());
        Some(problem)
    }

    /// The limit found exceeded, if any (once), and the statement being
    /// evaluated then.
    pub(crate) fn take_exceeded(&self) -> Option<(Invalid, Option<Location>)> {
        let problem = self.exceeded.borrow_mut().take()?;
        Some((problem, self.last.borrow().as_ref().map(location_of)))
    }

    /// Puts the budget on an evaluator: the step and heap checks at every
    /// thousandth tick, and the heap check before each statement.
    pub(crate) fn watch(self: &Rc<Self>, eval: &mut Evaluator) {
        let thousands = Cell::new(0u64);
        let budget = self.clone();
        eval.set_check_cancelled(Box::new(move || {
            thousands.set(thousands.get() + 1);
            budget.over(thousands.get().saturating_mul(1000)).is_some()
        }));
        eval.before_stmt_for_dap(BeforeStmtFunc::from_dyn(Box::new(HeapCheck {
            budget: self.clone(),
        })));
    }

    /// Adds the ticks of an evaluation that finished.
    pub(crate) fn finished(&self, steps: u64) {
        self.steps_done
            .set(self.steps_done.get().saturating_add(steps));
    }
}

/// Checks the heap before each statement; an excess is put on the statement
/// before, which made it.
struct HeapCheck {
    budget: Rc<Budget>,
}

impl<'e> starlark::eval::BeforeStmtFuncDyn<'e> for HeapCheck {
    fn call<'v>(
        &mut self,
        span: FileSpanRef,
        _continued: bool,
        _eval: &mut Evaluator<'v, '_, 'e>,
    ) -> starlark::Result<()> {
        let used = self.budget.heap_used();
        let mut last = self.budget.last.borrow_mut();
        if used > self.budget.max_heap_bytes() && !self.budget.stopped.get() {
            self.budget.stopped.set(true);
            let problem = self
                .budget
                .heap_limit(format!("the values made so far hold {} MiB", used >> 20));
            let at = last
                .as_ref()
                .map(location_of)
                .unwrap_or_else(|| location_of(&span.to_file_span()));
            return Err(starlark::Error::new_native(ModelError::new(
                Some(at),
                problem,
            )));
        }
        *last = Some(span.to_file_span());
        Ok(())
    }
}

/// The names `*` and `+` are replaced with in every parsed file.
pub(crate) const MUL: &str = "__strata_checked_mul";
pub(crate) const ADD: &str = "__strata_checked_add";

/// Rewrites `a * b` and `a + b` into the checked calls, and refuses `x *= n`.
pub(crate) fn prepare(ast: &mut AstModule) -> Result<(), ModelError> {
    if let Some(span) = first_repeat_assign(ast.statement()) {
        return Err(ModelError::new(
            Some(location_of(&ast.file_span(span))),
            Invalid::RepeatAssign,
        ));
    }
    let ops = [
        ("*".to_owned(), MUL.to_owned()),
        ("+".to_owned(), ADD.to_owned()),
    ];
    ast.replace_binary_operators(&ops.into_iter().collect());
    Ok(())
}

fn first_repeat_assign(stmt: &AstStmt) -> Option<starlark::codemap::Span> {
    if let StmtP::AssignModify(_, AssignOp::Multiply, _) = &stmt.node {
        return Some(stmt.span);
    }
    let mut found = None;
    stmt.visit_stmt(|child| {
        if found.is_none() {
            found = first_repeat_assign(child);
        }
    });
    found
}

fn budget<'a>(eval: &Evaluator<'_, 'a, '_>) -> Option<&'a Budget> {
    eval.extra
        .and_then(|e| e.downcast_ref::<EvalContext>())
        .map(|ctx| &*ctx.budget)
}

/// Bytes of one element of a value `*` or `+` can make: a string's byte, a
/// list's or tuple's value.
fn sized(v: Value) -> Option<(u64, u64)> {
    if let Some(s) = v.unpack_str() {
        Some((s.len() as u64, 1))
    } else if let Some(l) = ListRef::from_value(v) {
        Some((l.len() as u64, 8))
    } else {
        TupleRef::from_value(v).map(|t| (t.len() as u64, 8))
    }
}

/// A limit's error, located by the caller's span; the budget stops.
fn refused(budget: &Budget, problem: Invalid) -> starlark::Error {
    budget.stopped.set(true);
    starlark::Error::new_native(ModelError::new(None, problem))
}

#[starlark_module]
pub(crate) fn checked_ops(builder: &mut GlobalsBuilder) {
    /// `a * b`, refused before it is computed when the result would not fit
    /// in the heap budget.
    fn __strata_checked_mul<'v>(
        #[starlark(require = pos)] a: Value<'v>,
        #[starlark(require = pos)] b: Value<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let repeat = match (sized(a), b.unpack_i32(), sized(b), a.unpack_i32()) {
            (Some((len, unit)), Some(n), _, _) | (_, _, Some((len, unit)), Some(n)) => {
                // Made in Rust's heap, then copied into Starlark's: twice.
                Some(
                    len.saturating_mul(unit)
                        .saturating_mul(n.max(0) as u64)
                        .saturating_mul(2),
                )
            }
            _ => None,
        };
        if let (Some(bytes), Some(budget)) = (repeat, budget(eval)) {
            budget
                .check_alloc("*", bytes)
                .map_err(|p| refused(budget, p))?;
        }
        a.mul(b, eval.heap())
    }

    /// `a + b`, refused before it is computed when the result would not fit
    /// in the heap budget.
    fn __strata_checked_add<'v>(
        #[starlark(require = pos)] a: Value<'v>,
        #[starlark(require = pos)] b: Value<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        if let (Some((la, ua)), Some((lb, _)), Some(budget)) = (sized(a), sized(b), budget(eval)) {
            budget
                .check_alloc("+", la.saturating_add(lb).saturating_mul(ua))
                .map_err(|p| refused(budget, p))?;
        }
        a.add(b, eval.heap())
    }

    /// `range()` as the standard one, refused when it is longer than the
    /// step budget (see the module's doc).
    #[starlark(as_type = Range)]
    fn range<'v>(
        #[starlark(require = pos)] a1: i32,
        #[starlark(require = pos)] a2: Option<i32>,
        #[starlark(require = pos, default = 1)] step: i32,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Range> {
        let (start, stop) = match a2 {
            None => (0, a1),
            Some(stop) => (a1, stop),
        };
        let Some(step) = NonZeroI32::new(step) else {
            return Err(starlark::Error::new_other(ZeroStep));
        };
        let (lo, hi, by) = (start as i64, stop as i64, step.get() as i64);
        let len = if by > 0 {
            (hi - lo + by - 1).max(0) / by
        } else {
            (lo - hi - by - 1).max(0) / -by
        } as u64;
        if let Some(budget) = budget(eval) {
            if len > budget.limits.max_steps {
                return Err(refused(
                    budget,
                    Invalid::RangeOverSteps {
                        len,
                        max: budget.limits.max_steps,
                    },
                ));
            }
        }
        Ok(Range::new(start, stop, step))
    }
}

/// Starlark's own message for `range(a, b, 0)`.
#[derive(Debug, thiserror::Error)]
#[error("Third argument of range (step) cannot be zero")]
struct ZeroStep;
