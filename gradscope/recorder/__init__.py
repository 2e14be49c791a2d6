"""The recorder: hooks on any nn.Module that record exact per-layer gradient, activation and
update statistics into a long-form frame (see gradscope.schema). One job per file:

- recorder.py  the front: settings, attach/detach, re-planning after model surgery; `watch`
- steps.py     the step clock: which steps are recorded, closing a step, collecting it
- hooks.py     which modules are watched, forward and output-gradient hooks, the registry
- params.py    the recorded parameters: copied before the update, read after it in one
               pass (gradient, parameter, the update and its dot with the gradient, second
               moments), recounted exactly
- capture.py   one step's calls as typed records, and its one host transfer
- stats/       the statistics: fields.py (the per-call fields, declared once with their
               reduction), backends.py (the one path choice: C kernels in native/, torch ops
               in torch_ops.py and flat.py (parameters), compiled by fused.py on GPUs),
               graph_ops.py (inside compiled graphs), derive.py (mean, std,
               rms, fractions, norms), units.py (dead units), transfer.py (the step's one
               non-blocking copy to the host)
- compiled.py  the same statistics computed inside torch.compile graphs (traced hooks)
- distributed.py  what the recorder needs of DDP, FSDP2 and compiled wrappers
- deferred.py  closed steps held as host tables, reduced many at once when rows are needed
- reduce.py    per-layer reduction of a batch of steps' calls (vectorized over the steps)
- merge.py     merging over ranks: one packed all-reduce per reduction
- rows.py      layouts, spilling to Parquet, to_frame()
- optimizers.py  the optimizer given, or found stepping the model; gradients read before
               the update (after the closure for step(closure))
- plan.py      what is watched in a model, decided once at attach
- results.py   what a recorder gives back: frames, settings, the run folder, the diagnosis

A recorded step flows one way through the package's rooms: hooks.py (module outputs and
their gradients) and optimizers.py with params.py (parameters before and after the update)
-> capture.py (the step's calls as typed records, computed by stats/: C kernels or torch
ops, and its one host transfer) -> deferred.py (held until rows are needed) ->
reduce.py (per layer, many steps at once) -> merge.py (over ranks) -> rows.py (layouts,
spilling, to_frame). The frame's kinds and stats are documented in gradscope.schema.

What waits and what does not: nothing in a recorded step waits for a device. A step's
statistics are computed where its tensors are, joined there into one float64 vector when it
closes and copied without blocking into a reused (page-locked where CUDA is available) host
buffer, with an event; the host reads them when the event has completed: at a later step's
close, or when rows, verdicts or a save are asked for (deferred.py; at most 2 steps in
flight). No tensor is held for a recount: the torch ops sum module outputs' and output
gradients' squares in float64 as they go, and compute the parameters' float64 recount beside
each float32 sum, which the host picks where needed. On the CPU the values are there at once
and a step is read as it closes; on a device, what needs them early (``rec.nonfinite``, the
non-finite origin, ``on_verdict``) sees a step one step (or two) late. Turning them into rows is host bookkeeping that waits (deferred.py)
until the frame is asked for, the calls change, 256 steps are held or the rows would reach
the spill threshold. A held step keeps its numbers, not one Python object per call, so the
garbage collector has little to promote. Steps merged over ranks, steps with a non-finite
value and recorders with ``on_verdict`` are reduced as they close. The frame is the same,
bit for bit, as if each step had been reduced alone (tests/test_deferred.py).

What a recorded step reads: each module output and output gradient once (a tensor that two
modules return in a row unchanged, as a block returns its last layer's output, is read once
and its statistics copied: same object, same version counter); each recorded parameter twice
on the C path (a copy before the update, summing its squares; after it, one pass over
gradient, copy and parameter for everything else: five passes over memory in all).

Norms are exact: they equal ``torch.linalg.vector_norm(t.double())`` to 1e-6 relative, down
to float32 subnormals. CPU float32/float64 tensors go through one-pass C kernels
(``gradscope.recorder.stats.native``, compiled on first use) that accumulate in float64 and
count non-finite values as they go; other tensors (GPU, bfloat16, or where no C compiler is found) through
torch ops: module outputs and output gradients in eight ops and one op a call, their sums of
squares as float64 norms; parameters as float32 cascade sums of squares over size groups,
with float64 foreach norms beside them that the host takes where a square may have
underflowed or overflowed (nothing is held until the step closes). ``min`` and ``max`` ignore NaN (counted
in ``nonfinite``). Statistics of all calls of a module within one step (shared weights,
micro-batches) are merged from additive moments. Forward passes under ``torch.no_grad()``
(evaluation) are skipped. Device statistics move to the host once per recorded step. From
its first recorded step until detach the recorder keeps a copy of the recorded parameters
(to measure the update) and work buffers (about the parameters' size again, plus the largest
module output). Steps that are not recorded run no forward hook at all, and the optimizer
hooks only count them.

Which modules' outputs are recorded: by default every leaf module and every block, a block
being a composite module that is an element of an ``nn.ModuleList`` or ``nn.Sequential``
(``blocks.7``, ``transformer.h.3``, ``layers.2``; see ``block_fqns``): their outputs are the
residual stream. ``include=`` (globs or a predicate) selects any modules instead, leaf or
composite; ``exclude=`` removes modules. Parameters are recorded once each, under their own
fqn: those of every selected module and of the modules inside a selected composite one.

Rows are held in memory compactly (see rows.py); for long runs pass ``spill_to=DIR`` and they
go to Parquet parts there. Under DDP and FSDP2 the statistics are merged over ranks (see
``Recorder(sync=...)``).

Compiled models (``torch.compile(model)``, compiled blocks, ``module.compile()``) are recorded
with the same rows and names as the eager model: compiled.py registers hooks that dynamo
traces into the graphs, computing each output's float64 moments in the graph and its
gradient's sums in the backward of an identity function, so the statistics fuse with the
model's kernels and nothing leaves the graph but two small tensors. Recorded and unrecorded
steps run two cached graphs (no recompilation per recorded step). A model that ran compiled
before ``watch`` is traced again once.
"""

from gradscope.recorder.errors import NonfiniteEvent, RecorderError
from gradscope.recorder.hooks import block_fqns
from gradscope.recorder.recorder import Recorder, watch

__all__ = ["NonfiniteEvent", "Recorder", "RecorderError", "block_fqns", "watch"]
