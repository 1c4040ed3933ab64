"""Static kernel report: GPU speed from the compiled machine code, without a GPU.

    python bench/kernel_report.py [--json PATH] [--kernels a,b] [--no-plans]

For every kernel with a spec in ``bench/sass_report/specs/`` (``bitmap_cuda``,
``tiled_csl_cuda``, ``bitmap_triton``) it compiles each instantiation to a cubin (CUDA:
``nvcc -cubin`` for sm_90a, sm_86 and sm_80 with the flags of ``.ci/compile_kernels.sh``;
Triton: ``triton.compile`` with a ``GPUTarget("cuda", 90, 32)``), disassembles it
(``cuobjdump -sass``; CUDA's or the one the triton wheel ships) and reports

* registers, spill bytes (ptxas spill stores + loads; Triton: the local-memory frame), shared
  memory per CTA (static from ptxas + dynamic from the spec) and the CTAs an SM holds, on an
  H100 (``ctas_per_sm_h100``; limits: 64 warps, 32 CTAs, 65536 registers allocated per warp in
  units of 256, 228 KiB shared memory with 1 KiB reserved per CTA, 227 KiB per CTA) and on the
  GPU its arch's plans target (``ctas_per_sm``: an A100 for sm_80, an A10 -- 99 KiB per CTA,
  like every sm_86/89/120 part -- for sm_86; 0 when the CTA does not fit);
* ``instr_per_element`` at sparsity 0.5 / 0.7 / 0.9: SASS instructions a thread issues in one
  main-loop iteration x threads per CTA / dense weight elements that iteration consumes.
  Every instruction counts once per warp (predicated-off lanes issue too). The main loop is
  the natural loop of the control-flow graph holding the most MMA instructions (the innermost
  on ties); each of its blocks runs once per iteration unless the kernel's spec says
  otherwise: ``trip_counts`` for loops nested in it and ``block_weights`` for data-dependent
  branches, both derived from a uniform random mask at that sparsity (see
  ``bench/sass_report/specs/__init__.py``). Also per class (global/shared loads and stores,
  integer, conversion, MMA, barrier, branch, other) and shared-memory bytes per element;

and, for the benchmark shapes (Llama-3-8B, OPT-66B; N = 1, 8, 16, 32; sparsity 0.5, 0.7, 0.9),
the launch plan of each kernel for each compiled arch on that arch's GPU (CTAs, split-K, tile
width, and ``smem_bytes``: the launched instance's shared memory per CTA, next to the GPU's
per-CTA limit), with a red flag under two CTAs per SM (264 on an H100), and for the sm_90 plans
a predicted speed-up over dense from this model (H100, fp16; ``--gpu h200``: the same with
4.8 TB/s):

    time  = max(bytes / 3.35 TB/s,
                max(instr, 2 x int-pipe instr) x elements x N-blocks / (29 T thread-instr/s x util),
                shared bytes x elements x N-blocks / (132 x 128 B x 1.75 GHz x util)) + launches
    dense = (2 M K + 2 N K + 2 N M) bytes / 3.35 TB/s + one launch (cuBLAS, memory-bound)

``bytes`` is the compressed weight (bitmap: 2(1-s) + 1/8 bytes per element + offsets;
Tiled-CSL: 4(1-s) per element + offsets) + x + y + the fp32 split-K workspace written and read
back; 29 T = 132 SMs x 4 schedulers x 32 lanes x ~1.75 GHz; the integer ALU pipe runs at half
rate, so its instructions (the ``integer`` class less IMAD/IMUL, which issue to the FMA pipe
on sm_80+: that is why compilers emit ``IMAD.MOV`` for moves) bound the time at twice their
count, whatever else issues meanwhile; ``util`` = the fraction of SMs busy (CTAs over 132 for
one partial wave, else the wave efficiency over SMs x CTAs per SM); a launch costs 2 us
(a separate split-K reduce kernel is a second launch). Instruction counts are per compiled
instance; predictions use the fp16 sm_90a instance whose ``n_tile`` the plan picks. These are
model estimates, not measurements: treat a rise in the numbers as a regression, and correct
the model from GPU runs (``bench/gpu_check.sh`` prints both).

Compiles are cached by a hash of the sources, flags and compiler version under
``$FLASHSPARSE_KERNEL_CACHE/kernel_report`` (default ``~/.cache/flashsparse``). Without nvcc
the CUDA kernels are skipped with a message (exit 0); without triton, the Triton kernel.

Modules: :mod:`.parse` (SASS and ptxas output), :mod:`.cfg` (basic blocks, loops, counts),
:mod:`.compile` (tools, cached compiles), :mod:`.analyse` (per-instantiation counts),
:mod:`.model` (GPU model, benchmark shapes, predictions), :mod:`.plans` (launch plans),
:mod:`.render` (the text table), :mod:`.report` (the whole report and the command line),
:mod:`.specs` (one spec per kernel).
"""
