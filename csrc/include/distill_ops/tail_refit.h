// When a streamed tail sum is summed again: shared by the CPU and CUDA kernels of teacher top-k and
// of the sparse loss's tail mode (the Triton kernels carry the same constant,
// backends/triton/topk.py TAIL_REFIT_LOG).
//
// The streaming kernels sum a row's tail (the teacher's mass outside its top-k; the student's mass
// outside the sparse targets) as exponentials relative to the running max of the whole row, which
// is usually a top-k member or a target. Terms more than ~87 below that max underflow in float32
// (~708 in double), so a tail that far below comes out as 0, log -inf, where the reference's
// logsumexp gives a finite log (a teacher at a low temperature; a student sure of its targets; the
// sparse loss's tail term is then infinite). A tail whose streamed log-mass relative to the row max
// is below kTailRefitLog is summed again over the row, relative to the tail's own max: one more
// read, for such rows only. Above it, what underflowed is at most V e^-87 of the max, under
// V e^-47 < 1e-11 of the tail (V < 2^31).
#pragma once

namespace distill_ops {

constexpr double kTailRefitLog = -40.0;

}  // namespace distill_ops
