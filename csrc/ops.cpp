// The operator library distill_ops_native (schemas) and the Python module distill_ops._C
// (importing it registers the operators). The argument checks are in dense_call.cpp and
// sparse_call.cpp, the kernels in cpu/ and cuda/.
#include <Python.h>

#include <torch/library.h>

#ifndef DISTILL_OPS_WITH_CUDA
#define DISTILL_OPS_WITH_CUDA 0
#endif

TORCH_LIBRARY(distill_ops_native, m) {
  m.def(
      "dense_forward(Tensor student, Tensor teacher, Tensor? labels, Tensor(a!)? grad, "
      "Tensor? grad_scale, int divergence, float mix, float temperature, float softcap, "
      "float soft_coef, float hard_coef, int ignore_index) -> Tensor");
  // Sparse targets (reference: backends/reference_sparse.py). ids int32 (N, k); logprobs, tail and
  // grad_scale float32 (float64 when logprobs is float64, which makes the loss float64 too).
  // target_bits (tail mode only): reference_sparse.target_bits(ids, V), int32 (N, ceil(V / 32)).
  m.def(
      "sparse_forward(Tensor student, Tensor ids, Tensor logprobs, Tensor? tail, Tensor? labels, "
      "Tensor(a!)? grad, Tensor? grad_scale, int divergence, float mix, int mode, "
      "float temperature, float target_scale, float soft_coef, float hard_coef, "
      "int ignore_index, Tensor? target_bits=None) -> Tensor");
  m.def("teacher_topk(Tensor teacher, int k, float temperature) -> (Tensor, Tensor, Tensor)");
  m.def(
      "teacher_sample(Tensor teacher, int num_samples, float inv_prop, float delta, "
      "int seed_key) -> (Tensor, Tensor, Tensor)");
  // The raw draws of teacher_sample, int64 (N, num_samples) ids, before duplicates are merged:
  // the CUDA path merges them with reference_sparse.merge_draws (one definition of the weights).
  m.def("teacher_sample_draws(Tensor teacher, int num_samples, float inv_prop, int seed_key) -> Tensor");
}

// The Python module: no functions, only flags; importing it loads the library above.
static struct PyModuleDef distill_ops_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "distill_ops compiled kernels; the operators live under torch.ops.distill_ops_native",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&distill_ops_c_module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddObject(m, "WITH_CUDA", PyBool_FromLong(DISTILL_OPS_WITH_CUDA)) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
