"""MetaSchedule tuning with a persistent per-target database, and applying it on every build.

Where records live (one MetaSchedule JSON database, ``database_workload.json`` +
``database_tuning_record.json``, per directory)::

    <root>/<target key>/          root: ``tuning_db`` argument, else $KILN_TUNING_DIR,
                                  else platformdirs.user_cache_dir("kiln")/tuning
    backends/tvm/tuning_db/<target key>/   shipped with kiln (reference targets)

The target key names the code generator's CPU (``llvm-znver4``, ``llvm-x86-64-v3``,
``llvm-aarch64``, ``cuda-sm_90``). A record is a schedule trace for one kernel,
matched by the kernel's structural hash (MetaSchedule ignores the target on lookup), so
any record is *valid* for any LLVM CPU; it is only *tuned* for the one it was measured
on. Lookup order on a build: the user's database for the exact key, then the shipped
one for the exact key, else shipped databases whose key has the same ISA and vector
width (an AVX-512 ``znver4`` record serves ``skylake-avx512`` or ``x86-64-v4``; it is
not used for ``x86-64-v3``, whose vectors are half as wide).

Tuning (``tune_relax_module``) extracts the kernels kiln's legalize phase produces (so
the hashes match the build's) and tunes the ones without a record. The search space
(``space``) of a kernel whose kiln rule has choice points (``has_choice_points``:
contraction, window) is:

- ``kiln`` (the default): kiln's own rule, run by a ``ScheduleFn`` on the task's
  Schedule with its choice points tunable (``schedules/rule.py``: ``choose`` and
  ``choose_factor``).
  contraction: column tile NR (every vector multiple dividing N), loop order (which
  operand's tiles are swept innermost), row tile MR (divisors of M that fit the
  accumulator registers), K split 1/2/4/8; window: vectors per tile (1-8), small window
  loops unrolled or not. A structural choice (NR is the packed weight's layout; a loop
  order) cannot be changed by replaying a trace, so each is its own design space
  (enumerated, defaults first, at most MAX_RULE_SPACES); a split factor is a
  ``sample_categorical`` whose decision MetaSchedule's evolutionary search samples.
  kiln's default decisions are one point of the space (its first design space).
- ``union``: that and MetaSchedule's default CPU sketches (``SpaceGeneratorUnion``), so
  generic multi-level tiling competes with kiln's rule. On a small budget the sketches
  take most trials (they mutate; kiln's decisions are only resampled), and few trials
  do not find good generic conv schedules: on the same budget ``kiln`` found better
  records (see DEFAULT_SPACE). ``union`` is for large budgets.
- ``metaschedule``: MetaSchedule's default CPU space only.

Kernels of other rules always get MetaSchedule's default space (their rules have no
choice points). A record from kiln's space is a trace of kiln's rule with the best
decisions (its root block annotated ``kiln.rule``); builds apply it like any record
(``MetaScheduleApplyDatabase``), and its weight packing still moves to compile time
(``SplitLayoutRewritePreproc`` + ``fold_weight_prepack`` run after). Then kiln's
default rule is measured on each kernel with the same builder and runner and a record
is kept only when it beats it by 5 %: kiln's rules are the baseline every record must
beat.

Modules (import the one you need; this package imports none of them, so that the
build pipeline can apply records without importing the tuning driver, which itself
runs the pipeline's legalize phase):

    database  where records live, which a build reads, the pass that applies them
    space     kiln's search space: its rules' choice points as MetaSchedule design spaces
    measure   timing scheduled kernels with MetaSchedule's builder and runner
    tune      the driver: tune_relax_module, recheck_records
"""
